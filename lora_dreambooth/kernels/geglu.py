"""GEGLU's gate in one Triton kernel each way: `value * gelu(gate)` straight from the projection's output.

diffusers' `GEGLU` splits its projection's output with `chunk` (two strided views), runs GELU on the gate and
multiplies: two strided elementwise kernels forward, and backward the GELU gradient, two products and a `cat` of
the two halves' gradients. In one R2 training step on an H100 that was about 1.5 ms over SD v1's 16 feed-forward
layers (BENCHMARKS.md, twelfth pass). Here the forward reads the projection's output once and writes the product;
the backward writes the projection's whole gradient in one pass. GELU is the exact (erf) one, `F.gelu`'s default;
arithmetic in fp32, each output rounded once to the input's dtype.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from lora_dreambooth.kernels._patching import error_line, install_forward

BLOCK = 1024  # output elements per program


def supports(projected: torch.Tensor) -> bool:
    """Whether the kernels take `projected` (GEGLU's projection output): a contiguous CUDA tensor with an even last
    dimension, and Triton importable."""
    return (projected.is_cuda and projected.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and projected.shape[-1] % 2 == 0 and projected.is_contiguous() and _kernels() is not None)


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """`value * F.gelu(gate)` where `value, gate = projected.chunk(2, dim=-1)`. Call :func:`supports` first."""
    return _GEGLU.apply(projected)


def use_fused_geglu(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Let every diffusers `GEGLU` of `model` gate its CUDA projections with :func:`geglu` (any other input takes
    the layer's previous forward); `dtype` is the projections' output dtype (the compute dtype). Returns how many
    layers changed: none when the kernels fail their trial run on the layers' GPU, which is logged once."""
    layers = [m for m in model.modules() if type(m).__name__ == "GEGLU" and isinstance(getattr(m, "proj", None),
                                                                                       torch.nn.Module)]
    weight = next((p for m in layers for p in m.parameters()), None)
    failure = weight is not None and weight.is_cuda and trial_failure(weight.device, dtype)
    return install_forward(layers, _fused_forward, failure, "GEGLU runs diffusers' own gate")


@functools.cache
def trial_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run on `device` in `dtype` (None: forward and backward ran and agreed with
    diffusers' maths). Compiles them on first use on a machine, as the first training step otherwise would."""
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        projected = torch.randn(3, 5, 64, device=device, generator=generator).to(dtype).requires_grad_(True)
        if not supports(projected):
            return "Triton is not importable" if _kernels() is None else "unsupported input"
        out = geglu(projected)
        out.float().square().sum().backward()
        value, gate = projected.detach().float().chunk(2, dim=-1)
        if not torch.allclose(out.float(), value * F.gelu(gate), atol=0.05, rtol=0.05):
            return "its output disagreed with value * gelu(gate)"
        if not torch.isfinite(projected.grad).all():
            return "its gradient is not finite"
    except Exception as error:  # noqa: BLE001 - any compiler or driver error means: use diffusers' own gate
        return error_line(error)
    return None


def _fused_forward(self, hidden_states: torch.Tensor, *args, previous, **kwargs) -> torch.Tensor:
    if args or kwargs or not hidden_states.is_cuda or _kernels() is None:
        return previous(hidden_states, *args, **kwargs)
    projected = self.proj(hidden_states)
    if not supports(projected):
        value, gate = projected.chunk(2, dim=-1)
        return value * self.gelu(gate)
    return geglu(projected)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, projected: torch.Tensor) -> torch.Tensor:
        k = _kernels()
        rows, width = projected.numel() // projected.shape[-1], projected.shape[-1] // 2
        out = projected.new_empty(*projected.shape[:-1], width)
        total = rows * width
        k.geglu_forward[(_cdiv(total, BLOCK),)](projected, out, total, width, BLOCK=BLOCK)
        ctx.save_for_backward(projected)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (projected,) = ctx.saved_tensors
        k = _kernels()
        grad_out = grad_out.contiguous()
        width = projected.shape[-1] // 2
        total = grad_out.numel()
        grad = torch.empty_like(projected)
        k.geglu_backward[(_cdiv(total, BLOCK),)](projected, grad_out, grad, total, width, BLOCK=BLOCK)
        return grad


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernels():
    """The Triton kernels, compiled on first use (None where Triton is missing, as on CPU-only torch builds)."""
    try:
        from lora_dreambooth.kernels import _geglu_triton
    except ImportError:
        return None
    return _geglu_triton
