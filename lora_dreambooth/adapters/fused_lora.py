"""peft's LoRA linear layers computing their update as one autograd node under autocast: fewer kernels a step.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under autocast a multiply and an add over the
whole output in the forward pass, their gradients in the backward pass, and each weight gradient made in 16 bits,
then cast to the fp32 master weight's dtype. :class:`LoraUpdate` computes `base(x) + scale * (x A^T) B^T` with
the product added inside the second matmul (`addmm`) and writes the weight gradients straight in fp32 (`out_dtype`
on CUDA). Measured on an H100 (BENCHMARKS.md, issue 16): one R2 training step ran 5,233 kernels in 35.95 ms of GPU
time instead of 5,937 in 37.50 ms, and the replayed R2 loop 26.59 it/s instead of 25.45 (+4.5%), the same loss
curve to four decimals.

The same maths as peft's layer, rounded in fewer places (the adapter product is added to the base output before it
is rounded to 16 bits, not after). peft still owns the layers, their weights, saving and loading; this only
changes how an eligible layer computes once :func:`fuse_lora_layers` has run. Layers it does not cover (DoRA and
other variants, dropout, several active adapters, merged or disabled adapters, extra call arguments, no autocast)
run peft's own forward.
"""
from __future__ import annotations

import types
from typing import Callable, Iterable

import torch

from lora_dreambooth.kernels import LOW_PRECISION

_OUT_DTYPE_WORKS: dict[str, bool] = {}  # device type -> whether torch.mm(..., out_dtype=) runs there


def _mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`a @ b` as `dtype`: a 16-bit matmul writing fp32 directly where torch can (CUDA), else matmul then cast."""
    if dtype != a.dtype and dtype == torch.float32 and a.dtype in LOW_PRECISION:
        kind = a.device.type
        if _OUT_DTYPE_WORKS.get(kind) is None and not _capturing():
            try:
                torch.mm(a[:1, :1], b[:1, :1], out_dtype=torch.float32)
                _OUT_DTYPE_WORKS[kind] = True
            except (RuntimeError, NotImplementedError, TypeError):
                _OUT_DTYPE_WORKS[kind] = False
        if _OUT_DTYPE_WORKS.get(kind):
            return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(dtype)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LoraUpdate(torch.autograd.Function):
    """`result + scale * (x @ weight_a.T) @ weight_b.T`, computed in `result`'s (16-bit) dtype.

    `result` is the base layer's output; `weight_a` (r, in) and `weight_b` (out, r) are the adapter's fp32 master
    weights, which receive fp32 gradients.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scale: float) -> torch.Tensor:
        dtype = result.dtype
        with torch.autocast(result.device.type, enabled=False):
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            xa = torch.mm(x2, a.t())
            out = torch.addmm(result.reshape(-1, result.shape[-1]), xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.weight_dtypes = (weight_a.dtype, weight_b.dtype)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, xa, a, b = ctx.saved_tensors
        scale = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        gb = torch.mm(g, b)  # (N, r)
        if scale != 1.0:
            gb = gb * scale
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(gb, a).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_a = _mm_out(gb.t(), x2, ctx.weight_dtypes[0])
        if ctx.needs_input_grad[3]:
            grad_b = _mm_out(g.t(), xa, ctx.weight_dtypes[1])
            if scale != 1.0:
                grad_b.mul_(scale)
        return grad_out, grad_x, grad_a, grad_b, None


def _plain_lora_linear(module: torch.nn.Module) -> bool:
    """A peft LoRA Linear whose adapters are all plain LoRA (no variant, no bias, no dropout)."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or getattr(module, "fan_in_fan_out", False):
        return False
    return all(name not in module.lora_variant and isinstance(module.lora_dropout[name], torch.nn.Identity)
               and module.lora_A[name].bias is None and module.lora_B[name].bias is None
               for name in module.lora_A.keys())


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `Linear.forward` for one active plain adapter under autocast, as a :class:`LoraUpdate`."""
    active = self.active_adapters
    device_type = x.device.type
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A
            or not torch.is_autocast_enabled(device_type)):
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    if result.dtype not in LOW_PRECISION:
        return type(self).forward(self, x)
    return LoraUpdate.apply(result, x, self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name]))


def fuse_lora_layers(models: Iterable[torch.nn.Module | None]) -> Callable[[], None]:
    """From now on, every plain peft LoRA Linear layer of `models` computes through :class:`LoraUpdate` whenever it
    runs under autocast; returns a function that gives the layers peft's forward back.

    Installed for the whole run, not per forward: a checkpointed block recomputes its forward during the backward
    pass, which must save the same tensors as the first time.
    """
    layers = [m for model in models if model is not None for m in model.modules()
              if _plain_lora_linear(m) and "forward" not in m.__dict__]  # a layer someone else patched stays as is
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)

    def restore() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        layers.clear()

    return restore
