"""Adapters under autocast compute on the autocast-dtype input as it is: same numbers, fewer copies."""
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_dreambooth.adapters.precision import adapters_compute_in_autocast


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
