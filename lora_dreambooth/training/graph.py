"""Speed components that know nothing about the training recipe.

- :class:`CudaGraphStep` runs a whole training step (forward, loss, backward, optimizer) eagerly for a few
  warm-up calls, then captures it once in a CUDA graph and replays it: no Python, no kernel-launch overhead.
- :func:`make_optimizer_capturable` lets torch's fused AdamW step inside that graph, learning-rate schedule included.
- :class:`GraphedTraining` splits the step where it must: forward + backward into :class:`FlatGradients` (static
  gradient views; k replays accumulate), one all-reduce of those buffers between replays when several processes
  train, then the captured :class:`OptimizerUpdate`. :class:`DeviceLossScaler` is fp16 loss scaling with
  `torch.amp.GradScaler`'s rules and no host sync (the skipped-step count is read only when reported).
- :func:`checkpoint_without_rng_state` is activation checkpointing that a graph can capture.
- :func:`compile_in_place` applies `torch.compile` without wrapping the module (saving and peft keep working).

What a captured step may do: read its tensor arguments, module parameters and buffers, and any tensor that
keeps its storage; write parameters, gradients and optimizer state in place. Python values read inside it
(a step counter, a learning rate held as a float) are frozen at capture time.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

StepFunction = Callable[..., torch.Tensor]
# as the user set it: inductor itself writes its default (/tmp/torchinductor_USER) into the environment later
_USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


class _CapturedStep:
    """One captured graph with its static input buffers and its static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output

    @classmethod
    def capture(cls, step: StepFunction, inputs: tuple[torch.Tensor, ...], pool) -> "_CapturedStep":
        static_inputs = [t.detach().clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        # "thread_local": CUDA calls of other threads (the class-image PNG writers, gloo's workers) must not
        # invalidate this thread's capture, as they can in the default "global" mode.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            output = step(*static_inputs)
        return cls(graph, static_inputs, output)

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, value in zip(self.inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output.detach().clone()  # the static output is overwritten by the next replay


class CudaGraphStep:
    """Call `step(*tensors) -> loss` through a CUDA graph once it has run `warmup` times for an input shape.

    Warm-up calls run eagerly on a side stream (as capture requires) and do real work: a training run's first
    steps are its warm-up. Each distinct set of input shapes/dtypes gets its own graph, up to `max_graphs`, all
    sharing one memory pool (safe here because replays are serialised on one stream and nothing but the returned
    copy of the loss outlives a replay); further shapes run eagerly. If a capture fails, the runner warns and
    stays eager for good. Gradients must be None when a capture starts (zero them with `set_to_none=True`).
    """

    def __init__(self, step: StepFunction, *, warmup: int = 3, max_graphs: int = 4,
                 after_failed_capture: Callable[[], None] | None = None):
        if warmup < 1:
            raise ValueError("warmup must be at least 1: the first call initialises optimizer state and kernels")
        self.step, self.warmup, self.max_graphs = step, warmup, max_graphs
        self.graphs: dict[tuple, _CapturedStep] = {}
        self.calls: dict[tuple, int] = {}
        self.disabled_reason: str | None = None
        self.after_failed_capture = after_failed_capture  # e.g. drop gradients a failed capture left behind
        self._pool = None
        self._side_stream: torch.cuda.Stream | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        captured = self.graphs.get(key)
        if captured is not None:
            return captured.replay(inputs)
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        if self.disabled_reason or len(self.graphs) >= self.max_graphs:
            return self.step(*inputs).detach()
        if count < self.warmup:
            return self._eager_on_side_stream(inputs)
        captured = self._try_capture(inputs)
        if captured is None:
            return self.step(*inputs).detach()
        self.graphs[key] = captured
        return captured.replay(inputs)

    @property
    def replaying(self) -> bool:
        """Whether at least one graph has been captured."""
        return bool(self.graphs)

    def _eager_on_side_stream(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # One stream for every warm-up call, and a detached result: autograd nodes of an earlier step must not
        # outlive it on another stream (capture would then see mismatched gradient-accumulation streams).
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            output = self.step(*inputs).detach()
        torch.cuda.current_stream().wait_stream(side)
        return output

    def _try_capture(self, inputs: tuple[torch.Tensor, ...]) -> _CapturedStep | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            captured = _CapturedStep.capture(self.step, inputs, self._pool)
        except Exception as exc:  # an op that cannot be captured: keep training, eagerly
            self.disabled_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("CUDA graph capture failed (%s); this run continues eagerly (slower, same results)",
                        self.disabled_reason)
            log.debug("the failed capture", exc_info=True)
            torch.cuda.synchronize()
            if self.after_failed_capture is not None:
                self.after_failed_capture()
            return None
        log.info("captured the training step in a CUDA graph (input shapes %s)",
                 ", ".join(str(tuple(t.shape)) for t in inputs))
        return captured


def make_optimizer_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let a fused torch Adam/AdamW step run inside a CUDA graph.

    Sets `capturable` and turns each group's learning rate into a device tensor: LR schedulers then update it
    in place (`fill_`), so a replayed step sees the current rate instead of the one at capture time.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"only torch Adam/AdamW can be captured, not {type(inner).__name__}")
    for group in inner.param_groups:
        device = group["params"][0].device
        if device.type != "cuda" or not group.get("fused"):
            raise TypeError("a captured optimizer must be a fused Adam/AdamW on a CUDA device")
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    inner.defaults["capturable"] = True


def checkpoint_without_rng_state(module: torch.nn.Module, *args, **kwargs):
    """Activation checkpointing (non-reentrant) that neither saves nor restores RNG state.

    A CUDA graph cannot capture RNG-state reads; skipping them is exact for modules without randomness, such
    as SD's UNet blocks (dropout 0). Pass it as diffusers' `gradient_checkpointing_func`.
    """
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False,
                                             **kwargs)


def compile_cache_dir() -> Path:
    """Where torch.compile keeps compiled kernels between runs: the user cache folder (`$LORA_DREAMBOOTH_CACHE` or
    `~/.cache/lora-dreambooth`, beside the class images), unless `TORCHINDUCTOR_CACHE_DIR` is set."""
    from lora_dreambooth.training.priors import default_cache_root

    return Path(_USER_INDUCTOR_CACHE or default_cache_root() / "torch-compile")


def compile_in_place(module: torch.nn.Module, *, mode: str | None = None, regional: bool = True) -> torch.nn.Module:
    """`torch.compile` a module in place, keeping its identity for peft, accelerate and saving.

    With `regional` and a diffusers model that names its repeated blocks (the UNet's transformer blocks), only those
    are compiled (`compile_repeated_blocks`): each distinct block shape compiles once and every block of that shape
    reuses the code, instead of tracing the whole UNet. The compiler's caches live in :func:`compile_cache_dir`, so
    a second run on the same machine loads the kernels instead of compiling them.

    Use the default mode (or "max-autotune-no-cudagraphs") under :class:`CudaGraphStep`: "reduce-overhead" brings
    its own CUDA graphs, which cannot nest inside ours.
    """
    if mode == "reduce-overhead":
        raise ValueError("mode 'reduce-overhead' captures its own CUDA graphs; use the default mode")
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # inductor reads it when it first compiles
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    if regional and getattr(module, "_repeated_blocks", None):
        module.compile_repeated_blocks(mode=mode)
    else:
        module.compile(mode=mode)
    log.info("torch.compile (%s), kernels cached in '%s'", "repeated blocks" if regional else "whole model", folder)
    return module




# -- the step in parts: static gradients, loss scaling on the device, accumulation, one collective ----------------
class DeviceLossScaler:
    """`torch.amp.GradScaler`'s dynamic loss scaling with every piece of state in device tensors.

    The scale, the growth tracker, the inf/nan flag of the current step and the count of skipped steps are
    tensors, and every update is a device op (`torch._amp_foreach_non_finite_check_and_unscale_`,
    `torch._amp_update_scale_`, as GradScaler uses them), so a CUDA graph can capture it and nothing waits for the
    host. A fused AdamW skips its update where `found_inf` is set (see `optim.skip_steps_on_overflow`).
    """

    def __init__(self, device: torch.device | str, *, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, growth_tracker: int = 0):
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.full((), growth_tracker, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)

    @classmethod
    def from_grad_scaler(cls, scaler: "torch.amp.GradScaler", device: torch.device | str) -> "DeviceLossScaler":
        """Take over a GradScaler's settings and state (e.g. accelerate's, just restored from a checkpoint)."""
        state = scaler.state_dict()
        return cls(device, init_scale=state["scale"], growth_factor=state["growth_factor"],
                   backoff_factor=state["backoff_factor"], growth_interval=state["growth_interval"],
                   growth_tracker=state["_growth_tracker"])

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def check_(self, grads: list[torch.Tensor], *, unscale: bool) -> None:
        """Set `found_inf` from this step's gradients; divide them by the scale first when `unscale` (before
        clipping; otherwise the fused optimizer divides, given `grad_scale`)."""
        self.found_inf.zero_()
        inv_scale = self.scale.double().reciprocal().float() if unscale else self._one
        for group in _by_dtype(grads):
            torch._amp_foreach_non_finite_check_and_unscale_(group, self.found_inf, inv_scale)

    def update_(self) -> None:
        """After the optimizer step: back off on overflow, grow after `growth_interval` clean steps."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        self.skipped.add_(self.found_inf)

    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far (reads the device: call it when logging, not every step)."""
        return int(self.skipped.item())

    def state_dict(self) -> dict:
        """The state in `torch.amp.GradScaler.state_dict()`'s format (a host sync)."""
        return {"scale": float(self.scale.item()), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self.growth_tracker.item())}

    def store_into(self, scaler: "torch.amp.GradScaler") -> None:
        """Write this state into a GradScaler, so whatever saves that one (accelerate's `save_state`) saves ours."""
        scaler.load_state_dict(self.state_dict())


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


class FlatGradients:
    """The gradients of `params` as views into one flat buffer per dtype.

    Autograd then accumulates into fixed storage in place (what a replayed backward must write, and what k
    accumulated micro-batches add up in), and the processes' gradients are averaged with one collective per
    buffer instead of DDP's bucketed hooks (which cannot run inside a capture).
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = list(params)
        self.buffers = [torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device)
                        for group in _by_dtype(self.params)]
        self.bind()

    def bind(self) -> None:
        """Point every parameter's `.grad` at its slice of the flat buffers (again after anything reset them)."""
        for buffer, group in zip(self.buffers, _by_dtype(self.params)):
            offset = 0
            for p in group:
                p.grad = buffer[offset:offset + p.numel()].view_as(p)
                offset += p.numel()

    @property
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]

    def zero_(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def all_reduce_sum_(self, group=None) -> None:
        """Sum the buffers over the processes of `group` (NCCL, or gloo, which takes CUDA tensors too)."""
        import torch.distributed as dist

        for buffer in self.buffers:
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)


class OptimizerUpdate:
    """After the micro-batches: average, check and unscale (fp16), clip, step, update the scale, zero the gradients.

    A function of device state only, so it can be captured. `loss_scaler` None means no loss scaling (bf16, fp32).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, gradients: FlatGradients, *, max_grad_norm: float,
                 loss_scaler: DeviceLossScaler | None = None, world_size: int = 1):
        from lora_dreambooth.training.optim import skip_steps_on_overflow

        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # around accelerate's wrapper and its GradScaler
        self.gradients, self.max_grad_norm = gradients, max_grad_norm
        self.loss_scaler, self.world_size = loss_scaler, world_size
        if loss_scaler is not None:
            skip_steps_on_overflow(self.optimizer, loss_scaler.found_inf,
                                   grad_scale=None if max_grad_norm > 0 else loss_scaler.scale)
        self._done = torch.zeros((), device=gradients.buffers[0].device)

    def __call__(self) -> torch.Tensor:
        grads = self.gradients.grads
        if self.world_size > 1:
            for buffer in self.gradients.buffers:
                buffer.div_(self.world_size)
        if self.loss_scaler is not None:
            self.loss_scaler.check_(grads, unscale=self.max_grad_norm > 0)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.gradients.params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        if self.loss_scaler is not None:
            self.loss_scaler.update_()
        self.gradients.zero_()
        return self._done


class GraphedTraining:
    """The training step as CUDA graphs, in parts the recipe calls in order.

    `micro(*tensors)` runs forward + (scaled) backward of one micro-batch into the static gradient buffers;
    `finish()` ends the optimizer step: one all-reduce of the flat buffers when several processes train (run
    between replays: gloo cannot be captured, NCCL would gain one launch), then the captured optimizer update.
    With one process and no accumulation both parts are captured together in one graph, and `finish()` is empty.
    Several processes need no DDP wrapper around the models (the recipe leaves it out): DDP fetches every
    parameter's gradient accumulator when it is built, on the default stream, and a backward captured later must
    then make that legacy stream wait for the capture, which CUDA refuses ("operation would make the legacy stream
    depend on a capturing blocking stream", seen at 512 px with two ranks on an H200).
    """

    def __init__(self, forward_backward: StepFunction, update: OptimizerUpdate, *, accumulation: int = 1,
                 process_group=None, warmup: int = 3):
        self.update, self.process_group = update, process_group
        self.parts = accumulation > 1 or update.world_size > 1
        bind = update.gradients.bind
        if self.parts:
            self.micro = CudaGraphStep(forward_backward, warmup=warmup, after_failed_capture=bind)
            self._update_runner = CudaGraphStep(update, warmup=warmup, max_graphs=1, after_failed_capture=bind)
        else:
            def whole_step(*inputs: torch.Tensor) -> torch.Tensor:
                loss = forward_backward(*inputs)
                update()
                return loss

            self.micro = CudaGraphStep(whole_step, warmup=warmup, after_failed_capture=bind)

    @classmethod
    def build(cls, forward_backward: StepFunction, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], *,
              max_grad_norm: float, grad_scaler: "torch.amp.GradScaler | None" = None, world_size: int = 1,
              accumulation: int = 1, process_group=None, warmup: int = 3) -> "GraphedTraining":
        """Make `optimizer` (a fused AdamW) capturable, give `params` flat static gradients, and take over
        `grad_scaler`'s state in a :class:`DeviceLossScaler` (None: no loss scaling)."""
        make_optimizer_capturable(optimizer)
        scaler = DeviceLossScaler.from_grad_scaler(grad_scaler, params[0].device) if grad_scaler is not None else None
        update = OptimizerUpdate(optimizer, FlatGradients(params), max_grad_norm=max_grad_norm, loss_scaler=scaler,
                                 world_size=world_size)
        return cls(forward_backward, update, accumulation=accumulation, process_group=process_group, warmup=warmup)

    @property
    def loss_scaler(self) -> DeviceLossScaler | None:
        return self.update.loss_scaler

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """What `backward` runs on: the loss times the fp16 loss scale (unchanged without loss scaling)."""
        return self.loss_scaler.scale_loss(loss) if self.loss_scaler is not None else loss

    def store_scaler_state(self, grad_scaler: "torch.amp.GradScaler | None") -> None:
        """Copy the device scaler's state into `grad_scaler` before a checkpoint saves that one."""
        if self.loss_scaler is not None and grad_scaler is not None:
            self.loss_scaler.store_into(grad_scaler)

    def finish(self) -> None:
        """The end of an optimizer step (after the last micro-batch)."""
        if not self.parts:
            return
        if self.update.world_size > 1:
            self.update.gradients.all_reduce_sum_(self.process_group)
        self._update_runner()

    @property
    def replaying(self) -> bool:
        return self.micro.replaying

    @property
    def disabled_reason(self) -> str | None:
        return self.micro.disabled_reason

    def skipped_steps(self) -> int:
        """fp16: optimizer steps skipped for overflowing gradients (a device read)."""
        scaler = self.update.loss_scaler
        return scaler.skipped_steps() if scaler is not None else 0


def enable_checkpointing(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, plan) -> None:
    """Gradient checkpointing as the plan (an ExecutionPlan) says for the UNet, and for `text_encoder` when given.

    Under a CUDA graph the recomputation must not read RNG state (a graph cannot); SD's blocks have no dropout.
    """
    if plan.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_without_rng_state if plan.cuda_graph else None)
    if text_encoder is not None:
        text_encoder.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": not plan.cuda_graph})
