"""Under autocast, adapters compute on the autocast-dtype input as it is, and a frozen 16-bit base's norm layers
compute in 16 bits: same numbers (or the same up to where the rounding happens), fewer copies."""
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

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
