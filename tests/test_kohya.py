"""kohya / A1111 / ComfyUI layout: export checked by diffusers' own kohya converter, import read back exactly.

Reuses the tiny adapters trained by test_variants.py (trained once per process).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.adapter_file import inspect_adapter
from lora_dreambooth.files.export import export_kohya
from lora_dreambooth.files.load_adapter import load_adapter
from lora_dreambooth.files.loading import load_into_pipeline, read_payload
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, read_file_metadata

from .test_variants import EXACT, fresh_pipeline, generate, max_diff, trained_adapter

VARIANTS = ("lora", "dora", "rslora", "loha", "lokr")


@pytest.fixture(scope="module", autouse=True)
def _on_cpu(cpu_training):
    """These comparisons are CPU semantics (see conftest.cpu_training), also on a GPU machine."""


@pytest.fixture
def train(tmp_path_factory, tiny_base, dog_dir):
    return lambda variant, te=True, init="gaussian", export=(): trained_adapter(tmp_path_factory, tiny_base, dog_dir,
                                                                                variant, te, init, export)


def _cli(capsys, *args):
    from lora_dreambooth.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("variant,init", [("lora", "gaussian"), ("rslora", "gaussian"), ("lora", "pissa")])
def test_kohya_lora_loads_in_diffusers_like_our_file(train, tiny_base, tmp_path, variant, init):
    """diffusers' kohya converter (code we did not write) reads our export to the same image as our own file."""
    run = train(variant, True, init)
    kohya_file = export_kohya(run.out, tmp_path / "sks_dog.safetensors")
    keys = load_file(str(kohya_file)).keys()
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_down.weight")}
    assert {f"{m}.alpha" for m in modules} <= set(keys)
    from_ours, from_kohya = fresh_pipeline(tiny_base), fresh_pipeline(tiny_base)
    from_ours.load_lora_weights(str(run.out))
    from_kohya.load_lora_weights(str(kohya_file))
    assert max_diff(generate(from_kohya), generate(from_ours)) <= EXACT
    assert max_diff(generate(from_kohya), run.image) <= EXACT


def test_kohya_dora_names_are_read_by_diffusers_converter_but_its_sd_loader_drops_them(train, tiny_base, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    run = train("dora", True)
    kohya_file = export_kohya(run.out, tmp_path / "dora.safetensors")
    tensors = load_file(str(kohya_file))
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert scales and all(v.ndim == 2 and v.shape[1] == 1 for v in scales.values())  # LyCORIS wd_on_out: (out, 1)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))  # raises on any unmapped key
    magnitudes = [k for k in converted if "lora_magnitude_vector" in k]
    assert len(magnitudes) == len(scales) and len(alphas) == len(scales)
    pipe = fresh_pipeline(tiny_base)
    pipe.load_lora_weights(str(kohya_file))  # StableDiffusionLoraLoaderMixin filters dora_scale out
    assert max_diff(generate(pipe), run.image) > 1e-4
    assert inspect_adapter(kohya_file)["native_consumers"]["diffusers load_lora_weights"].startswith("no")


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_importer_reads_our_kohya_export_back_exactly(train, tiny_base, tmp_path, variant):
    run = train(variant, True)
    kohya_file = export_kohya(run.out, tmp_path / f"{variant}.safetensors")
    ours, back = read_payload(run.file), read_payload(kohya_file)
    assert back.layout == "kohya" and back.variant.name == ("lora" if variant == "rslora" else variant)
    assert back.summary["token"] == "sks"
    for component in ("unet", "text_encoder"):
        assert set(back.components[component].state_dict) == set(ours.components[component].state_dict)
    pipe = fresh_pipeline(tiny_base)
    load_into_pipeline(pipe, kohya_file, "k")
    assert max_diff(generate(pipe), run.image) <= EXACT


def test_lycoris_names_and_metadata(train, tmp_path):
    loha_file = export_kohya(train("loha", True).out, tmp_path / "loha.safetensors")
    lokr_file = export_kohya(train("lokr", True).out, tmp_path / "lokr.safetensors")
    loha_suffixes = {k.split(".", 1)[1] for k in load_file(str(loha_file))}
    lokr_suffixes = {k.split(".", 1)[1] for k in load_file(str(lokr_file))}
    assert loha_suffixes == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert {"lokr_w1", "alpha"} <= lokr_suffixes and lokr_suffixes <= {"lokr_w1", "lokr_w2", "lokr_w2_a",
                                                                        "lokr_w2_b", "alpha"}
    meta = read_file_metadata(loha_file)
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_max_train_steps"] == "4"
    assert json.loads(meta["ss_tag_frequency"]) == {"instance": {"sks": 5}}


def test_train_with_export_kohya_writes_it_beside_the_adapter(train, tiny_base):
    run = train("lora", False, export=("kohya",))
    kohya_file = run.out / "sks_dog_kohya.safetensors"
    assert kohya_file.is_file() and (run.out / ADAPTER_FILENAME).is_file()
    assert "`sks_dog_kohya.safetensors`: kohya/A1111/ComfyUI layout" in (run.out / "README.md").read_text()
    pipe = fresh_pipeline(tiny_base)
    load_adapter(pipe, kohya_file)  # the single entry point also takes kohya files
    assert max_diff(generate(pipe), run.image) <= EXACT


def test_cli_export_then_import_round_trip(train, tiny_base, tmp_path, capsys):
    run = train("loha", True)
    kohya_file = tmp_path / "loha.safetensors"
    code, out = _cli(capsys, "export", run.out, "--format", "kohya", "--out", kohya_file)
    assert code == 0 and f"Wrote {kohya_file}" in out.out
    code, out = _cli(capsys, "import", kohya_file, "--out", tmp_path / "imported")
    assert code == 0, out.err
    imported = tmp_path / "imported"
    assert (imported / ADAPTER_FILENAME).is_file() and (imported / "README.md").is_file()
    pipe = fresh_pipeline(tiny_base)
    load_adapter(pipe, imported)
    assert max_diff(generate(pipe), run.image) <= EXACT
    code, out = _cli(capsys, "export", run.out, "--out", tmp_path / "x.ckpt")
    assert code == 2 and out.err.startswith("Error: --out") and ".safetensors" in out.err


def test_foreign_kohya_files_without_our_metadata(train, tiny_base, tmp_path):
    """A kohya file from another tool: summary from modelspec/ss fields; bad layers and SDXL keys are named."""
    kohya_file = export_kohya(train("lora", True).out, tmp_path / "ours.safetensors")
    tensors = load_file(str(kohya_file))
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata={"modelspec.trigger_phrase": "sks", "ss_max_train_steps": "4"})
    payload = read_payload(foreign)
    assert payload.summary == {"token": "sks", "steps": 4} and payload.variant.name == "lora"
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_no_such_block_to_q.lora_up.weight": torch.zeros(32, 4)}, str(bad))
    with pytest.raises(UserInputError, match="lora_unet_no_such_block_to_q' matches no layer"):
        load_into_pipeline(fresh_pipeline(tiny_base), bad, "bad")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)}, str(sdxl))
    with pytest.raises(UserInputError, match="SDXL"):
        read_payload(sdxl)
