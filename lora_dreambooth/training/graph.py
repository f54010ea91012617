"""Speed components that know nothing about the training recipe.

- :class:`CudaGraphStep` runs a whole training step (forward, loss, backward, optimizer) eagerly for a few
  warm-up calls, then captures it once in a CUDA graph and replays it: no Python, no kernel-launch overhead.
- :func:`make_optimizer_capturable` lets torch's fused AdamW step inside that graph, learning-rate schedule included.
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
        with torch.cuda.graph(graph, pool=pool):
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
