"""peft's LoRA linear layers computing their update as one autograd node under autocast: fewer kernels a step.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under autocast a multiply and an add over the
whole output in the forward pass, their gradients in the backward pass, and each weight gradient made in 16 bits,
then cast to the fp32 master weight's dtype. :class:`LoraUpdate` computes `base(x) + scale * (x A^T) B^T` with
the product added inside the second matmul (`addmm`) and writes the weight gradients straight in fp32 (`out_dtype`
on CUDA). Measured on an H100 (BENCHMARKS.md, issue 16): one R2 training step ran 5,233 kernels in 35.95 ms of GPU
time instead of 5,937 in 37.50 ms, and the replayed R2 loop 26.59 it/s instead of 25.45 (+4.5%), the same loss
curve to four decimals. Where the base layer is a frozen `torch.nn.Linear` (not a quantized one),
:class:`LoraLinear` computes the base product in the same node too, so the input's gradient needs no separate add of
the two paths' gradients.

The same maths as peft's layer, rounded in fewer places (the adapter product is added to the base output before it
is rounded to 16 bits, not after). peft still owns the layers, their weights, saving and loading; this only
changes how an eligible layer computes once :func:`fuse_lora_layers` has run. Layers it does not cover (DoRA and
other variants, dropout, several active adapters, merged or disabled adapters, extra call arguments, no autocast)
run peft's own forward.
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Callable, Iterable, Iterator

import torch

from lora_dreambooth.kernels import LOW_PRECISION

CASTS_ATTRIBUTE = "_lora_adapter_casts"  # the attribute under which a fused model keeps its AdapterCasts
_OUT_DTYPE_WORKS: dict[str, bool] = {}  # device type -> whether torch.mm(..., out_dtype=) runs there
_ADD_INTO_WORKS: dict[str, bool] = {}  # device type -> whether torch.addmm(..., out_dtype=, out=) accumulates there


def mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def weight_grad(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
                 into_grad: bool) -> torch.Tensor | None:
    """`scale * left @ right`, the gradient of the fp32 master `weight`, from 16-bit factors.

    With `into_grad`, where `weight.grad` already is an fp32 buffer (the CUDA graph's static gradients), the
    matmul adds into it itself (`addmm`, beta 1) and None is returned: autograd then has nothing to accumulate,
    which saves one add kernel per adapter weight and step. Otherwise the gradient is returned, for autograd.
    """
    grad = bound_grad(weight, into_grad)
    if grad is not None:
        if _add_into_works(grad.device.type) and left.dtype in LOW_PRECISION:
            torch.addmm(grad, left, right, out_dtype=torch.float32, alpha=scale, out=grad)
        else:  # the same maths where the fused kernel is missing (CPU): fp32 products of the 16-bit values
            grad.addmm_(left.to(grad.dtype), right.to(grad.dtype), alpha=scale)
        return None
    return scaled_mm_out(left, right, weight.dtype, scale)


def scaled_mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """`scale * a @ b` as `dtype` (:func:`mm_out`, then scaled in place unless `scale` is 1)."""
    result = mm_out(a, b, dtype)
    if scale != 1.0:
        result.mul_(scale)
    return result


def bound_grad(weight: torch.Tensor, into_grad: bool) -> torch.Tensor | None:
    """`weight`'s `.grad` where a gradient may be added into it in place (with `into_grad`, an existing contiguous
    fp32 buffer of its shape, as the graph's static gradients are), else None."""
    grad = weight.grad if into_grad else None
    if grad is not None and grad.dtype == torch.float32 and grad.is_contiguous() and grad.shape == weight.shape:
        return grad
    return None


def _add_into_works(kind: str) -> bool:
    """Whether a 16-bit `addmm` accumulates into its fp32 `out` correctly on this device type (tried once, outside
    a graph capture; during one before any trial, the portable path runs)."""
    if _ADD_INTO_WORKS.get(kind) is None and not _capturing():
        try:
            total = torch.zeros(2, 3, device=kind)
            left = torch.ones(2, 4, device=kind, dtype=torch.bfloat16)
            right = torch.ones(4, 3, device=kind, dtype=torch.bfloat16)
            for _ in range(2):  # 0 + 0.5 * 4, then + 0.5 * 4: accumulated in place, scaled
                torch.addmm(total, left, right, out_dtype=torch.float32, alpha=0.5, out=total)
            _ADD_INTO_WORKS[kind] = bool((total == 4.0).all())
        except (RuntimeError, NotImplementedError, TypeError):
            _ADD_INTO_WORKS[kind] = False
    return bool(_ADD_INTO_WORKS.get(kind))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LoraUpdate(torch.autograd.Function):
    """`result + scale * (x @ weight_a.T) @ weight_b.T`, computed in `result`'s (16-bit) dtype.

    `result` is the base layer's output; `weight_a` (r, in) and `weight_b` (out, r) are the adapter's fp32 master
    weights, which receive fp32 gradients; `cast`, when given, their values in `result`'s dtype.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                scale: float, cast: tuple[torch.Tensor, torch.Tensor] | None = None,
                into_grad: bool = False) -> torch.Tensor:
        dtype = result.dtype
        with torch.autocast(result.device.type, enabled=False):
            a, b = cast if cast is not None else (weight_a.to(dtype), weight_b.to(dtype))
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            xa = torch.mm(x2, a.t())
            out = torch.addmm(result.reshape(-1, result.shape[-1]), xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, a, b)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.weights, ctx.into_grad = (weight_a, weight_b), into_grad
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, xa, a, b = ctx.saved_tensors
        scale, (weight_a, weight_b) = ctx.scale, ctx.weights
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        gb = torch.mm(g, b)  # (N, r)
        if scale != 1.0:
            gb = gb * scale
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.mm(gb, a).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_a = weight_grad(weight_a, gb.t(), x2, 1.0, ctx.into_grad)
        if ctx.needs_input_grad[3]:
            grad_b = weight_grad(weight_b, g.t(), xa, scale, ctx.into_grad)
        return grad_out, grad_x, grad_a, grad_b, None, None, None


class LoraLinear(torch.autograd.Function):
    """`x @ weight.T + bias + scale * (x @ weight_a.T) @ weight_b.T` in `dtype`: the frozen base linear and the
    adapter as one node.

    The same kernels as a :class:`LoraUpdate` after the base layer, less one: the input's gradient is one matmul
    plus one with accumulation (`addmm`) instead of two matmuls and an add of the base path's and the adapter
    path's gradients. `weight` and `bias` are the base layer's frozen parameters; `weight_a` and `weight_b` the
    adapter's fp32 master weights, which receive fp32 gradients; `cast`, when given, their values in `dtype`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_a: torch.Tensor,
                weight_b: torch.Tensor, scale: float, dtype: torch.dtype,
                cast: tuple[torch.Tensor, torch.Tensor] | None = None, into_grad: bool = False) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype)
            a, b = cast if cast is not None else (weight_a.to(dtype), weight_b.to(dtype))
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            base = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
            xa = torch.mm(x2, a.t())
            out = torch.addmm(base, xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        ctx.weights, ctx.into_grad = (weight_a, weight_b), into_grad
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2, xa, w, a, b = ctx.saved_tensors
        scale, (weight_a, weight_b) = ctx.scale, ctx.weights
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(a.dtype)
        gb = torch.mm(g, b)  # (N, r), the scale applied where it costs least
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addmm(torch.mm(g, w), gb, a, alpha=scale).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = weight_grad(weight_a, gb.t(), x2, scale, ctx.into_grad)
        if ctx.needs_input_grad[4]:
            grad_b = weight_grad(weight_b, g.t(), xa, scale, ctx.into_grad)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def plain_lora_linear(module: torch.nn.Module) -> bool:
    """A peft LoRA Linear whose adapters are all plain LoRA (no variant, no bias, no dropout)."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or getattr(module, "fan_in_fan_out", False):
        return False
    return all(name not in module.lora_variant and isinstance(module.lora_dropout[name], torch.nn.Identity)
               and module.lora_A[name].bias is None and module.lora_B[name].bias is None
               for name in module.lora_A.keys())


class AdapterCasts:
    """The fused layers' adapter weights, and their 16-bit copies made in one multi-tensor copy per forward.

    Cast layer by layer, an SD training step's ~350 adapter weights cost as many small kernels. Within
    :func:`cast_adapters_once`, the first fused layer that runs under autocast copies all of them at once and every
    layer reads its copies. Outside it (a checkpointed block recomputed in the backward pass, validation) each layer
    casts its own weights, as before: a copy is never read after the weights may have changed.
    """

    def __init__(self, weights: list[torch.Tensor]):
        self.weights = weights
        self.copies: dict[torch.dtype, list[torch.Tensor]] = {}
        self.destinations: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        self.armed = False
        self.current: torch.dtype | None = None

    def slot_of(self, weight: torch.Tensor) -> int:
        """Where `weight` is listed (-1: not at all)."""
        return next((i for i, w in enumerate(self.weights) if w is weight), -1)

    def bind(self, slot: int, dtype: torch.dtype, destination: torch.Tensor) -> None:
        """Make the `dtype` copy of the weight at `slot` land in `destination` (a dense tensor of its shape, e.g.
        rows of a stacked weight), so that a layer reading it there needs no copy of its own."""
        self.destinations[(dtype, slot)] = destination
        if dtype in self.copies:
            self.copies[dtype][slot] = destination

    def cast(self, slot: int, weight_a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The copies of the weights at `slot` (A) and `slot + 1` (B) in `dtype`, made now if not yet in this
        forward; None outside :func:`cast_adapters_once` or where the layer's weight is no longer the one listed."""
        if not self.armed or self.weights[slot] is not weight_a:
            return None
        if self.current != dtype:
            copies = self.copies.get(dtype)
            if copies is None:
                copies = self.copies[dtype] = [self._destination(slot, dtype) for slot in range(len(self.weights))]
            with torch.no_grad():
                torch._foreach_copy_(copies, self.weights)
            self.current = dtype
        copies = self.copies[dtype]
        return copies[slot], copies[slot + 1]

    def _destination(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        bound = self.destinations.get((dtype, slot))
        return torch.empty_like(self.weights[slot], dtype=dtype) if bound is None else bound


@contextlib.contextmanager
def cast_adapters_once(models: Iterable[torch.nn.Module | None]) -> Iterator[None]:
    """Within: the fused layers of `models` read 16-bit copies of their adapter weights made once, at the first
    layer (:class:`AdapterCasts`). Use around one forward pass, during which the weights do not change."""
    casts = {id(c): c for m in models if m is not None for c in [getattr(m, CASTS_ATTRIBUTE, None)] if c is not None}
    for c in casts.values():
        c.armed, c.current = True, None
    try:
        yield
    finally:
        for c in casts.values():
            c.armed, c.current = False, None


def _fused_forward(self, x: torch.Tensor, *args, fold_base: bool = True, casts: AdapterCasts | None = None,
                   slot: int = 0, grads_in_place: bool = False, **kwargs) -> torch.Tensor:
    """peft's `Linear.forward` for one active plain adapter under autocast, as a :class:`LoraLinear` (with
    `fold_base`, where the base is a frozen `torch.nn.Linear`) or a :class:`LoraUpdate` after the base layer."""
    device_type = x.device.type
    name = None if args or kwargs else fusable_adapter(self, device_type)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, dtype = self.base_layer, torch.get_autocast_dtype(device_type)
    weight_a, weight_b, scale = self.lora_A[name].weight, self.lora_B[name].weight, float(self.scaling[name])
    cast = casts.cast(slot, weight_a, dtype) if casts is not None and dtype in LOW_PRECISION else None
    if fold_base and dtype in LOW_PRECISION and frozen_plain_linear(base):
        return LoraLinear.apply(x, base.weight, base.bias, weight_a, weight_b, scale, dtype, cast, grads_in_place)
    result = base(x)
    if result.dtype not in LOW_PRECISION:
        return type(self).forward(self, x)
    return LoraUpdate.apply(result, x, weight_a, weight_b, scale, cast if result.dtype == dtype else None,
                            grads_in_place)


def fusable_adapter(layer: torch.nn.Module, device_type: str) -> str | None:
    """The name of `layer`'s one active adapter if the fused nodes can compute it now (not merged, not disabled,
    under autocast on `device_type`), else None: peft's own forward runs."""
    active = layer.active_adapters
    if (layer.disable_adapters or layer.merged or len(active) != 1 or active[0] not in layer.lora_A
            or not torch.is_autocast_enabled(device_type)):
        return None
    return active[0]


def _active_weights(layer: torch.nn.Module) -> list[torch.Tensor]:
    """A and B of the layer's one active adapter (empty where it has several)."""
    active = layer.active_adapters
    return [layer.lora_A[active[0]].weight, layer.lora_B[active[0]].weight] if len(active) == 1 else []


def frozen_plain_linear(module: torch.nn.Module) -> bool:
    """A `torch.nn.Linear` itself (not a quantized or patched one) whose parameters are frozen."""
    return (type(module) is torch.nn.Linear and "forward" not in vars(module) and not module._forward_hooks
            and not module._forward_pre_hooks and not any(p.requires_grad for p in module.parameters()))


def fuse_lora_layers(models: Iterable[torch.nn.Module | None], fold_base: bool = True,
                     grads_in_place: bool = False) -> Callable[[], None]:
    """From now on, every plain peft LoRA Linear layer of `models` computes through :class:`LoraLinear` (with
    `fold_base`, where its base is a frozen `torch.nn.Linear`) or :class:`LoraUpdate` whenever it runs under
    autocast; returns a function that gives the layers peft's forward back.

    With `grads_in_place`, a weight gradient is added by its matmul into the weight's existing fp32 `.grad` (the
    static buffers of a CUDA-graphed step) instead of being handed to autograd to accumulate. Only for a step that
    no gradient hook needs to see, such as DDP's: the recipe turns it on with the graph, which runs without DDP.

    Installed for the whole run, not per forward: a checkpointed block recomputes its forward during the backward
    pass, which must save the same tensors as the first time.
    """
    models = [m for m in models if m is not None]
    layers = [m for model in models for m in model.modules()
              if plain_lora_linear(m) and "forward" not in m.__dict__]  # a layer someone else patched stays as is
    pairs = [_active_weights(layer) for layer in layers]
    casts = AdapterCasts([w for pair in pairs for w in pair]) if any(pairs) else None
    slot = 0  # where the layer's A lies in casts.weights: only layers with one active adapter are listed
    for layer, pair in zip(layers, pairs):
        forward = functools.partial(_fused_forward, fold_base=fold_base, casts=casts if pair else None, slot=slot,
                                    grads_in_place=grads_in_place)
        layer.forward = types.MethodType(forward, layer)
        slot += len(pair)
    for model in models:
        setattr(model, CASTS_ATTRIBUTE, casts)

    def restore() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for model in models:
            model.__dict__.pop(CASTS_ATTRIBUTE, None)
        layers.clear()

    return restore
