"""Execution plans: which profile runs, and the low-memory profile's 4-bit frozen base.

`choose_plan` turns `--profile` and `--max-vram` into an :class:`ExecutionPlan` (whole-step CUDA graph or not,
NF4 base or not, gradient checkpointing or not) and says why. Peak memory is predicted from the loaded models'
parameter counts and activation coefficients measured on SD v1.4 at 512 px (`scripts/bench_train.py`).

The low-memory profile stores every frozen `nn.Linear` and `nn.Conv2d` of the UNet and the text encoder in
bitsandbytes NF4 (4 bits a weight plus one fp32 scale per 64) and dequantizes a fresh compute-dtype copy for each
use. The quantized layers stay `nn.Linear` / `nn.Conv2d` subclasses, so peft wraps them with LoRA like any other
layer, and their autograd functions save no activations: the input gradient only needs the (re-dequantized)
weight. SD v1.4's convolutions hold 589M of the UNet's 860M parameters, which is why they are quantized too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_dreambooth.adapters.precision import norms_compute_in_weight_dtype
from lora_dreambooth.config import TrainConfig, parse_size
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.kernels import LOW_PRECISION
from lora_dreambooth.kernels.attention import route_attention
from lora_dreambooth.kernels.geglu import use_fused_geglu
from lora_dreambooth.kernels.group_norm import use_channels_last_group_norm
from lora_dreambooth.kernels.layouts import keep_transformer_outputs_channels_last
from lora_dreambooth.kernels.resnet import fuse_resnet_norm_activations
from lora_dreambooth.kernels.warmup import compile_in_background, wait_for_compiles

log = logging.getLogger(__name__)

GIB = 1 << 30
NF4_BLOCKSIZE = 64
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / NF4_BLOCKSIZE  # packed nibbles + one fp32 absmax per block
MIN_QUANTIZED_NUMEL = 1024  # smaller layers are not worth a dequantize launch


# -- NF4 storage ----------------------------------------------------------------------------------------------
def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as exc:  # missing package or broken native library
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserInputError(f"--profile low-memory needs bitsandbytes (pip install bitsandbytes): {reason}") from None
    return bnb_functional


class _NF4Storage:
    """Mixin: a frozen weight held as NF4 buffers, dequantized on demand.

    The fp32 statistics are stored bit-cast to int32 so that `model.to(dtype)` (which casts floating buffers)
    leaves them intact; they are viewed back as fp32 when dequantizing.
    """

    nf4_data: torch.Tensor
    nf4_absmax: torch.Tensor
    nf4_code: torch.Tensor

    def _store_nf4(self, weight: torch.Tensor, compute_dtype: torch.dtype, device: torch.device | str) -> None:
        bnb_functional = _bnb_functional()
        dense = weight.detach().to(device=device, dtype=compute_dtype)
        packed, state = bnb_functional.quantize_4bit(dense, blocksize=NF4_BLOCKSIZE, quant_type="nf4",
                                                     compress_statistics=False)
        self.register_buffer("nf4_data", packed, persistent=False)
        self.register_buffer("nf4_absmax", state.absmax.float().contiguous().view(torch.int32), persistent=False)
        self.register_buffer("nf4_code", state.code.float().contiguous().view(torch.int32), persistent=False)
        self.nf4_shape = torch.Size(dense.shape)
        self.compute_dtype = compute_dtype

    def dequantize(self) -> torch.Tensor:
        """A fresh dense weight in the compute dtype (never cached: memory is the point).

        bitsandbytes' CUDA kernel on a GPU; elsewhere the same arithmetic in plain torch (bitsandbytes' own CPU
        path goes through torch.compile, which recompiles for every layer shape).
        """
        absmax, code = self.nf4_absmax.view(torch.float32), self.nf4_code.view(torch.float32)
        if self.nf4_data.device.type != "cuda":
            return dequantize_nf4_eager(self.nf4_data, absmax, code, self.nf4_shape, self.compute_dtype)
        bnb_functional = _bnb_functional()
        state = bnb_functional.QuantState(absmax=absmax, shape=self.nf4_shape, code=code, blocksize=NF4_BLOCKSIZE,
                                          quant_type="nf4", dtype=self.compute_dtype)
        return bnb_functional.dequantize_4bit(self.nf4_data, state)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that inspects `layer.weight` (peft reads its device and dtype)."""
        return self.dequantize()

    def quantized_bytes(self) -> int:
        """Bytes held on the device for this weight."""
        return sum(t.numel() * t.element_size() for t in (self.nf4_data, self.nf4_absmax, self.nf4_code))


def dequantize_nf4_eager(data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: torch.Size,
                         dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' NF4 layout decoded with plain torch ops: two codes a byte (high nibble first), one absmax
    per block of 64 (the last block may be short)."""
    flat = data.reshape(-1)
    count = shape.numel()
    indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:count].long()
    values = code[indices]
    short = (-count) % NF4_BLOCKSIZE
    if short:
        values = F.pad(values, (0, short))
    values = (values.view(-1, NF4_BLOCKSIZE) * absmax.view(-1, 1)).reshape(-1)[:count]
    return values.reshape(shape).to(dtype)


def _weight_for(layer: _NF4Storage, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize()
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
    return weight


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward; saves nothing but the layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return F.linear(x, _weight_for(layer, x), layer.bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = ctx.layer.dequantize()
        return (grad_out.to(weight.dtype) @ weight).to(ctx.x_dtype), None


class _NF4Conv2dFunction(torch.autograd.Function):
    """conv2d with the weight dequantized in forward and again in backward; saves nothing but shapes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Conv2d") -> torch.Tensor:
        ctx.layer, ctx.x_dtype, ctx.x_shape = layer, x.dtype, x.shape
        return F.conv2d(x, _weight_for(layer, x), layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        layer = ctx.layer
        weight = layer.dequantize()
        grad_in = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad_out.to(weight.dtype), layer.stride,
                                             layer.padding, layer.dilation, layer.groups)
        return grad_in.to(ctx.x_dtype), None


class NF4Linear(_NF4Storage, nn.Linear):
    """A frozen `nn.Linear` whose weight lives in NF4 on `device`; the bias stays in the compute dtype."""

    def __init__(self, source: nn.Linear, *, compute_dtype: torch.dtype, device: torch.device | str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self._store_nf4(source.weight, compute_dtype, device)
        self.bias = _frozen_copy(source.bias, compute_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4LinearFunction.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


class NF4Conv2d(_NF4Storage, nn.Conv2d):
    """A frozen zero-padded `nn.Conv2d` whose weight lives in NF4 on `device`."""

    def __init__(self, source: nn.Conv2d, *, compute_dtype: torch.dtype, device: torch.device | str):
        nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding"):
            setattr(self, name, getattr(source, name))
        self._store_nf4(source.weight, compute_dtype, device)
        self.bias = _frozen_copy(source.bias, compute_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Conv2dFunction.apply(x, self)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nf4")


def _frozen_copy(param: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(param.detach().to(device=device, dtype=dtype), requires_grad=False)


def _quantizable(module: nn.Module) -> bool:
    if isinstance(module, _NF4Storage) or module.weight is None or module.weight.numel() < MIN_QUANTIZED_NUMEL:
        return False
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear)


@dataclass
class QuantizationSummary:
    """What `quantize_frozen` replaced."""

    layers: int = 0
    params: int = 0
    device_bytes: int = 0


def quantize_frozen(model: nn.Module, *, compute_dtype: torch.dtype, device: torch.device | str
                    ) -> QuantizationSummary:
    """Replace the frozen Linear/Conv2d layers of `model` by NF4 layers on `device`, then move the rest there.

    Layer by layer, so the full-precision model never sits on the device (that alone would peak at ~1.9 GiB for
    SD v1.4 in bf16). Run it before adapters are injected: peft then wraps the NF4 layers.
    """
    summary = QuantizationSummary()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, nn.Conv2d)) or not _quantizable(child):
                continue
            kind = NF4Conv2d if isinstance(child, nn.Conv2d) else NF4Linear
            replacement = kind(child, compute_dtype=compute_dtype, device=device)
            setattr(parent, name, replacement)
            summary.layers += 1
            summary.params += replacement.nf4_shape.numel()
            summary.device_bytes += replacement.quantized_bytes()
    model.to(device=device, dtype=compute_dtype)  # norms, embeddings, biases; NF4 buffers are integers
    model.requires_grad_(False)
    return summary


def dequantize_into(model: nn.Module) -> None:
    """Replace NF4 layers by plain layers holding their dequantized weights (tests compare against this)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, _NF4Storage):
                continue
            placement = {"device": child.nf4_data.device, "dtype": child.compute_dtype}
            if isinstance(child, NF4Linear):  # skip_init: no random initialisation, so the global RNG is untouched
                dense = torch.nn.utils.skip_init(nn.Linear, child.in_features, child.out_features,
                                                 bias=child.bias is not None, **placement)
            elif isinstance(child, NF4Conv2d):
                dense = torch.nn.utils.skip_init(nn.Conv2d, child.in_channels, child.out_channels, child.kernel_size,
                                                 child.stride, child.padding, child.dilation, child.groups,
                                                 bias=child.bias is not None, **placement)
            with torch.no_grad():
                dense.weight.copy_(child.dequantize())
                if child.bias is not None:
                    dense.bias.copy_(child.bias)
            dense.requires_grad_(False)
            setattr(parent, name, dense)


# -- footprints and the memory model --------------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """Parameter counts of one frozen model: those NF4 would store, the rest, and the LoRA weights it will get."""

    quantizable: int
    other: int
    adapter: int

    def weight_bytes(self, compute_bytes: int, quantized: bool) -> float:
        """Bytes the frozen weights take on the device (plus the fp32 adapter with grads and AdamW state)."""
        frozen = (self.quantizable * NF4_BYTES_PER_WEIGHT if quantized else self.quantizable * compute_bytes)
        return frozen + self.other * compute_bytes + self.adapter * 16


def footprint(model: nn.Module, targets: tuple[str, ...] = (), rank: int = 0) -> Footprint:
    """Count `model`'s parameters by how the low-memory profile would store them, and its LoRA size."""
    quantizable = other = adapter = 0
    for name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        if isinstance(module, (nn.Linear, nn.Conv2d)) and _quantizable(module):
            quantizable += module.weight.numel()
            other += sum(p.numel() for n, p in module.named_parameters(recurse=False) if n != "weight")
        else:
            other += sum(p.numel() for p in direct)
        if rank and isinstance(module, (nn.Linear, nn.Conv2d)) and any(
                name == t or name.endswith("." + t) for t in targets):
            fan_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            fan_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            adapter += rank * (fan_in + fan_out)
    return Footprint(quantizable, other, adapter)


@dataclass(frozen=True)
class MemoryModel:
    """Peak-memory coefficients for the SD v1 UNet, per training sample at 512 px with a 16-bit compute dtype.

    Fitted to `scripts/bench_train.py` on an H100 (BENCHMARKS.md: R1/R2/R3 under plain, fast, fast with
    checkpointing and low-memory): every prediction 0.02-0.21 GiB above the measured loop peak, never below.
    Activations scale with the number of latent pixels and double with fp32 compute; a CUDA graph's private
    pool adds a constant plus a fifth of the activations.
    """

    full_per_sample: float = 0.96 * GIB  # no gradient checkpointing
    checkpointed_per_sample: float = 0.20 * GIB  # diffusers' per-block checkpointing, transients included
    text_encoder_per_sample: float = 0.02 * GIB  # a trained CLIP text encoder's activations (77 tokens)
    graph_fixed: float = 0.08 * GIB
    graph_activation_fraction: float = 0.2
    fixed: float = 0.15 * GIB  # cached latents, prompt ids, cuBLAS/cuDNN workspaces, allocator slack


DEFAULT_MEMORY_MODEL = MemoryModel()


# -- plans ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecutionPlan:
    """How the recipe runs: the same maths (up to NF4 storage of the frozen base), different speed and memory."""

    profile: str  # plain | fast | low-memory
    cuda_graph: bool = False
    quantize: str | None = None  # "nf4" or None
    gradient_checkpointing: bool = False
    compile: bool = False
    channels_last: bool = False  # the frozen bf16 UNet's convolutions in NHWC (fast profile on CUDA)
    fused_adapters: bool = True  # plain LoRA layers: one autograd node each under autocast (adapters/fused_lora.py)
    fused_base_linear: bool = True  # with fused_adapters: a frozen torch Linear base computed in that node too
    # with fused_adapters: weight gradients added by their matmuls into the graph's static buffers (no DDP hooks)
    adapter_grads_in_place: bool = False
    # with fused_adapters and fused_base_linear: a UNet attention layer's q, k, v (cross-attention: k, v) LoRA
    # projections as one node, two matmuls forward (adapters/fused_projections.py): +9.7% R2 it/s on an H100.
    # Under a graph only, which replays its per-layer host checks for free
    fused_qkv: bool = False
    # the same for a trained text encoder's q, k, v projections (CLIP attention)
    fused_text_qkv: bool = False
    # with channels_last: GroupNorm in NHWC too (kernels/group_norm.py); only under a graph, which replays its
    # Triton launches without their host cost
    channels_last_norms: bool = False
    # with channels_last_norms: each ResnetBlock2D norm and its SiLU as one kernel, no division by a scale of 1
    resnet_norms_with_silu: bool = True
    # GEGLU's gate as one Triton kernel each way (kernels/geglu.py); under a graph only, as the norms
    fused_geglu: bool = False
    # with channels_last: the transformer blocks hand NHWC tokens to their 1x1 proj_out (kernels/layouts.py)
    channels_last_outputs: bool = True
    # scaled-dot-product backend of the self-attention at the UNet's full latent resolution (kernels/attention.py);
    # "cudnn" on CUDA (fast, low-memory): +7% R2 it/s on an H100 for one shape's plans
    top_attention: str = "flash"
    top_attention_levels: int = 1  # resolution levels routed, from the full one down
    top_attention_cross: bool = False  # their cross-attention too
    predicted_bytes: float | None = None
    reasons: tuple[str, ...] = field(default=(), compare=False)

    def adapter_fusion(self) -> dict[str, bool]:
        """`adapters.inject_adapters`' options for how the fused LoRA layers compute under this plan."""
        return dict(fused=self.fused_adapters, fold_base=self.fused_base_linear,
                    grads_in_place=self.adapter_grads_in_place, fused_qkv=self.fused_qkv,
                    fused_text_qkv=self.fused_text_qkv)

    @property
    def label(self) -> str:
        """Short description, e.g. `low-memory (nf4, checkpointing, cuda graph)`."""
        parts = [p for p, on in (("nf4", self.quantize == "nf4"), ("checkpointing", self.gradient_checkpointing),
                                 ("cuda graph", self.cuda_graph), ("channels-last", self.channels_last),
                                 ("compiled", self.compile)) if on]
        return f"{self.profile} ({', '.join(parts) or 'eager'})"

    def describe(self) -> str:
        """One line for the log: what was chosen, its predicted peak, and why."""
        text = f"profile: {self.label}"
        if self.predicted_bytes is not None:
            text += f", predicted peak {self.predicted_bytes / GIB:.2f} GiB"
        if self.reasons:
            text += "; " + "; ".join(self.reasons)
        return text


def graph_blockers(cfg: TrainConfig, device: torch.device, num_processes: int) -> list[str]:
    """Why a whole-step CUDA graph cannot run this configuration (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append("no CUDA device")
    if cfg.optimizer == "prodigy":
        reasons.append("prodigy reads its step-size estimate on the host every step (.item()), which a CUDA graph "
                       "cannot replay (use adamw for the graph)")
    elif cfg.optimizer != "adamw":
        reasons.append(f"optimizer '{cfg.optimizer}' is not captured (use adamw)")
    if getattr(cfg, "pivotal", False):
        reasons.append("--pivotal: the identifier's embedding row (a forward hook on the text encoder's embedding) "
                       "has not been validated under CUDA-graph capture yet, so the step runs eagerly")
    return reasons


def graph_paths(cfg: TrainConfig, num_processes: int) -> list[str]:
    """How the graph runs this configuration: fp16 loss scaling, processes, accumulation (empty: one whole step)."""
    paths = []
    if cfg.mixed_precision == "fp16":
        paths.append("fp16 loss scaling on the device (GradScaler's rules, skipped steps counted there)")
    if num_processes > 1:
        paths.append(f"{num_processes} processes: forward+backward captured, one all-reduce of the flat LoRA "
                     f"gradients, then the captured optimizer step")
    if cfg.gradient_accumulation > 1:
        paths.append(f"gradient accumulation: {cfg.gradient_accumulation} replays into static gradients, "
                     f"one optimizer step")
    return paths


def predict_peak_bytes(cfg: TrainConfig, unet: Footprint, text_encoder: Footprint | None, *, quantized: bool,
                       checkpointing: bool, cuda_graph: bool, model: MemoryModel = DEFAULT_MEMORY_MODEL) -> float:
    """Predicted `torch.cuda.max_memory_allocated` of the training loop (setup's VAE encoding not included)."""
    compute_bytes = 4 if cfg.mixed_precision == "no" else 2
    samples = cfg.batch_size * (2 if cfg.prior and cfg.prior_weight > 0 else 1)
    pixels = samples * (cfg.resolution / 512) ** 2 * (compute_bytes / 2)
    per_sample = model.checkpointed_per_sample if checkpointing else model.full_per_sample
    activations = per_sample * pixels
    total = unet.weight_bytes(compute_bytes, quantized) + activations + model.fixed
    if text_encoder is not None:
        total += text_encoder.weight_bytes(compute_bytes, quantized) + model.text_encoder_per_sample * samples
    if cuda_graph:
        total += model.graph_fixed + model.graph_activation_fraction * activations
    return total


def choose_plan(cfg: TrainConfig, *, device: torch.device, num_processes: int, unet: Footprint,
                text_encoder: Footprint | None, free_bytes: int | None = None,
                model: MemoryModel = DEFAULT_MEMORY_MODEL) -> ExecutionPlan:
    """Resolve `--profile` (and `--max-vram`) into a plan; `text_encoder` is None when its outputs are cached.

    `auto` picks the fastest candidate predicted to fit `--max-vram`, or 90% of the device's free memory, on
    CUDA; plain on a CPU. `fast` and `low-memory` are taken as asked, without a graph where one cannot run.
    """
    blockers = graph_blockers(cfg, device, num_processes)
    graph_ok = not blockers
    budget = parse_size(cfg.max_vram) if cfg.max_vram else None  # TrainConfig allows it with profile auto only

    def plan(profile: str, quantized: bool, checkpointing: bool, graph: bool, reasons: list[str]) -> ExecutionPlan:
        peak = predict_peak_bytes(cfg, unet, text_encoder, quantized=quantized, checkpointing=checkpointing,
                                  cuda_graph=graph, model=model) if device.type == "cuda" else None
        return ExecutionPlan(profile, cuda_graph=graph, quantize="nf4" if quantized else None,
                             gradient_checkpointing=checkpointing, compile=cfg.compile and profile != "plain",
                             channels_last=profile == "fast" and device.type == "cuda", predicted_bytes=peak,
                             channels_last_norms=graph, fused_geglu=graph, adapter_grads_in_place=graph,
                             fused_qkv=graph, fused_text_qkv=graph,
                             reasons=tuple(reasons),
                             top_attention="cudnn" if profile != "plain" and device.type == "cuda" else "flash")

    graph_notes = [f"no CUDA graph: {', '.join(blockers)}"] if blockers else graph_paths(cfg, num_processes)
    if cfg.profile == "plain" or (cfg.profile == "auto" and device.type != "cuda"):
        why = ["the eager reference path"] if cfg.profile == "plain" else ["auto on a machine without CUDA"]
        if cfg.compile:
            why.append("--compile ignored: the plain path is the uncompiled reference")
        return plan("plain", False, cfg.gradient_checkpointing, False, why)
    if cfg.profile == "fast":
        return plan("fast", False, cfg.gradient_checkpointing, graph_ok, ["as asked"] + graph_notes)
    if cfg.profile == "low-memory":
        return plan("low-memory", True, True, graph_ok, ["as asked"] + graph_notes)
    return _auto_plan(plan, budget, free_bytes, graph_ok, graph_notes)


def _auto_plan(plan: Any, budget: int | None, free_bytes: int | None, graph_ok: bool, graph_notes: list[str]
               ) -> ExecutionPlan:
    """The fastest candidate whose predicted peak fits the budget; the leanest one (with a warning) if none."""
    if budget is None and free_bytes is not None:
        budget, source = int(free_bytes * 0.9), f"90% of the GPU's free {free_bytes / GIB:.1f} GiB"
    else:
        source = f"--max-vram {budget / GIB:.2f} GiB" if budget is not None else "no budget known"
    candidates = [("fast", False, False, graph_ok), ("fast", False, True, graph_ok),
                  ("low-memory", True, True, graph_ok), ("low-memory", True, True, False)]
    seen, options = set(), []
    for candidate in candidates:
        if candidate not in seen:
            seen.add(candidate)
            options.append(plan(*candidate, []))
    tried = ", ".join(f"{o.label} {o.predicted_bytes / GIB:.2f} GiB" for o in options)
    for option in options:
        if budget is None or option.predicted_bytes <= budget:
            why = [f"fastest predicted to fit {source}", f"candidates: {tried}"] + graph_notes
            return ExecutionPlan(**{**option.__dict__, "reasons": tuple(why)})
    leanest = options[-1]
    log.warning("no profile is predicted to fit %s (leanest: %s at %.2f GiB); trying it anyway", source,
                leanest.label, leanest.predicted_bytes / GIB)
    why = [f"nothing predicted to fit {source}", f"candidates: {tried}"] + graph_notes
    return ExecutionPlan(**{**leanest.__dict__, "reasons": tuple(why)})


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def plan_for_base(cfg: TrainConfig, base: Any, *, device: torch.device, num_processes: int,
                  free_bytes: int | None = None) -> ExecutionPlan:
    """Resolve --profile / --max-vram for this base on this device (what runs: CUDA graph, NF4 base, checkpointing),
    for `free_bytes` free on it (default: as free now)."""
    unet = footprint(base.unet, cfg.unet_target_modules, cfg.rank)
    te = footprint(base.text_encoder, cfg.text_encoder_target_modules, cfg.rank) if cfg.train_text_encoder else None
    free = free_bytes if free_bytes is not None else device_free_bytes(device)
    return choose_plan(cfg, device=device, num_processes=num_processes, unet=unet, text_encoder=te, free_bytes=free)


def place_frozen_models(unet: nn.Module, text_encoder: nn.Module | None, plan: ExecutionPlan, *,
                        device: torch.device, dtype: torch.dtype) -> None:
    """Put the frozen base where the plan runs it: NF4-quantized layer by layer from the CPU copy (the
    full-precision model never lands on the device), or cast to the compute dtype, whose norm layers then compute in
    it under autocast too (`norms_compute_in_weight_dtype`: 11% faster R2 steps on an H200). Then what the plan
    asks for (BENCHMARKS.md has each one's measurements):
    - NHWC convolutions (~8% on an H100), with the transformer blocks' outputs kept NHWC
      (`keep_transformer_outputs_channels_last`) and, under a graph, GroupNorm in NHWC (`use_channels_last_group_norm`,
      +15% on an H200): no layout copies between the blocks; the resnet blocks' norms then apply their SiLU
      (`fuse_resnet_norm_activations`);
    - under a graph, GEGLU's gate in one kernel each way (`use_fused_geglu`);
    - on a GPU, cuDNN's attention for the full-resolution self-attention (`route_attention`, +7% on an H100).

    Kernels that :func:`start_kernel_compiles` began compiling are waited for first.
    """
    waited = wait_for_compiles()
    if waited >= 0.1:  # a machine's first run: the compile outlasted the loading it overlapped
        log.info("waited %.1f s for the Triton kernels to compile", waited)
    for model in (unet, text_encoder):
        if model is None:
            continue
        if plan.quantize:
            quantize_frozen(model, compute_dtype=dtype, device=device)
        else:
            model.to(device, dtype)
        norms_compute_in_weight_dtype(model)
        if model is unet:
            _use_plan_kernels(unet, plan, dtype)


# auto picks a plan that runs the kernels (fast, with or without checkpointing) wherever this much is free: SD v1's
# R2 at 512 px is predicted at 2.6-4.4 GiB, and the low-memory plan (no kernels) only goes below that
LIKELY_FAST_FREE_BYTES = 8 * GIB


def placed_unquantized_likely(cfg: TrainConfig, device: torch.device, free_bytes: int | None) -> bool:
    """Whether the plan will put the base on the GPU as it is (not NF4), judged before the base's shapes are known:
    the fast or plain profile asked for, or auto with at least `LIKELY_FAST_FREE_BYTES` free (or allowed by
    --max-vram)."""
    if device.type != "cuda" or cfg.profile == "low-memory":
        return False
    if cfg.profile in ("fast", "plain"):
        return True
    budget = parse_size(cfg.max_vram) if cfg.max_vram else free_bytes
    return budget is not None and budget >= LIKELY_FAST_FREE_BYTES


def kernels_likely(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, num_processes: int,
                   free_bytes: int | None) -> bool:
    """Whether the plan will run the Triton kernels, judged before the base's shapes are known: a fast plan in a
    16-bit dtype under a CUDA graph (:func:`placed_unquantized_likely`, not the plain profile)."""
    if cfg.profile == "plain" or dtype not in LOW_PRECISION or graph_blockers(cfg, device, num_processes):
        return False
    return placed_unquantized_likely(cfg, device, free_bytes)


def start_likely_kernel_compiles(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, num_processes: int,
                                 free_bytes: int | None) -> None:
    """Begin compiling the Triton kernels before planning when the plan will surely run them
    (:func:`kernels_likely`, for `free_bytes` free on the GPU): the library imports that planning needs take seconds
    on a GPU host, and a first run's compile then overlaps them too. A wrong guess costs a compile in the background;
    a missed one is started by :func:`start_kernel_compiles`."""
    if kernels_likely(cfg, device, dtype, num_processes, free_bytes):
        compile_in_background(device, dtype, norms=True, geglu=True)


def start_kernel_compiles(plan: ExecutionPlan, device: torch.device, dtype: torch.dtype) -> ExecutionPlan:
    """Begin compiling the Triton kernels `plan` runs (NHWC GroupNorm, GEGLU) in another process on a GPU, so that
    a machine's first run compiles them while the base loads and class images are made (:func:`place_frozen_models`
    waits for them); returns `plan`."""
    if plan.channels_last and dtype in LOW_PRECISION:  # where the NHWC norms can run (the fast profile)
        compile_in_background(device, dtype, norms=plan.channels_last_norms, geglu=plan.fused_geglu)
    return plan


def _use_plan_kernels(unet: nn.Module, plan: ExecutionPlan, dtype: torch.dtype) -> None:
    if plan.channels_last:
        unet.to(memory_format=torch.channels_last)
        if plan.channels_last_outputs:
            keep_transformer_outputs_channels_last(unet)
        if plan.channels_last_norms:
            use_channels_last_group_norm(unet)
            if plan.resnet_norms_with_silu:
                fuse_resnet_norm_activations(unet)
    if plan.fused_geglu:
        use_fused_geglu(unet, dtype)
    route_attention(unet, plan.top_attention, levels=plan.top_attention_levels, cross=plan.top_attention_cross)
