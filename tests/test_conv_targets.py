"""Adapters on layers beyond attention (convs, proj_in, fc1/fc2) load completely into a fresh diffusers pipeline.

diffusers 0.42.1 chooses the key style of a whole component from one glance (the UNet's first key; the text
encoder's `lora_linear_layer` keys). Our files once mixed ``to_q.lora.down`` with ``conv_in.lora_A``, and
`pipe.load_lora_weights` then silently dropped every attention adapter; a text encoder adapted on fc1/fc2 only
failed to load. One tiny training covers both cases.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_dreambooth import TrainConfig
from lora_dreambooth.files.adapter_file import adapter_state_dicts
from lora_dreambooth.files.load_adapter import load_adapter
from lora_dreambooth.files.loading import needs_exact_loader, read_payload
from lora_dreambooth.files.metadata import read_file_metadata
from lora_dreambooth.training.recipe import DreamBoothRecipe

# conv_in and proj_in sort before the attention layers: with the old mixed keys they came first in the file.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_in", "proj_in")
TEXT_ENCODER_TARGETS = ("fc1", "fc2")
EXACT = 1e-5


class Trained:
    """The tiny run: recipe (in-memory adapted models), adapter folder and the in-memory model's image."""

    def __init__(self, recipe: DreamBoothRecipe, out: Path, file: Path, image: np.ndarray) -> None:
        self.recipe, self.out, self.file, self.image = recipe, out, file, image


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, dog_dir) -> Trained:
    out = tmp_path_factory.mktemp("conv-targets") / "adapter"
    config = TrainConfig(instance_dir=str(dog_dir), base=str(tiny_base), token="sks", class_noun="dog",
                         output_dir=str(out), unet_target_modules=UNET_TARGETS, train_text_encoder=True,
                         text_encoder_target_modules=TEXT_ENCODER_TARGETS, resolution=32, steps=3, lr=1e-2,
                         prior=False, save_dtype="fp32", mixed_precision="no", profile="plain")
    recipe = DreamBoothRecipe(config)
    recipe.setup()
    result = recipe.save(recipe.train())
    fresh = fresh_pipeline(tiny_base)
    # On a GPU the recipe leaves the VAE (and a cached text encoder) on the CPU; compare everything on the CPU.
    image = generate(recipe.base.pipeline(scheduler=fresh.scheduler).to("cpu"))
    return Trained(recipe, out, result.adapter_path, image)


def fresh_pipeline(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """Names of the modules peft wrapped (for any adapter)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def assert_complete(pipe, trained: Trained) -> None:
    unet_expected = adapted_modules(trained.recipe.unet)
    te_expected = adapted_modules(trained.recipe.text_encoder)
    assert any(n.endswith("conv_in") for n in unet_expected) and any(n.endswith("attn1.to_q") for n in unet_expected)
    assert any(n.endswith("fc1") for n in te_expected)
    assert adapted_modules(pipe.unet) == unet_expected
    assert adapted_modules(pipe.text_encoder) == te_expected
    assert float(np.abs(generate(pipe) - trained.image).max()) < EXACT


def test_plain_load_lora_weights_loads_every_adapted_layer(trained, tiny_base):
    pipe = fresh_pipeline(tiny_base)
    pipe.load_lora_weights(str(trained.out))
    assert_complete(pipe, trained)


def test_unet_part_alone_keeps_its_attention_adapters(trained, tiny_base):
    """The silent case: with mixed keys the UNet loaded only conv_in/proj_in and dropped every attention layer."""
    from safetensors.torch import load_file

    unet_part = {k: v for k, v in load_file(str(trained.file)).items() if k.startswith("unet.")}
    pipe = fresh_pipeline(tiny_base)
    pipe.load_lora_weights(unet_part)  # no metadata: alpha = rank, our default too
    assert adapted_modules(pipe.unet) == adapted_modules(trained.recipe.unet)


def test_our_loader_matches_and_uses_diffusers_for_a_fresh_file(trained, tiny_base):
    assert not needs_exact_loader(trained.file)  # diffusers' own loader is complete for files we write now
    pipe = fresh_pipeline(tiny_base)
    load_adapter(pipe, trained.out)
    assert_complete(pipe, trained)


def test_file_holds_one_key_style_per_component(trained):
    with safe_open(str(trained.file), framework="pt") as fh:
        keys = list(fh.keys())
    unet = [k for k in keys if k.startswith("unet.")]
    text_encoder = [k for k in keys if k.startswith("text_encoder.")]
    assert unet and text_encoder and len(unet) + len(text_encoder) == len(keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in unet)
    assert all(".lora_linear_layer.down." in k or ".lora_linear_layer.up." in k for k in text_encoder)


def test_adapter_state_dicts_load_completely_from_memory(trained, tiny_base):
    unet_layers, te_layers = adapter_state_dicts(trained.recipe.unet, trained.recipe.text_encoder)
    state = {**{f"unet.{k}": v for k, v in unet_layers.items()},
             **{f"text_encoder.{k}": v for k, v in te_layers.items()}}
    pipe = fresh_pipeline(tiny_base)
    pipe.load_lora_weights(state)  # no metadata: alpha = rank, which is also our default alpha
    assert trained.recipe.cfg.alpha in (None, trained.recipe.cfg.rank)
    assert_complete(pipe, trained)


def test_file_in_the_old_mixed_layout_still_loads_completely(trained, tiny_base, tmp_path):
    """Files written before the fix (attention keys in `lora.down` style, the rest peft style) stay usable."""
    from diffusers.utils import convert_state_dict_to_diffusers

    payload = read_payload(trained.file)
    assert payload.components["unet"].state_dict.keys() == \
        {k.removeprefix("unet.") for k in _peft_keys(trained.recipe.unet)}
    old = {}
    for component, state in payload.components.items():
        old.update({f"{component}.{k}": v for k, v in convert_state_dict_to_diffusers(dict(state.state_dict)).items()})
    assert any(".lora.down." in k for k in old) and any(k.startswith("unet.conv_in.lora_A") for k in old)
    old_file = tmp_path / "old" / "pytorch_lora_weights.safetensors"
    old_file.parent.mkdir()
    save_file(old, str(old_file), metadata=read_file_metadata(trained.file))
    assert needs_exact_loader(old_file)
    assert read_payload(old_file).components["unet"].state_dict.keys() == payload.components["unet"].state_dict.keys()
    pipe = fresh_pipeline(tiny_base)
    load_adapter(pipe, old_file.parent)
    assert_complete(pipe, trained)


def _peft_keys(model: torch.nn.Module) -> set[str]:
    from peft.utils import get_peft_model_state_dict

    return set(get_peft_model_state_dict(model))


def test_metadata_records_the_conv_targets(trained):
    configs = json.loads(read_file_metadata(trained.file)["lora_adapter_metadata"])
    assert set(UNET_TARGETS) <= set(configs["unet.target_modules"])
    assert set(TEXT_ENCODER_TARGETS) == set(configs["text_encoder.target_modules"])
