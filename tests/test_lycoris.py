"""LyCORIS's own library (`lycoris-lora`, the code kohya sd-scripts and many UIs run LoHa / LoKr with) loads our
LoHa, LoKr and DoRA exports and reproduces the weight deltas our adapters apply.

Reuses the tiny adapters trained by test_variants.py (trained once per process).
"""
from __future__ import annotations

import lycoris.modules as lycoris_modules_api  # lycoris-lora, in the test extras
import pytest
import torch
from safetensors.torch import load_file

from lora_dreambooth.adapters.fusing import adapter_weight_deltas
from lora_dreambooth.files.export import export_kohya
from lora_dreambooth.files.load_adapter import load_adapter

from .test_variants import fresh_pipeline, trained_adapter


def lycoris_modules(weights: dict[str, torch.Tensor], models: dict[str, torch.nn.Module]) -> dict:
    """LyCORIS's own per-module loading (`lycoris.kohya.create_network_from_weights` minus the network object:
    `LycorisNetworkKohya.__init__` first wraps every default target of the model and asserts on diffusers' UNet,
    'duplicated lora name: lora_unet_time_embedding_linear_1', with lycoris-lora 4.1.3)."""
    names = {k.split(".")[0] for k in weights if "." in k}
    loaded = {}
    for prefix, model in models.items():
        for name, module in model.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if lora_name in names:
                lyco_type, params = lycoris_modules_api.get_module(weights, lora_name)
                made = lycoris_modules_api.make_module(lyco_type, params, lora_name, module)
                if made is not None:
                    loaded[lora_name] = made
    return loaded


def our_deltas(base, adapter) -> dict[str, torch.Tensor]:
    """'unet.<module>' / 'text_encoder.<module>' -> the weight change our loader applies (peft merge - base)."""
    pipe = fresh_pipeline(base)
    name = load_adapter(pipe, adapter)
    return {f"{component}.{module}": delta for component in ("unet", "text_encoder")
            for module, delta in adapter_weight_deltas(getattr(pipe, component), name).items()}


LYCORIS_CLASS = {"lora": "LoConModule", "dora": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule"}


@pytest.mark.parametrize("variant", ["loha", "lokr", "dora"])
def test_lycoris_library_loads_our_export_with_the_same_deltas(tmp_path_factory, tiny_base, dog_dir, tmp_path,
                                                               variant):
    run = trained_adapter(tmp_path_factory, tiny_base, dog_dir, variant, True)
    kohya_file = export_kohya(run.out, tmp_path / f"sks_{variant}.safetensors")
    weights = load_file(str(kohya_file))
    modules_in_file = {k.split(".")[0] for k in weights}
    pipe = fresh_pipeline(tiny_base)
    # kohya / LyCORIS name text-encoder layers with transformers 4's `text_model.` level (transformers 5 dropped it)
    loaded = lycoris_modules(weights, {"lora_unet": pipe.unet,
                                       "lora_te": torch.nn.ModuleDict({"text_model": pipe.text_encoder})})
    assert set(loaded) == modules_in_file  # every module of our file found its layer in LyCORIS
    assert {type(m).__name__ for m in loaded.values()} == {LYCORIS_CLASS[variant]}
    assert any(n.startswith("lora_te_") for n in loaded) and any(n.startswith("lora_unet_") for n in loaded)
    deltas = our_deltas(tiny_base, run.out)
    assert len(deltas) == len(loaded)
    for component_name, ours in deltas.items():
        component, module = component_name.split(".", 1)
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        lyco = loaded[prefix + module.replace(".", "_")]
        with torch.no_grad():  # LyCORIS's merged weight (DoRA: its weight decomposition, wd_on_out) minus the base
            base_weight = lyco.org_module[0].weight
            theirs = (lyco.get_merged_weight(multiplier=1.0)[0].reshape(ours.shape) - base_weight).float()
        assert ours.abs().max() > 0
        # ours is (merged - base) in fp32: exact up to the rounding of the base weight (~1e-7 of it)
        assert float((theirs - ours).abs().max()) <= 1e-4 * float(ours.abs().max()), component_name
