"""GroupNorm on channels-last (NHWC) CUDA tensors, in Triton: no layout copies around the norm.

torch's CUDA GroupNorm (up to at least 2.11) takes NCHW: on a channels-last UNet every norm copies its input to
NCHW, returns NCHW, and the next convolution (and each gradient on the way back) copies it to NHWC again. On an
H100 those copies and the strided adds they cause were about 5.2 ms of a 36 ms R2 training step (BENCHMARKS.md,
tenth pass). Here the norm reads and writes the NHWC layout directly, in two kernels forward and two backward:

- each program takes one slice of one group of one image (at most ``BLOCK`` elements) and computes the slice's
  mean and sum of squared deviations (exact, from registers);
- the second kernel combines a group's slices with Chan's parallel formula, normalizes the slice and applies the
  per-channel affine (and optionally SiLU).

Statistics accumulate in fp32 as torch's kernels do for 16-bit inputs; the output is rounded once to the input's
dtype. The backward pass returns only the input's gradient: the norm's own weight and bias are frozen wherever
this runs (:func:`supports` checks it).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from lora_dreambooth.kernels import LOW_PRECISION
from lora_dreambooth.kernels._patching import error_line, install_forward

BLOCK = 2048  # elements of one group a program handles; a group of an SD UNet at 64x64 latents has 40,960


def supports(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether this kernel can normalize `x`: a 4-D channels-last CUDA tensor (not also NCHW-contiguous), frozen
    affine parameters, and Triton importable."""
    if not (x.is_cuda and x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    if any(p is not None and p.requires_grad for p in (weight, bias)):
        return False
    return _kernels() is not None


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = False) -> torch.Tensor:
    """`F.group_norm(x, num_groups, weight, bias, eps)` (then SiLU if `silu`) for a channels-last CUDA `x`, returned
    channels-last in `x`'s dtype. Call :func:`supports` first."""
    return _GroupNormNHWC.apply(x, weight, bias, num_groups, eps, silu)


def use_channels_last_group_norm(model: torch.nn.Module) -> int:
    """Let the frozen 16-bit GroupNorm layers of `model` normalize channels-last CUDA inputs with the NHWC kernel
    (in their weight's dtype, as `adapters.precision.norms_compute_in_weight_dtype` has them compute); any other
    input goes to the layer's previous forward. Returns how many layers changed: none when the kernel fails its
    trial run on the layers' GPU (say, Triton finds no C compiler), which is logged once."""
    norms = [m for m in model.modules() if type(m) is torch.nn.GroupNorm and m.weight is not None
             and m.weight.dtype in LOW_PRECISION]
    failure = norms and norms[0].weight.is_cuda and trial_failure(norms[0].weight.device, norms[0].weight.dtype)
    return install_forward(norms, _channels_last_forward, failure, "GroupNorm runs torch's NCHW kernel")


@functools.cache
def trial_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot run on `device` in `dtype` (None: it ran forward and backward, without and with its
    SiLU, and agreed with torch's GroupNorm). Compiles all its variants on first use on a machine, as the first
    training step otherwise would."""
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(2, 64, 8, 8, device=device, generator=generator).to(dtype)
        x = x.to(memory_format=torch.channels_last).requires_grad_(True)
        weight = torch.ones(64, device=device, dtype=dtype)
        if not supports(x, weight, weight):
            return "Triton is not importable" if _kernels() is None else "unsupported input"
        normalized = F.group_norm(x.detach().float(), 32, eps=1e-5)
        for silu, expected in ((False, normalized), (True, F.silu(normalized))):
            x.grad = None
            y = group_norm_nhwc(x, 32, weight, torch.zeros_like(weight), 1e-5, silu=silu)
            y.float().square().sum().backward()
            if not torch.allclose(y.float(), expected, atol=0.05, rtol=0.05) or not torch.isfinite(x.grad).all():
                return f"its output{' with SiLU' * silu} disagreed with torch's GroupNorm"
    except Exception as error:  # noqa: BLE001 - any compiler or driver error means: use torch's kernel
        return error_line(error)
    return None


def norm_layer_nhwc(norm: torch.nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """The GroupNorm layer `norm` applied to `x` by this kernel (then SiLU if `silu`), in the layer's weight dtype
    whatever autocast says. Call :func:`supports` first."""
    with torch.autocast(x.device.type, enabled=False):
        return group_norm_nhwc(x.to(norm.weight.dtype), norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)


def _channels_last_forward(self: torch.nn.GroupNorm, x: torch.Tensor, *, previous) -> torch.Tensor:
    return norm_layer_nhwc(self, x) if supports(x, self.weight, self.bias) else previous(x)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                eps: float, silu: bool) -> torch.Tensor:
        y, mean, rstd = _forward(x, weight, bias, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)
            grad_x = _backward(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
        return grad_x, None, None, None, None, None


def _geometry(x: torch.Tensor, num_groups: int) -> tuple[int, int, int, int, int]:
    n, c, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {num_groups} groups")
    d = c // num_groups
    count = h * w * d
    splits = -(-count // BLOCK)
    return n, c, d, count, splits


def _affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    """Weight and bias as the kernels read them, per channel in their own dtype (ones and zeros when absent)."""
    w = weight if weight is not None else x.new_ones(x.shape[1])
    b = bias if bias is not None else x.new_zeros(x.shape[1])
    return w, b


def _forward(x, weight, bias, num_groups, eps, silu):
    k = _kernels()
    n, c, d, count, splits = _geometry(x, num_groups)
    w, b = _affine(x, weight, bias)
    partial = torch.empty(n * num_groups, splits, 2, device=x.device, dtype=torch.float32)
    mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    grid = (n * num_groups, splits)
    k.group_norm_moments[grid](x, partial, c, d, count, num_groups, splits, BLOCK=BLOCK)
    k.group_norm_apply[grid](x, y, w, b, partial, mean, rstd, c, d, count, num_groups, splits, eps,
                             BLOCK=BLOCK, CHUNK=k.CHUNK, SILU=silu)
    return y, mean, rstd


def _backward(grad_y, x, weight, bias, mean, rstd, num_groups, silu):
    k = _kernels()
    n, c, d, count, splits = _geometry(x, num_groups)
    w, b = _affine(x, weight, bias)
    partial = torch.empty(n * num_groups, splits, 2, device=x.device, dtype=torch.float32)
    grad_x = torch.empty_like(x)
    grid = (n * num_groups, splits)
    k.group_norm_grad_sums[grid](grad_y, x, w, b, mean, rstd, partial, c, d, count, num_groups, splits,
                                 BLOCK=BLOCK, SILU=silu)
    k.group_norm_grad_input[grid](grad_y, x, grad_x, w, b, mean, rstd, partial, c, d, count, num_groups, splits,
                                  BLOCK=BLOCK, CHUNK=k.CHUNK, SILU=silu)
    return grad_x


@functools.cache
def _kernels():
    """The Triton kernels, compiled on first use (None where Triton is missing, as on CPU-only torch builds)."""
    try:
        from lora_dreambooth.kernels import _group_norm_triton
    except ImportError:
        return None
    return _group_norm_triton
