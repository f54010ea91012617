"""An attention layer's LoRA projections of one input as one autograd node: two matmuls forward instead of 9-12.

A self-attention layer projects its input three times (to_q, to_k, to_v), a cross-attention layer the text states
twice (to_k, to_v); as fused peft LoRA layers (`fused_lora.LoraLinear`) each costs a base matmul, an adapter
matmul and an `addmm`, and in the backward pass autograd adds the input's gradients of the three. Here the frozen
base weights and the adapters' A matrices are stacked into one weight, so that one matmul `x @ [W_1; ..; W_k;
A_1; ..; A_k]^T` gives every base output and every `x A_i^T`, and one batched matmul adds `s (x A_i^T) B_i^T` to
each output in place; the outputs are column slices of that result (as diffusers' `FusedAttnProcessor2_0` splits
its fused projection). The base weights become views of the stacked one (no second copy); the A rows and the B
matrices are refreshed from the fp32 masters by the one multi-tensor copy of `AdapterCasts` (or by the node itself
outside `cast_adapters_once`).

:func:`fuse_attention_projections` gives diffusers' attention layers a processor that computes this way while the
projections are plain fused LoRA layers in their plain state (one active adapter, not merged, not disabled, under
autocast in the base weights' dtype); otherwise diffusers' path runs. It keeps a backend order that
`kernels.attention.route_attention` gave the layer, and route_attention keeps the processor.
:func:`fuse_text_projections` does the same for a trained CLIP text encoder's q, k, v projections (with their
biases), which its attention calls one after the other on one input: at 154 tokens their small matmuls cost more in
launches than in work.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lora_dreambooth.adapters.fused_lora import (CASTS_ATTRIBUTE, AdapterCasts, bound_grad, frozen_plain_linear,
                                                 fusable_adapter, mm_out, plain_lora_linear, scaled_mm_out,
                                                 weight_grad)
from lora_dreambooth.kernels import LOW_PRECISION
from lora_dreambooth.kernels.attention import preferred_backend_processor

ROW_MULTIPLE = 8  # the stacked weight's row count is padded to it: tensor-core friendly output width

SELF_PROJECTIONS = ("to_q", "to_k", "to_v")
CROSS_PROJECTIONS = ("to_k", "to_v")  # they share the text states; to_q projects the image tokens on its own


@dataclass(eq=False)
class StackedProjections:
    """k LoRA linears of one input as one stacked weight: rows [W_1; ..; W_k] (the frozen base weights, whose
    layers now hold views of them), [A_1; ..; A_k] (refreshed each forward), zero padding; `b` stacks B_i (k, C, r);
    `bias`, where the base layers have one, [b_1; ..; b_k] then zeros, the base biases views of it too."""

    layers: list[torch.nn.Module]
    name: str  # the adapter
    stacked: torch.Tensor
    b: torch.Tensor
    masters: tuple[torch.Tensor, ...]  # A_1..A_k, B_1..B_k: the fp32 parameters
    casts: AdapterCasts | None
    slots: list[int]  # each layer's A slot in `casts`
    base_pointers: list[int]  # where each layer's base weight (then bias) lies in `stacked` (`bias`)
    bias: torch.Tensor | None = None
    copies: list[torch.Tensor] = field(init=False)  # where the masters' 16-bit values go: the A rows, the B

    def __post_init__(self):
        self.copies = list(self.a_rows().split(self.rank)) + list(self.b.unbind(0))

    @property
    def count(self) -> int:
        return len(self.layers)

    @property
    def out_features(self) -> int:
        return self.b.shape[1]

    @property
    def rank(self) -> int:
        return self.b.shape[2]

    def a_rows(self) -> torch.Tensor:
        start = self.count * self.out_features
        return self.stacked[start:start + self.count * self.rank]

    def scale(self, device_type: str) -> float | None:
        """The adapters' common scale if the stacked node can compute these layers now, else None."""
        dtype = self.stacked.dtype
        if torch.get_autocast_dtype(device_type) != dtype or not torch.is_autocast_enabled(device_type):
            return None
        scales = set()
        for index, layer in enumerate(self.layers):
            if ("forward" not in vars(layer) or fusable_adapter(layer, device_type) != self.name
                    or layer.lora_A[self.name].weight is not self.masters[index]
                    or layer.lora_B[self.name].weight is not self.masters[self.count + index]
                    or _base_pointers(layer.base_layer) != self.base_pointers[index]):
                return None  # changed since install: another adapter, peft's forward back, weights moved or recast
            scales.add(float(layer.scaling[self.name]))
        return scales.pop() if len(scales) == 1 else None

    def refreshed_by_casts(self) -> bool:
        """Whether `AdapterCasts` wrote this forward's 16-bit adapter values into place (inside cast_adapters_once)."""
        if self.casts is None:
            return False
        dtype, copies = self.stacked.dtype, self.copies
        for index, slot in enumerate(self.slots):
            pair = self.casts.cast(slot, self.masters[index], dtype)
            if pair is None or pair[0] is not copies[index] or pair[1] is not copies[self.count + index]:
                return False
        return True

    def __call__(self, x: torch.Tensor, into_grad: bool) -> tuple[torch.Tensor, ...] | None:
        """The k outputs for input `x`, or None where the layers must compute on their own now."""
        scale = self.scale(x.device.type)
        if scale is None:
            return None
        fresh = self.refreshed_by_casts()
        return StackedLoraLinears.apply(x, self, scale, fresh, into_grad, *self.masters)


class StackedLoraLinears(torch.autograd.Function):
    """`x @ W_i^T + s * (x @ A_i^T) @ B_i^T` for the k layers of a :class:`StackedProjections`, as k outputs.

    Forward: one matmul with the stacked weight, one batched matmul adding the adapter products in place. Backward:
    one concatenation of the k output gradients, one batched matmul (`g_i B_i`), the input's gradient as one matmul
    plus one accumulating matmul, the A gradients as one matmul, the B gradients as one matmul each; fp32 weight
    gradients added into bound `.grad` buffers with `into_grad` (as `fused_lora.weight_grad`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: StackedProjections, scale: float, fresh: bool, into_grad: bool,
                *masters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count, width, rank = layout.count, layout.out_features, layout.rank
        with torch.autocast(x.device.type, enabled=False):
            if not fresh:  # outside cast_adapters_once (a checkpointed recomputation, validation)
                torch._foreach_copy_(layout.copies, list(masters))
            x2 = x.reshape(-1, x.shape[-1]).to(layout.stacked.dtype)
            y = torch.mm(x2, layout.stacked.t()) if layout.bias is None else torch.addmm(layout.bias, x2,
                                                                                          layout.stacked.t())
            # y (N, rows): every base output, then every x A_i^T
            outputs = y[:, :count * width]
            xa = y[:, count * width:count * (width + rank)]
            outputs.view(-1, count, width).transpose(0, 1).baddbmm_(
                xa.view(-1, count, rank).transpose(0, 1), layout.b.transpose(1, 2), alpha=scale)
        ctx.save_for_backward(x2, xa)
        ctx.layout, ctx.scale, ctx.into_grad, ctx.x_shape, ctx.x_dtype = layout, scale, into_grad, x.shape, x.dtype
        return tuple(o.view(*x.shape[:-1], width) for o in outputs.split(width, dim=1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x2, xa = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        count, width, rank, dtype = layout.count, layout.out_features, layout.rank, x2.dtype
        rows = x2.shape[0]
        grads = [torch.zeros(*ctx.x_shape[:-1], width, dtype=dtype, device=x2.device) if grad is None else grad
                 for grad in grads]  # an unused output's, where autograd does not materialize it
        g = torch.cat(grads, dim=-1).view(rows, count * width).to(dtype)
        gb = x2.new_empty(rows, count * rank)  # g_i B_i side by side, as the A rows are stacked
        torch.bmm(g.view(rows, count, width).transpose(0, 1), layout.b, out=gb.view(rows, count, rank).transpose(0, 1))
        grad_x = None
        if ctx.needs_input_grad[0]:
            base = layout.stacked[:count * width]
            grad_x = torch.mm(g, base).addmm_(gb, layout.a_rows(), alpha=scale).view(ctx.x_shape).to(ctx.x_dtype)
        masters = layout.masters
        grad_a = _stacked_weight_grads(masters[:count], gb.t(), x2, scale, ctx.into_grad) \
            if any(ctx.needs_input_grad[5:5 + count]) else [None] * count
        grad_b = [weight_grad(weight, g[:, i * width:(i + 1) * width].t(), xa[:, i * rank:(i + 1) * rank], scale,
                               ctx.into_grad) if ctx.needs_input_grad[5 + count + i] else None
                  for i, weight in enumerate(masters[count:])]
        return (grad_x, None, None, None, None, *grad_a, *grad_b)


def _stacked_weight_grads(weights: tuple[torch.Tensor, ...], left: torch.Tensor, right: torch.Tensor, scale: float,
                          into_grad: bool) -> list[torch.Tensor | None]:
    """`scale * left @ right` split by rows into the gradients of `weights` (stacked as the A rows are): one matmul
    reading the input once. With `into_grad`, where every weight has an fp32 `.grad` buffer, added into those (one
    multi-tensor add) and None returned; otherwise returned for autograd."""
    rank = weights[0].shape[0]
    buffers = [bound_grad(w, into_grad) for w in weights]
    if all(b is not None for b in buffers):
        torch._foreach_add_(buffers, list(mm_out(left, right, torch.float32).split(rank)), alpha=scale)
        return [None] * len(weights)
    return list(scaled_mm_out(left, right, weights[0].dtype, scale).split(rank))


def _stack(layers: list[torch.nn.Module], casts: AdapterCasts | None) -> StackedProjections | None:
    """The stacked weight of `layers` (plain fused LoRA layers of one active adapter over frozen 16-bit torch Linears,
    all with a bias or none, of equal shapes and ranks), their base weights and biases turned into views of it; None
    where they are not."""
    names = {tuple(layer.active_adapters) for layer in layers}
    if len(names) != 1 or len(next(iter(names))) != 1 or not all(_stackable(layer) for layer in layers):
        return None
    name = next(iter(names))[0]
    bases = [layer.base_layer.weight for layer in layers]
    biases = [layer.base_layer.bias for layer in layers]
    masters = tuple(layer.lora_A[name].weight for layer in layers) + tuple(layer.lora_B[name].weight
                                                                            for layer in layers)
    if (len({(w.shape, w.dtype, w.device) for w in bases}) != 1 or len({a.shape for a in masters[:len(layers)]}) != 1
            or len({b is None for b in biases}) != 1):
        return None
    (width, features), rank = bases[0].shape, masters[0].shape[0]
    rows = -(-len(layers) * (width + rank) // ROW_MULTIPLE) * ROW_MULTIPLE
    stacked = bases[0].new_zeros(rows, features)
    stacked_bias = None if biases[0] is None else bases[0].new_zeros(rows)
    for index, layer in enumerate(layers):
        _view_into(layer.base_layer.weight, stacked[index * width:(index + 1) * width])
        if stacked_bias is not None:
            _view_into(layer.base_layer.bias, stacked_bias[index * width:(index + 1) * width])
    layout = StackedProjections(layers, name, stacked, bases[0].new_zeros(len(layers), width, rank), masters, None,
                                [], [_base_pointers(layer.base_layer) for layer in layers], stacked_bias)
    if casts is not None:
        _bind(layout, casts)
    return layout


def _view_into(param: torch.Tensor, view: torch.Tensor) -> None:
    """Copy the frozen `param` into `view` and make it hold that view from now on (no second copy)."""
    view.copy_(param.detach())
    param.data = view


def _base_pointers(base: torch.nn.Module) -> tuple[int, int]:
    return base.weight.data_ptr(), 0 if base.bias is None else base.bias.data_ptr()


def _bind(layout: StackedProjections, casts: AdapterCasts) -> None:
    """Let `casts` write the 16-bit adapter values straight into the layout's rows (where it lists A and B)."""
    count = layout.count
    slots = [casts.slot_of(a) for a in layout.masters[:count]]
    if not all(slot >= 0 and casts.weights[slot + 1] is layout.masters[count + i] for i, slot in enumerate(slots)):
        return
    for index, slot in enumerate(slots):
        casts.bind(slot, layout.stacked.dtype, layout.copies[index])
        casts.bind(slot + 1, layout.stacked.dtype, layout.copies[count + index])
    layout.casts, layout.slots = casts, slots


def _stackable(layer: torch.nn.Module) -> bool:
    """A plain peft LoRA Linear that `fused_lora` computes (its forward patched) over a frozen 16-bit torch Linear
    (with a bias in the weight's dtype, or none)."""
    base = getattr(layer, "base_layer", None)
    return (plain_lora_linear(layer) and "forward" in vars(layer) and base is not None and frozen_plain_linear(base)
            and base.weight.dtype in LOW_PRECISION and (base.bias is None or base.bias.dtype == base.weight.dtype))


def fuse_attention_projections(model: torch.nn.Module, grads_in_place: bool = False) -> int:
    """Give each diffusers attention layer of `model` whose projections of one input are fused plain LoRA layers
    (run :func:`fused_lora.fuse_lora_layers` first) a processor computing them as one :class:`StackedLoraLinears`
    node: to_q, to_k, to_v in self-attention, to_k and to_v in cross-attention. Returns how many layers changed.

    `grads_in_place` as for fuse_lora_layers. Only layers running diffusers' `AttnProcessor2_0` (or a routed
    subclass of it, whose backend order the new processor keeps) without norms change.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    casts = getattr(model, CASTS_ATTRIBUTE, None)
    changed = 0
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        processor = getattr(attn, "processor", None)
        routed = isinstance(processor, preferred_backend_processor())
        if not (routed or type(processor) is AttnProcessor2_0) or isinstance(processor, _processor_class()) \
                or not _plain_attention(attn):
            continue
        names = CROSS_PROJECTIONS if attn.is_cross_attention else SELF_PROJECTIONS
        layout = _stack([getattr(attn, n) for n in names], casts)
        if layout is not None:
            attn.set_processor(_processor_class()(processor.order if routed else None, layout, grads_in_place))
            changed += 1
    return changed


def _plain_attention(attn: torch.nn.Module) -> bool:
    """An attention layer whose processor does nothing around the projections and the attention but `to_out`."""
    return (attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
            and attn.norm_cross is None and not attn.only_cross_attention and getattr(attn, "to_qkv", None) is None)


@functools.cache
def _processor_class() -> type:
    """The attention processor computing the projections as one node (diffusers is imported on use)."""

    class FusedProjectionsProcessor(preferred_backend_processor()):
        """diffusers' `AttnProcessor2_0` with its projections of one input as one :class:`StackedLoraLinears`
        node, where it can run; diffusers' own path otherwise. Skips the division by a rescale factor of 1."""

        def __init__(self, order, projections: StackedProjections, grads_in_place: bool = False):
            super().__init__(order)
            self.projections, self.grads_in_place = projections, grads_in_place

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            cross = encoder_hidden_states is not None
            projected = None
            if not args and not kwargs and hidden_states.ndim == 3 and cross == attn.is_cross_attention:
                projected = self.projections(encoder_hidden_states if cross else hidden_states, self.grads_in_place)
            if projected is None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        *args, **kwargs)
            query, key, value = (attn.to_q(hidden_states), *projected) if cross else projected
            return self._attend(attn, hidden_states, query, key, value, attention_mask)

        def _attend(self, attn, hidden_states, query, key, value, attention_mask):
            """diffusers' AttnProcessor2_0 from the projections on (for 3-d inputs without norms)."""
            batch, heads = hidden_states.shape[0], attn.heads
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
                attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            head_dim = key.shape[-1] // heads
            query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
            with self.backend():
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                     is_causal=False)
            out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, heads * head_dim)))
            if attn.residual_connection:
                out = out + hidden_states
            if attn.rescale_output_factor != 1.0:
                out = out / attn.rescale_output_factor
            return out

    return FusedProjectionsProcessor


TEXT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # transformers' CLIP attention: three projections of one input


class SharedInput:
    """The stacked projections of a layer that calls them one by one with the same input (transformers' CLIP
    attention: `q_proj(x)`, `k_proj(x)`, `v_proj(x)`): the first call computes all of them as one
    :class:`StackedLoraLinears` node and hands each later call with that very input its output."""

    def __init__(self, layout: StackedProjections, grads_in_place: bool):
        self.layout, self.grads_in_place = layout, grads_in_place
        self.input: torch.Tensor | None = None
        self.version = -1
        self.pending: dict[int, torch.Tensor] = {}

    def forward(self, index: int, x: torch.Tensor, *args, previous, **kwargs) -> torch.Tensor:
        """Projection `index` of `x`; `previous` is the layer's own (fused) forward, for what the node cannot run."""
        if args or kwargs:
            return previous(x, *args, **kwargs)
        if index in self.pending and self.input is x and x._version == self.version:
            output = self.pending.pop(index)
            if not self.pending:
                self.input = None
            return output
        outputs = self.layout(x, self.grads_in_place)
        self.pending = {} if outputs is None else {i: o for i, o in enumerate(outputs) if i != index}
        self.input, self.version = (x, x._version) if self.pending else (None, -1)
        return previous(x) if outputs is None else outputs[index]


def fuse_text_projections(model: torch.nn.Module, grads_in_place: bool = False) -> int:
    """Stack the q, k, v projections of each attention layer of a transformers text encoder (CLIP's `q_proj`,
    `k_proj`, `v_proj`, with their biases) whose three are fused plain LoRA layers (run
    :func:`fused_lora.fuse_lora_layers` first): computed as one node (:class:`SharedInput`) where they can be, each
    layer's own forward otherwise. Returns how many attention layers changed."""
    casts = getattr(model, CASTS_ATTRIBUTE, None)
    changed = 0
    for attn in list(model.modules()):
        layers = [getattr(attn, name, None) for name in TEXT_PROJECTIONS]
        if any(layer is None or _in_group(layer) for layer in layers):
            continue
        layout = _stack(layers, casts)
        if layout is None:
            continue
        group = SharedInput(layout, grads_in_place)
        for index, layer in enumerate(layers):
            layer.forward = functools.partial(group.forward, index, previous=layer.forward)
        changed += 1
    return changed


def _in_group(layer: torch.nn.Module) -> bool:
    forward = vars(layer).get("forward")
    return isinstance(forward, functools.partial) and isinstance(getattr(forward.func, "__self__", None), SharedInput)
