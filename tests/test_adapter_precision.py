"""Under autocast, adapters compute on the autocast-dtype input as it is, and a frozen 16-bit base's norm layers
compute in 16 bits: same numbers (or the same up to where the rounding happens), fewer copies."""
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_dreambooth.adapters.fused_lora import fuse_lora_layers
from lora_dreambooth.adapters.precision import adapters_compute_in_autocast, norms_compute_in_weight_dtype


def _adapted_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False),
                                    model)
    for name, p in model.named_parameters():  # as the recipe holds them: frozen 16-bit base, fp32 adapters
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
        else:
            p.data = p.data.to(torch.bfloat16)
            p.requires_grad_(False)
    return model


def _run(model, x, skip_cast: bool):
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([model], enabled=skip_cast):
        out = model(x)
    out.float().square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_skipping_the_input_cast_changes_no_output_and_no_gradient():
    model = _adapted_model()
    x = torch.randn(4, 16).to(torch.bfloat16)
    out_cast, grads_cast = _run(model, x, skip_cast=False)
    out_fast, grads_fast = _run(model, x, skip_cast=True)
    assert out_fast.dtype == out_cast.dtype == torch.bfloat16
    assert torch.equal(out_fast, out_cast)
    assert len(grads_fast) == 4 and all(torch.equal(a, b) for a, b in zip(grads_fast, grads_cast))


def test_the_switch_is_undone_after_the_block():
    model = _adapted_model()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    with adapters_compute_in_autocast([model, None]):
        assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    assert all(m.cast_input_dtype_enabled for m in layers)


def _normed_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                                torch.nn.Flatten(2), torch.nn.LayerNorm(36), torch.nn.Linear(36, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.to(dtype).requires_grad_(False)


def _norm_output_dtypes(model, x, device_type: str):
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for m in model.modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


def test_norms_of_a_16_bit_model_compute_in_16_bits_and_match_the_plain_layers():
    plain, policy = _normed_model(torch.bfloat16), _normed_model(torch.bfloat16)
    assert norms_compute_in_weight_dtype(policy) == 2
    x = torch.randn(3, 4, 6, 6).to(torch.bfloat16)
    out_plain, _ = _norm_output_dtypes(plain, x, "cpu")
    out_policy, dtypes = _norm_output_dtypes(policy, x, "cpu")
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(out_policy, out_plain)  # CPU autocast keeps bf16 norms in bf16: the same kernels ran
    # an fp32 activation reaching a 16-bit norm is rounded to the norm's dtype first (no dtype-mismatch error)
    assert policy[1](torch.randn(2, 8, 3, 3)).dtype == torch.bfloat16


def test_fp32_models_and_norm_subclasses_are_left_alone():
    model = _normed_model(torch.float32)
    assert norms_compute_in_weight_dtype(model) == 0
    assert all("forward" not in vars(m) for m in model.modules())

    class OwnNorm(torch.nn.LayerNorm):
        pass

    assert norms_compute_in_weight_dtype(torch.nn.Sequential(OwnNorm(4)).to(torch.bfloat16)) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast runs norms in fp32; the CPU's does not")
def test_on_cuda_the_norms_skip_autocasts_fp32_and_the_output_stays_within_bf16_rounding():
    plain, policy = _normed_model(torch.bfloat16).cuda(), _normed_model(torch.bfloat16).cuda()
    norms_compute_in_weight_dtype(policy)
    x = torch.randn(3, 4, 6, 6, device="cuda").to(torch.bfloat16)
    out_plain, dtypes_plain = _norm_output_dtypes(plain, x, "cuda")
    out_policy, dtypes_policy = _norm_output_dtypes(policy, x, "cuda")
    assert dtypes_plain == [torch.float32, torch.float32] and dtypes_policy == [torch.bfloat16, torch.bfloat16]
    assert torch.allclose(out_policy.float(), out_plain.float(), rtol=0.05, atol=0.05)


# -- fused LoRA layers (adapters/fused_lora.py) ---------------------------------------------------------------------
def _fused_model(alpha: float = 4, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"], init_lora_weights=False, **options)
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.data = p.data.float() if "lora_" in name else p.data.to(torch.bfloat16)
        p.requires_grad_("lora_" in name)
    return model


def _step(model, x, fuse: bool, device_type: str = "cpu"):
    for p in model.parameters():
        p.grad = None
    restore = fuse_lora_layers([model]) if fuse else (lambda: None)
    with torch.autocast(device_type, dtype=torch.bfloat16), adapters_compute_in_autocast([model]):
        out = model(x)
    out.float().square().sum().backward()
    restore()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], x.grad


@pytest.mark.parametrize("alpha", [4, 8])  # scale 1 (the default alpha = rank) and 2
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_fused_lora_layers_compute_peft_s_output_and_gradients(alpha, x_dtype):
    model = _fused_model(alpha)
    x = torch.randn(3, 5, 16, dtype=x_dtype, requires_grad=True)  # (batch, tokens, features) as in attention
    out_peft, grads_peft, x_grad_peft = _step(model, x, fuse=False)
    x.grad = None
    out_fused, grads_fused, x_grad_fused = _step(model, x, fuse=True)
    assert out_fused.dtype == out_peft.dtype == torch.bfloat16 and x_grad_fused.dtype == x_dtype
    assert [g.dtype for g in grads_fused] == [torch.float32] * 4
    # the same maths rounded in fewer places: within bf16 rounding of peft's numbers, and not identical
    torch.testing.assert_close(out_fused.float(), out_peft.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x_grad_fused.float(), x_grad_peft.float(), rtol=3e-2, atol=3e-2)
    for fused, peft in zip(grads_fused, grads_peft):
        assert (fused - peft).norm() <= 2e-2 * peft.norm()
    assert not torch.equal(out_fused, out_peft)


def test_a_frozen_torch_linear_base_computes_in_the_adapter_s_node_and_other_bases_before_it():
    model = _fused_model()
    fuse_lora_layers([model])
    x = torch.randn(2, 16).to(torch.bfloat16)
    model[2].base_layer.register_forward_hook(lambda *_: None)  # someone watches this base layer: keep it called
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = model[0](x), model[2](torch.randn(2, 32).to(torch.bfloat16))
    assert type(first.grad_fn).__name__ == "LoraLinearBackward"
    assert type(second.grad_fn).__name__ == "LoraUpdateBackward"


def test_adapter_weights_are_cast_once_per_forward_and_never_read_stale():
    model = _fused_model()
    fuse_lora_layers([model])
    x = torch.randn(2, 16).to(torch.bfloat16)

    def forward(cast_once: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([model], enabled=cast_once):
            return model(x)

    first = forward(cast_once=True)
    casts = model._lora_adapter_casts
    assert [tuple(c.shape) for c in casts.copies[torch.bfloat16]] == [(4, 16), (32, 4), (4, 32), (8, 4)]
    assert not casts.armed and torch.equal(first, forward(cast_once=False))  # the same values as layer by layer
    with torch.no_grad():  # an optimizer step between two forwards
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    second = forward(cast_once=True)
    assert not torch.equal(first, second) and torch.equal(second, forward(cast_once=False))


def _two_passes(model, x, device_type: str, bound: bool, in_place: bool = True):
    """Two forward/backward passes of the fused `model`, and how many adds autograd made into `.grad`; `bound`:
    fp32 `.grad` buffers exist beforehand (as the graph's static gradients), else they start as None."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p) if bound else None
    buffers = [p.grad for p in params]
    restore = fuse_lora_layers([model], grads_in_place=in_place)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        for _ in range(2):
            with torch.autocast(device_type, dtype=torch.bfloat16):
                out = model(x)
            out.float().square().sum().backward()
    restore()
    accumulations = sum(e.count for e in trace.key_averages() if e.key == "aten::add_")  # autograd's adds
    return params, buffers, accumulations


@pytest.mark.parametrize("device_type", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_weight_gradients_added_in_place_accumulate_what_autograd_would(device_type):
    model = _fused_model(8).to(device_type)
    x = torch.randn(2, 64, 16, device=device_type).to(torch.bfloat16)
    _, expected, _ = _step(model, x, fuse=True, device_type=device_type)  # one pass, returned to autograd
    assert _two_passes(model, x, device_type, bound=True, in_place=False)[2] == 2 * len(expected)  # autograd adds
    params, buffers, accumulations = _two_passes(model, x, device_type, bound=True)
    assert accumulations == 0  # the matmuls wrote the buffers: autograd had nothing to add
    for p, buffer, one in zip(params, buffers, expected):
        assert p.grad is buffer  # written where it was, not replaced
        assert (p.grad - 2 * one).norm() <= 2e-2 * one.norm()  # two passes added up
    params, _, accumulations = _two_passes(model, x, device_type, bound=False)
    assert accumulations == 0  # no buffer at first: the first pass's gradients go to autograd, which keeps them
    for p, one in zip(params, expected):
        assert (p.grad - 2 * one).norm() <= 2e-2 * one.norm()


def test_fused_lora_layers_are_restored_and_leave_what_they_cannot_fuse_to_peft():
    plain, dora, dropout = _fused_model(), _fused_model(use_dora=True), _fused_model(lora_dropout=0.1)
    restore = fuse_lora_layers([plain, dora, dropout, None])
    assert all("forward" in vars(m) for m in (plain[0], plain[2]))
    assert not any("forward" in vars(m) for m in dora.modules()) and "forward" not in vars(dropout[0])
    x = torch.randn(4, 16).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in (plain[0], plain[2]):
            layer.enable_adapters(False)
        off = plain(x)  # adapters switched off (as --prior-mode model does): the base layers alone
        base = torch.nn.Sequential(plain[0].base_layer, plain[1], plain[2].base_layer)
        assert torch.equal(off, base(x))
    restore()
    assert not any("forward" in vars(m) for m in plain.modules())


def test_a_checkpointed_block_recomputes_through_the_fused_layers():
    model = _fused_model()
    fuse_lora_layers([model])
    x = torch.randn(2, 5, 16).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    out.float().square().sum().backward()  # the recomputation must save what the forward saved
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    assert torch.equal(out, expected) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp32 weight gradients straight from a bf16 matmul: CUDA")
def test_fused_lora_layers_on_cuda_match_peft_within_bf16_rounding():
    model = _fused_model(8).cuda()
    x = torch.randn(2, 64, 16, device="cuda").to(torch.bfloat16).requires_grad_(True)
    out_peft, grads_peft, _ = _step(model, x, fuse=False, device_type="cuda")
    out_fused, grads_fused, _ = _step(model, x, fuse=True, device_type="cuda")
    torch.testing.assert_close(out_fused.float(), out_peft.float(), rtol=2e-2, atol=2e-2)
    for fused, peft in zip(grads_fused, grads_peft):
        assert fused.dtype == torch.float32 and (fused - peft).norm() <= 2e-2 * peft.norm()


def test_a_layer_with_several_active_adapters_leaves_the_others_reading_their_own_cast_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
    for name in ("default", "second"):
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["0", "1", "2"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    for name, p in model.named_parameters():
        p.data = p.data.float() if "lora_" in name else p.data.to(torch.bfloat16)
        p.requires_grad_("lora_" in name)
    model[0].set_adapter(["default", "second"])  # peft's own forward; the two after it are fused
    for layer in model[1:]:
        layer.set_adapter("default")
    x = torch.randn(2, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    fuse_lora_layers([model])
    with torch.autocast("cpu", dtype=torch.bfloat16), adapters_compute_in_autocast([model]):
        out = model(x)
    assert [tuple(c.shape) for c in model._lora_adapter_casts.copies[torch.bfloat16]] == [(4, 16), (16, 4),
                                                                                         (4, 16), (8, 4)]
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
