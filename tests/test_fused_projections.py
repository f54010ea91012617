"""adapters/fused_projections.py: an attention layer's LoRA projections of one input (q, k, v; or k, v of the text
states) as one autograd node, on a real tiny diffusers UNet with real peft adapters."""
from __future__ import annotations

import functools

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lora_dreambooth.adapters import get_variant, inject_adapters
from lora_dreambooth.adapters.fused_lora import fuse_lora_layers
from lora_dreambooth.adapters.fused_projections import (StackedLoraLinears, fuse_attention_projections,
                                                         fuse_text_projections)
from lora_dreambooth.adapters.precision import adapters_compute_in_autocast
from lora_dreambooth.kernels.attention import route_attention
from lora_dreambooth.tiny import build_tiny_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
STACKED = "StackedLoraLinearsBackward"
ATTENTION_LAYERS = 8  # 4 transformer blocks (down 1, mid 1, up 2), each a self- and a cross-attention


def _unet(stacked: bool, *, grads_in_place: bool = False, **options) -> tuple[torch.nn.Module, int]:
    """The tiny UNet as the recipe holds it (frozen bf16 base, fp32 adapters with a non-zero B, fused LoRA
    layers), with its projections stacked or not; and how many attention layers changed."""
    unet = build_tiny_pipeline(seed=7).unet.to(torch.bfloat16).requires_grad_(False)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **options))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    fuse_lora_layers([unet], grads_in_place=grads_in_place)
    return unet, fuse_attention_projections(unet, grads_in_place=grads_in_place) if stacked else 0


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(2, 4, 8, 8).to(torch.bfloat16), torch.randn(2, 77, 32).to(torch.bfloat16)


def _forward(unet, latents, text, cast_once: bool = True) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([unet], enabled=cast_once):
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def _step(unet, cast_once: bool = True):
    """Output, input gradients (latents, text) and adapter gradients of one forward and backward."""
    latents, text = (t.clone().requires_grad_(True) for t in _inputs())
    out = _forward(unet, latents, text, cast_once)
    out.float().square().mean().backward()
    grads = {name: p.grad for name, p in unet.named_parameters() if p.requires_grad}
    return out.detach().float(), latents.grad.float(), text.grad.float(), grads


def _nodes(output: torch.Tensor) -> dict[str, int]:
    """How many autograd nodes of each kind `output` was computed through."""
    seen, stack, counts = set(), [output.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
        stack += [next_node for next_node, _ in node.next_functions]
    return counts


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_attention_layer_stacks_its_projections_of_one_input():
    unet, changed = _unet(stacked=True)
    assert changed == ATTENTION_LAYERS
    counts = _nodes(_forward(unet, *_inputs()))
    # one stacked node per attention layer (q, k, v; or k, v), and the cross-attention's to_q and every to_out alone
    assert counts.get(STACKED) == ATTENTION_LAYERS and counts.get("LoraLinearBackward") == 8 + 4
    plain, _ = _unet(stacked=False)
    counts = _nodes(_forward(plain, *_inputs()))
    assert STACKED not in counts and counts.get("LoraLinearBackward") == ATTENTION_LAYERS * len(TARGETS)
    assert fuse_attention_projections(unet) == 0  # installed once


def test_stacked_projections_train_like_the_separate_fused_layers():
    (out, latents, text, grads), (out_ref, latents_ref, text_ref, grads_ref) = (
        _step(_unet(stacked)[0]) for stacked in (True, False))
    # the same roundings forward (each base output and x A^T rounded to bf16, then the adapter added in one addmm)
    assert torch.equal(out, out_ref)
    assert _relative(latents, latents_ref) < 2e-2 and _relative(text, text_ref) < 2e-2
    assert grads.keys() == grads_ref.keys() and all(g.dtype == torch.float32 for g in grads.values())
    for name, grad in grads.items():
        assert _relative(grad, grads_ref[name]) < 4e-2, name
    total = torch.cat([g.flatten() for g in grads.values()])
    assert _relative(total, torch.cat([grads_ref[n].flatten() for n in grads])) < 1e-2


def _copies(unet, cast_once: bool) -> int:
    """How many multi-tensor copies one forward made."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        _forward(unet, *_inputs(), cast_once=cast_once)
    return sum(e.count for e in trace.key_averages() if e.key == "aten::_foreach_copy_")


def test_within_cast_adapters_once_the_one_copy_writes_the_stacked_rows():
    unet, _ = _unet(stacked=True)
    assert _copies(unet, cast_once=True) == 1  # AdapterCasts' copy of every adapter weight, straight into place
    assert _copies(unet, cast_once=False) == ATTENTION_LAYERS  # each node its own


def test_outside_cast_adapters_once_the_node_copies_the_adapter_weights_itself():
    unet, _ = _unet(stacked=True)
    out_once, *_, grads_once = _step(unet)
    with torch.no_grad():  # an optimizer step: the stacked rows must follow the fp32 masters
        for param in unet.parameters():
            if param.requires_grad:
                param.add_(0.125)
                param.grad = None
    moved, *_ = _step(unet, cast_once=False)
    reference, _ = _unet(stacked=False)
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.add_(0.125)
    assert not torch.equal(moved, out_once) and torch.equal(moved, _step(reference, cast_once=False)[0])


def _single_layer(stacked: bool, cross: bool):
    """One attention layer of the tiny UNet, its input(s) and output gradient."""
    unet, _ = _unet(stacked)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2 if cross else \
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    torch.manual_seed(2)
    hidden = torch.randn(2, 64, 32).to(torch.bfloat16).requires_grad_(True)
    text = torch.randn(2, 77, 32).to(torch.bfloat16).requires_grad_(True) if cross else None
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([unet]):
        out = attn(hidden, encoder_hidden_states=text)
    out.backward(torch.randn_like(out))
    grads = [p.grad for p in attn.parameters() if p.requires_grad]
    return out, hidden.grad, None if text is None else text.grad, grads


@pytest.mark.parametrize("cross", [False, True])
def test_one_layer_s_gradients_match_within_bf16_rounding(cross):
    out, hidden, text, grads = _single_layer(True, cross)
    out_ref, hidden_ref, text_ref, grads_ref = _single_layer(False, cross)
    assert torch.equal(out, out_ref)
    assert _relative(hidden.float(), hidden_ref.float()) < 1e-2
    if cross:
        assert _relative(text.float(), text_ref.float()) < 1e-2
    assert len(grads) == 8 and all(_relative(g, r) < 1e-2 for g, r in zip(grads, grads_ref))


def _switch(unet, change: str) -> None:
    """Put every LoRA layer out of the plain state: adapters off (as --prior-mode model does) or merged."""
    for layer in (m for m in unet.modules() if hasattr(m, "lora_A")):
        layer.enable_adapters(False) if change == "disabled" else layer.merge()


@pytest.mark.parametrize("change", ["disabled", "merged", "dropout", "no autocast"])
def test_layers_the_node_cannot_compute_run_diffusers_path(change):
    unet, changed = _unet(stacked=True, **({"lora_dropout": 0.1} if change == "dropout" else {}))
    assert changed == (0 if change == "dropout" else ATTENTION_LAYERS)  # fuse_lora_layers leaves dropout to peft
    latents, text = _inputs()
    if change == "no autocast":
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        assert STACKED not in _nodes(out)
        return
    if change in ("disabled", "merged"):
        _switch(unet, change)
    out = _forward(unet, latents, text)
    assert STACKED not in _nodes(out)
    if change in ("disabled", "merged"):  # then the same numbers as the model without stacking
        plain, _ = _unet(stacked=False)
        _switch(plain, change)
        assert torch.equal(out, _forward(plain, latents, text))


def _two_passes(in_place: bool):
    """Two forward/backward passes into fp32 `.grad` buffers bound beforehand (as the graph's static gradients):
    the parameters, the buffers, and how many gradients autograd accumulated into them."""
    unet, _ = _unet(stacked=True, grads_in_place=in_place)
    params = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    accumulated = []
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in params.values()]  # kept alive while used
    for accumulator in accumulators:
        accumulator.register_prehook(lambda grads: accumulated.extend(g for g in grads if g is not None))
    for param in params.values():
        param.grad = torch.zeros_like(param)
    buffers = [p.grad for p in params.values()]
    for _ in range(2):
        _step(unet)
    return params, buffers, len(accumulated)


def test_weight_gradients_added_in_place_accumulate_what_autograd_would():
    expected = _step(_unet(stacked=True)[0])[3]  # one pass, returned to autograd
    assert _two_passes(in_place=False)[2] == 2 * len(expected)
    params, buffers, accumulated = _two_passes(in_place=True)
    assert accumulated == 0  # the matmuls added every adapter gradient: autograd had none to add
    for (name, param), buffer in zip(params.items(), buffers):
        assert param.grad is buffer, name  # written where it was
        assert _relative(param.grad, 2 * expected[name]) < 4e-2, name


def test_a_checkpointed_block_recomputes_through_the_stacked_node():
    unet, _ = _unet(stacked=True)
    block = unet.down_blocks[0].attentions[0]
    torch.manual_seed(3)
    hidden = torch.randn(2, 32, 8, 8).to(torch.bfloat16).requires_grad_(True)
    text = torch.randn(2, 77, 32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.utils.checkpoint.checkpoint(block, hidden, text, use_reentrant=False)[0]
    out.float().square().sum().backward()  # the recomputation must save what the forward saved
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(hidden, text)[0]
    assert torch.equal(out, expected) and _nodes(expected).get(STACKED) == 2
    assert all(p.grad is not None for p in block.parameters() if p.requires_grad)


def test_the_saved_adapter_is_the_same():
    stacked, _ = _unet(stacked=True)
    plain, _ = _unet(stacked=False)
    _step(stacked)
    saved, reference = get_peft_model_state_dict(stacked), get_peft_model_state_dict(plain)
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    base = {k: v for k, v in stacked.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in base.items())  # the base weights, now views


def test_a_routed_layer_keeps_its_backend_both_ways_round():
    routed_first, _ = _unet(stacked=False)
    assert route_attention(routed_first, "cudnn") == 3
    assert fuse_attention_projections(routed_first) == ATTENTION_LAYERS
    stacked_first, _ = _unet(stacked=True)
    assert route_attention(stacked_first, "cudnn") == 3
    for unet in (routed_first, stacked_first):
        orders = {name: m.processor.order for name, m in unet.named_modules() if hasattr(m, "processor")}
        assert all(type(m.processor).__name__ == "FusedProjectionsProcessor" for m in unet.modules()
                   if hasattr(m, "processor"))
        assert sorted(n for n, order in orders.items() if order) == sorted(
            n for n in orders if n.endswith("attn1") and n.startswith(("down_blocks.0.", "up_blocks.1.")))
    assert torch.equal(_step(routed_first)[0], _step(stacked_first)[0])


def test_an_unused_output_s_gradient_counts_as_zero():
    unet, _ = _unet(stacked=True)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    hidden = torch.randn(2, 64, 32).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        query, _, value = attn.processor.projections(hidden, False)
        (query.float().sum() + value.float().sum()).backward()
    key_a = attn.to_k.lora_A["default"].weight
    assert key_a.grad is not None and not key_a.grad.any() and attn.to_q.lora_A["default"].weight.grad.any()
    assert StackedLoraLinears is type(query.grad_fn)._forward_cls


@pytest.mark.parametrize("fused_qkv, fold_base, expected", [(True, True, ATTENTION_LAYERS), (False, True, 0),
                                                            (True, False, 0)])
def test_inject_adapters_stacks_the_projections_where_asked(fused_qkv, fold_base, expected):
    unet = build_tiny_pipeline(seed=7).unet.to(torch.bfloat16).requires_grad_(False)
    inject_adapters(unet, None, get_variant("lora"), rank=4, alpha=4, unet_targets=tuple(TARGETS),
                    text_encoder_targets=(), fused=True, fold_base=fold_base, fused_qkv=fused_qkv)
    processors = [type(m.processor).__name__ for m in unet.modules() if hasattr(m, "processor")]
    assert processors.count("FusedProjectionsProcessor") == expected


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("into_grad", [False, True])
def test_the_node_computes_three_lora_linears_at_sd_s_widths(device, into_grad):
    """StackedLoraLinears alone against three LoraLinear nodes (on CUDA: fp32 weight gradients from bf16 matmuls)."""
    from lora_dreambooth.adapters.fused_lora import LoraLinear
    from lora_dreambooth.adapters.fused_projections import StackedProjections

    width, rank, count, scale, dtype = 320, 4, 3, 2.0, torch.bfloat16
    torch.manual_seed(0)
    weights = [(torch.randn(width, width, device=device) / width ** 0.5).to(dtype) for _ in range(count)]
    masters = [(torch.randn(rank, width, device=device) / width ** 0.5).requires_grad_(True) for _ in range(count)]
    masters += [(torch.randn(width, rank, device=device) * 0.1).requires_grad_(True) for _ in range(count)]
    stacked = torch.zeros(-(-count * (width + rank) // 8) * 8, width, device=device, dtype=dtype)
    stacked[:count * width] = torch.cat(weights)
    b = torch.zeros(count, width, rank, device=device, dtype=dtype)
    layout = StackedProjections([None] * count, "default", stacked, b, tuple(masters), None, [], [])
    x = torch.randn(2, 256, width, device=device).to(dtype)
    upstream = [torch.randn(2, 256, width, device=device).to(dtype) for _ in range(count)]
    results = []
    for stacked_node in (True, False):
        for master in masters:
            master.grad = torch.zeros_like(master) if into_grad else None
        inputs = x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype):
            outs = StackedLoraLinears.apply(inputs, layout, scale, False, into_grad, *masters) if stacked_node else [
                LoraLinear.apply(inputs, weights[i], None, masters[i], masters[count + i], scale, dtype, None,
                                 into_grad) for i in range(count)]
        torch.autograd.backward(outs, upstream)
        results.append(([o.detach().float() for o in outs], inputs.grad.float(), [m.grad for m in masters]))
    (outs, grad_x, grads), (outs_ref, grad_x_ref, grads_ref) = results
    assert all(_relative(o, r) < 1e-2 for o, r in zip(outs, outs_ref)) and _relative(grad_x, grad_x_ref) < 1e-2
    assert all(g.dtype == torch.float32 and _relative(g, r) < 1e-2 for g, r in zip(grads, grads_ref))


TEXT_LAYERS = 5  # the tiny CLIP text encoder's attention layers


def _text_encoder(stacked: bool, grads_in_place: bool = False) -> tuple[torch.nn.Module, int]:
    """The tiny CLIP text encoder as the recipe trains it (frozen bf16 base with biases, fp32 adapters with a
    non-zero B on q, k, v, out), its q, k, v stacked or not."""
    text_encoder = build_tiny_pipeline(seed=7).text_encoder.to(torch.bfloat16).requires_grad_(False)
    torch.manual_seed(1)
    text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for param in text_encoder.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    fuse_lora_layers([text_encoder], grads_in_place=grads_in_place)
    return text_encoder, fuse_text_projections(text_encoder, grads_in_place) if stacked else 0


def _text_step(text_encoder):
    """Hidden states and adapter gradients of one forward and backward over two prompts' token ids."""
    torch.manual_seed(3)
    ids = torch.randint(0, 500, (2, 77))
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([text_encoder]):
        hidden = text_encoder(ids)[0]
    hidden.float().square().mean().backward()
    return hidden.detach().float(), {n: p.grad for n, p in text_encoder.named_parameters() if p.requires_grad}


def test_every_text_attention_layer_stacks_q_k_v_with_their_biases():
    text_encoder, changed = _text_encoder(stacked=True)
    assert changed == TEXT_LAYERS and fuse_text_projections(text_encoder) == 0  # installed once
    attn = text_encoder.encoder.layers[0].self_attn
    stacked = attn.q_proj.forward.func.__self__.layout  # the group the three layers share
    assert stacked.bias is not None and attn.v_proj.base_layer.bias.data_ptr() == stacked.bias[64:].data_ptr()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([text_encoder]):
        hidden = text_encoder(torch.randint(0, 500, (2, 77)))[0]
    counts = _nodes(hidden)
    assert counts.get(STACKED) == TEXT_LAYERS and counts.get("LoraLinearBackward") == TEXT_LAYERS  # out_proj


@pytest.mark.parametrize("grads_in_place", [False, True])
def test_stacked_text_projections_train_like_the_separate_fused_layers(grads_in_place):
    results = []
    for stacked in (True, False):
        text_encoder, _ = _text_encoder(stacked, grads_in_place)
        if grads_in_place:  # bound fp32 buffers, as the CUDA graph's static gradients are
            for param in text_encoder.parameters():
                if param.requires_grad:
                    param.grad = torch.zeros_like(param)
        results.append(_text_step(text_encoder))
    (hidden, grads), (hidden_ref, grads_ref) = results
    assert torch.equal(hidden, hidden_ref)  # the same roundings forward, the biases added by the same matmul
    assert grads.keys() == grads_ref.keys() and len(grads) == TEXT_LAYERS * 8
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.any() and _relative(grad, grads_ref[name]) < 2e-2, name


def test_each_text_projection_gets_its_own_output_in_any_order_and_for_new_inputs():
    text_encoder, _ = _text_encoder(stacked=True)
    plain, _ = _text_encoder(stacked=False)
    attn, attn_ref = text_encoder.encoder.layers[1].self_attn, plain.encoder.layers[1].self_attn
    torch.manual_seed(4)
    first, second = (torch.randn(2, 77, 32).to(torch.bfloat16) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([text_encoder, plain]):
        calls = [("v_proj", first), ("q_proj", first), ("k_proj", second), ("k_proj", first), ("q_proj", second)]
        for name, x in calls:
            assert torch.equal(getattr(attn, name)(x), getattr(attn_ref, name)(x)), name
        attn.q_proj(first)
        first.add_(1.0)  # changed in place after its projections: the pending ones are not handed out again
        assert torch.equal(attn.v_proj(first), attn_ref.v_proj(first))


def test_inject_adapters_stacks_the_text_projections_where_asked():
    for fused_text_qkv, expected in ((True, TEXT_LAYERS), (False, 0)):
        pipe = build_tiny_pipeline(seed=7)
        unet, text_encoder = (m.to(torch.bfloat16).requires_grad_(False) for m in (pipe.unet, pipe.text_encoder))
        inject_adapters(unet, text_encoder, get_variant("lora"), rank=4, alpha=4, unet_targets=tuple(TARGETS),
                        text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"), fused=True,
                        fused_text_qkv=fused_text_qkv)
        groups = {id(layer.forward.func.__self__) for layer in text_encoder.modules()
                  if isinstance(getattr(layer, "forward", None), functools.partial)}
        assert len(groups) == expected
