"""Single-file SD v1 checkpoints: --base model.safetensors in, merged checkpoints out.

The tiny base has no hub config, so its single file is written by our checkpoint writer (which embeds the base's
diffusers configs in the header); diffusers' own single-file loader reads our merged checkpoint with the tiny
folder passed as `config=`, the way that loader allows for checkpoints it has no config for.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import read_summary
from lora_dreambooth.models import base_identity, load_base, resolve_base

from .conftest import cli_in_process, small_train_args

FP16_IMAGE_TOLERANCE = 2e-2  # fp16 weights, 32 px, 4 steps: measured 1e-3..5e-3


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_base):
    """The tiny base as one original-layout .safetensors (fp32, configs embedded)."""
    from lora_dreambooth.files.checkpoint import save_checkpoint

    return save_checkpoint(load_base(str(tiny_base)), tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors",
                           save_dtype="fp32")


@pytest.fixture(scope="session")
def single_file_adapter(tmp_path_factory, tiny_checkpoint, dog_dir):
    """An adapter trained with --base tiny-sd1.safetensors through the real CLI entry point (once)."""
    from lora_dreambooth.cli import main

    out = tmp_path_factory.mktemp("single-adapter") / "adapter"
    try:
        main(small_train_args(dog_dir, tiny_checkpoint, out, "--no-prior"))
    except SystemExit as exc:
        assert exc.code in (0, None)
    return out


def _images(pipe, seed: int = 0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks dog", num_inference_steps=4, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_single_file_loads_the_same_models_as_the_folder(tiny_base, tiny_checkpoint):
    from_folder, from_file = load_base(str(tiny_base)), load_base(str(tiny_checkpoint))
    for component in ("unet", "vae", "text_encoder"):
        want, got = getattr(from_folder, component).state_dict(), getattr(from_file, component).state_dict()
        assert set(want) == set(got)
        assert all(torch.equal(want[k], got[k]) for k in want), component
    prompt = "a photo of sks dog"
    assert from_file.tokenizer(prompt).input_ids == from_folder.tokenizer(prompt).input_ids
    with safe_open(str(tiny_checkpoint), "pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys


def test_a_single_file_loads_placed_and_cast_as_the_folder_does(tiny_base, tiny_checkpoint, tmp_path):
    """With a device and dtype (a GPU run's `load_base`), a checkpoint's UNet and text encoder are converted straight
    into the compute dtype, as the folder's are, from an fp32 file and from an fp16 one (as most are saved)."""
    from safetensors.torch import load_file, save_file

    half = tmp_path / "tiny-sd1-fp16.safetensors"
    with safe_open(str(tiny_checkpoint), "pt") as handle:
        metadata = handle.metadata()  # the tiny base's own configs
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(tiny_checkpoint)).items()},
              str(half), metadata=metadata)
    placed = dict(device="cpu", dtype=torch.bfloat16)
    from_folder, exact = load_base(str(tiny_base), **placed), load_base(str(tiny_base))
    for checkpoint in (tiny_checkpoint, half):
        from_file = load_base(str(checkpoint), **placed)
        for component, dtype in (("unet", torch.bfloat16), ("text_encoder", torch.bfloat16), ("vae", torch.float32)):
            want, got = getattr(from_folder, component).state_dict(), getattr(from_file, component).state_dict()
            assert set(want) == set(got) and all(t.dtype == dtype for t in got.values()), (checkpoint, component)
            if checkpoint == tiny_checkpoint:  # an fp32 file casts to exactly the folder's weights
                assert all(torch.equal(want[k], got[k]) for k in want), component
            else:  # an fp16 file holds fp16's rounding of the fp32 weights, cast from there
                fp32 = getattr(exact, component).state_dict()
                assert all(torch.equal(fp32[k].half().to(dtype), got[k]) for k in want), component


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loads onto a GPU (run on the device machine)")
def test_on_a_gpu_a_single_file_loads_onto_it_as_the_folder_does(tiny_base, tiny_checkpoint):
    placed = dict(device="cuda", dtype=torch.bfloat16)
    from_folder, from_file = load_base(str(tiny_base), **placed), load_base(str(tiny_checkpoint), **placed)
    for component in ("unet", "vae", "text_encoder"):
        want, got = getattr(from_folder, component).state_dict(), getattr(from_file, component).state_dict()
        assert set(want) == set(got), component
        for key, tensor in want.items():
            assert got[key].is_cuda and got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_train_from_a_single_file_checkpoint(single_file_adapter, tiny_checkpoint, tmp_path):
    adapter = single_file_adapter / "pytorch_lora_weights.safetensors"
    assert adapter.is_file()
    identity = base_identity(str(tiny_checkpoint))
    assert identity["base_file"] == "tiny-sd1.safetensors"
    assert identity["base_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    summary = read_summary(adapter)  # the adapter's metadata names the base file and its hash
    assert summary["base_file"] == identity["base_file"] and summary["base_sha256"] == identity["base_sha256"]
    from lora_dreambooth.training.priors import default_class_dir

    renamed = shutil.copy(tiny_checkpoint, tmp_path / "renamed.safetensors")
    same = default_class_dir(str(tiny_checkpoint), "a photo of dog", 32)
    assert default_class_dir(str(renamed), "a photo of dog", 32) == same  # keyed by content, not by name
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny_checkpoint.read_bytes() + b" ")
    assert default_class_dir(str(other), "a photo of dog", 32) != same


def test_merged_checkpoint_reloads_in_diffusers_single_file_loader_to_the_same_images(
        capsys, single_file_adapter, tiny_checkpoint, tiny_base, tmp_path, dog_dir):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from lora_dreambooth.files.load_adapter import load_adapter

    merged = tmp_path / "merged.safetensors"
    run = cli_in_process(capsys, "export", single_file_adapter, "--format", "checkpoint", "--base", tiny_checkpoint,
                         "--out", merged, "--dtype", "fp16")
    assert run.returncode == 0, run.stderr
    reference = load_base(str(tiny_checkpoint)).pipeline()
    load_adapter(reference, single_file_adapter)
    want = _images(reference)
    base_only = _images(load_base(str(tiny_checkpoint)).pipeline())
    pipe = StableDiffusionPipeline.from_single_file(str(merged), config=str(tiny_base), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe.to(torch.float32))
    assert np.abs(got - want).max() <= FP16_IMAGE_TOLERANCE
    assert np.abs(got - want).max() < np.abs(base_only - want).max()  # the adapter is in the weights
    with safe_open(str(merged), "pt") as handle:
        meta = handle.metadata()
        assert all(handle.get_slice(k).get_dtype() == "F16" for k in list(handle.keys())[:20])
    merge = json.loads(meta["lora_dreambooth.merged"])
    assert merge["base_file"] == tiny_checkpoint.name and merge["strength"] == 1.0
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.trigger_phrase"] == "sks"
    # ... and our own train accepts the merged checkpoint as a base
    run = cli_in_process(capsys, *small_train_args(dog_dir, merged, tmp_path / "again", "--no-prior", "--steps", "2"))
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "again" / "pytorch_lora_weights.safetensors").is_file()
    # generate (like serve and evaluate, through ResidentPipeline.from_base) takes it as well
    run = cli_in_process(capsys, "generate", "--base", merged, "--prompt", "a photo of sks dog", "--out",
                         tmp_path / "images", "--num-images", "1", "--steps", "2", "--height", "32", "--width", "32")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "images" / "grid.png").is_file()


def test_strength_zero_gives_back_the_base(capsys, single_file_adapter, tiny_checkpoint, tmp_path):
    out = tmp_path / "zero.safetensors"
    run = cli_in_process(capsys, "export", single_file_adapter, "--format", "checkpoint", "--base", tiny_checkpoint,
                         "--out", out, "--strength", "0", "--dtype", "fp32")
    assert run.returncode == 0, run.stderr
    with safe_open(str(out), "pt") as merged, safe_open(str(tiny_checkpoint), "pt") as base:
        assert set(merged.keys()) == set(base.keys())
        assert all(torch.equal(merged.get_tensor(k), base.get_tensor(k)) for k in base.keys())


def test_shipped_sd1_configs_are_sd1_and_tokenize_like_clip():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from lora_dreambooth.single_file import SD1_CONFIG_DIR

    tokenizer = CLIPTokenizer.from_pretrained(str(SD1_CONFIG_DIR), subfolder="tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD1_CONFIG_DIR / "unet")))
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 859.5  # SD v1.x's UNet


def _fake_checkpoint(path, keys: dict[str, tuple[int, ...]]):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


@pytest.mark.parametrize("keys,looks_like", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (8, 4)}, "LoRA / LyCORIS adapter"),
    ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,),
      "model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3)}, "SDXL"),
    ({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "Stable Diffusion 2.x"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "incomplete SD checkpoint"),
    ({"some.other.weight": (2, 2)}, "no Stable Diffusion weights"),
])
def test_a_file_that_is_not_sd1_fails_in_one_line_naming_what_it_looks_like(tmp_path, keys, looks_like):
    path = _fake_checkpoint(tmp_path / "model.safetensors", keys)
    with pytest.raises(UserInputError, match="is not an SD v1.x checkpoint: it looks like") as info:
        resolve_base(str(path))
    assert looks_like in str(info.value) and "\n" not in str(info.value)


def test_bad_base_files_on_the_command_line(capsys, tmp_path, tiny_checkpoint, dog_dir):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}}, ckpt)
    run = cli_in_process(capsys, *small_train_args(dog_dir, ckpt, tmp_path / "out"))
    assert run.returncode == 2 and "pickle checkpoint (.ckpt)" in run.stderr and "--allow-pickle" in run.stderr
    run = cli_in_process(capsys, *small_train_args(dog_dir, ckpt, tmp_path / "out", "--allow-pickle"))
    assert run.returncode == 2 and "incomplete SD checkpoint" in run.stderr and "Traceback" not in run.stderr
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    run = cli_in_process(capsys, "generate", "--base", junk, "--prompt", "x", "--out", tmp_path / "g")
    assert run.returncode == 2 and "not a readable .safetensors file" in run.stderr
    run = cli_in_process(capsys, "export", tmp_path / "missing", "--format", "checkpoint", "--out", tmp_path / "m.st")
    assert run.returncode == 2 and "needs --base" in run.stderr
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("pytorch_lora_weights.safetensors"))
