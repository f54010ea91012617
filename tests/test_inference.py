"""Inference: adapter library, load_adapter checks, resident adapters (switch, mix, none, fuse), requests."""
from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from lora_dreambooth import TrainConfig, load_adapter, train
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, METADATA_KEY
from lora_dreambooth.serve.generation import GenerationRequest
from lora_dreambooth.serve.library import AdapterLibrary, check_subject_name
from lora_dreambooth.serve.pipeline import ResidentPipeline, parse_adapter_spec

PROMPT = "a photo of sks dog"
SIZE, STEPS = 32, 3


def trained_subjects(tmp_path_factory, tiny_base: Path, dog_dir: Path, cat_dir: Path) -> Path:
    """A library folder with two tiny adapters trained by the real recipe, once per session: `sks-dog`
    (with the samples.png preview training writes) and `zwx-cat`. Shared by the inference, app and browser tests."""
    root = tmp_path_factory.getbasetemp() / "subject-library"
    subjects = (("sks", "dog", dog_dir, ("a photo of sks dog",)), ("zwx", "cat", cat_dir, ()))
    for token, noun, photos, sample_prompts in subjects:
        out = root / f"{token}-{noun}"
        if (out / ADAPTER_FILENAME).exists():
            continue
        train(TrainConfig(instance_dir=str(photos), base=str(tiny_base), token=token, class_noun=noun,
                          output_dir=str(out), resolution=SIZE, steps=6, prior=False, lr=5e-2, save_dtype="fp32",
                          log_every=100, sample_prompts=sample_prompts))
    return root


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory, tiny_base, dog_dir, cat_dir) -> Path:
    return trained_subjects(tmp_path_factory, tiny_base, dog_dir, cat_dir)


@pytest.fixture(scope="module")
def resident(tiny_base, library_dir) -> ResidentPipeline:
    pipeline = ResidentPipeline.from_base(str(tiny_base), device="cpu")
    pipeline.sync(AdapterLibrary(library_dir))
    return pipeline


def plain_pipeline(base: Path, *adapters: Path):
    """A plain diffusers pipeline (same scheduler family as ours), optionally with adapters loaded the usual way."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for i, adapter in enumerate(adapters):
        pipe.load_lora_weights(str(adapter), adapter_name=f"a{i}")
    return pipe


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def reference_images(pipe, prompt: str = PROMPT, seed: int = 0, n: int = 1) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    return pixels(pipe(prompt=[prompt] * n, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                       generator=generators).images)


def ours(resident: ResidentPipeline, *adapters: tuple[str, float], prompt: str = PROMPT, seed: int = 0,
         n: int = 1) -> np.ndarray:
    request = GenerationRequest(prompt=prompt, adapters=adapters, steps=STEPS, seed=seed, num_images=n,
                                height=SIZE, width=SIZE)
    return pixels(resident.generate(request).images)


# -- library ------------------------------------------------------------------------------------------------------
def test_library_finds_adapters_reads_metadata_and_refreshes(tmp_path, library_dir, caplog):
    lib_dir = tmp_path / "lib"
    shutil.copytree(library_dir / "sks-dog", lib_dir / "sks-dog")
    shutil.copy(library_dir / "zwx-cat" / ADAPTER_FILENAME, lib_dir / "loose-cat.safetensors")
    (lib_dir / "evil.bin").write_bytes(b"not loaded: pickles are never picked up")
    (lib_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (lib_dir / ".pytorch_lora_weights.safetensors.abc.partial").write_bytes(b"")
    (lib_dir / "empty-folder").mkdir()

    with caplog.at_level(logging.WARNING, logger="lora_dreambooth"):
        library = AdapterLibrary(lib_dir)
    assert library.names == ["loose-cat", "sks-dog"]
    assert "broken" in library.problems and "broken" in caplog.text
    dog, cat = library.get("sks-dog"), library.get("loose-cat")
    assert (dog.token, dog.class_noun, dog.instance_prompt) == ("sks", "dog", "a photo of sks dog")
    assert (cat.token, cat.class_noun, cat.instance_prompt) == ("zwx", "cat", "a photo of zwx cat")
    assert dog.label == "sks dog · sks-dog" and cat.label == "zwx cat · loose-cat"
    assert dog.preview == lib_dir / "sks-dog" / "samples.png" and cat.preview is None
    assert dog.base_model and dog.variant == "lora"

    assert not library.refresh(), "nothing changed on disk"
    shutil.copytree(library_dir / "zwx-cat", lib_dir / "zwx-cat")
    (lib_dir / "loose-cat.safetensors").unlink()
    shutil.copy(library_dir / "zwx-cat" / ADAPTER_FILENAME, lib_dir / "sks-dog" / ADAPTER_FILENAME)  # replaced
    changes = library.refresh()
    assert (changes.added, changes.changed, changes.removed) == (["zwx-cat"], ["sks-dog"], ["loose-cat"])
    assert library.get("sks-dog").token == "zwx"


@pytest.mark.parametrize("name", ["../sks-dog", "/etc/passwd", "sks-dog/../zwx-cat", "..", "~root", "C:\\x",
                                  "a\\b", "", "bad\x00name", ".hidden"])
def test_subject_names_are_library_keys_never_paths(library_dir, name):
    library = AdapterLibrary(library_dir)
    with pytest.raises(UserInputError):
        library.get(name)
    with pytest.raises(UserInputError):
        check_subject_name(name)


def test_unknown_subject_names_the_choices(library_dir):
    with pytest.raises(UserInputError, match=r"unknown subject 'nope'.*sks-dog, zwx-cat"):
        AdapterLibrary(library_dir).get("nope")
    with pytest.raises(UserInputError, match="is not a folder"):
        AdapterLibrary(library_dir / "missing")


# -- resident adapters ------------------------------------------------------------------------------------------
def test_switching_gives_each_subject_its_own_output_without_disk_reads(tmp_path, tiny_base, library_dir):
    lib_copy = tmp_path / "lib"
    shutil.copytree(library_dir, lib_copy, ignore=shutil.ignore_patterns("logs"))
    resident = ResidentPipeline.from_base(str(tiny_base), device="cpu")
    report = resident.sync(AdapterLibrary(lib_copy))
    assert report.loaded == ["sks-dog", "zwx-cat"]
    shutil.rmtree(lib_copy)  # from here on, nothing can be read from disk: switching must not need it

    dog_1 = ours(resident, ("sks-dog", 1.0))
    cat = ours(resident, ("zwx-cat", 1.0))
    dog_2 = ours(resident, ("sks-dog", 1.0))
    none = ours(resident)
    assert resident.base_loads == 1 and resident.adapter_disk_loads == 2 and resident.generations == 4

    expected_dog = reference_images(plain_pipeline(tiny_base, library_dir / "sks-dog"))
    expected_cat = reference_images(plain_pipeline(tiny_base, library_dir / "zwx-cat"))
    expected_base = reference_images(plain_pipeline(tiny_base))
    np.testing.assert_array_equal(dog_1, expected_dog)
    np.testing.assert_array_equal(dog_2, expected_dog)
    np.testing.assert_array_equal(cat, expected_cat)
    np.testing.assert_array_equal(none, expected_base)
    assert np.abs(expected_dog - expected_cat).max() > 10, "the two subjects should look different"
    assert np.abs(expected_dog - expected_base).max() > 10, "the adapter should change the image"


def test_mix_strength_and_none(resident, tiny_base, library_dir):
    mix = ours(resident, ("sks-dog", 1.0), ("zwx-cat", 0.5))
    reference = plain_pipeline(tiny_base, library_dir / "sks-dog", library_dir / "zwx-cat")
    reference.set_adapters(["a0", "a1"], adapter_weights=[1.0, 0.5])
    np.testing.assert_array_equal(mix, reference_images(reference))
    assert np.abs(mix - ours(resident, ("sks-dog", 1.0))).max() > 0
    assert np.abs(mix - ours(resident, ("zwx-cat", 0.5))).max() > 0
    np.testing.assert_array_equal(ours(resident, ("sks-dog", 0.0)), ours(resident))  # strength 0 == base
    half = ours(resident, ("sks-dog", 0.5))
    assert 0 < np.abs(half - ours(resident)).max() and 0 < np.abs(half - ours(resident, ("sks-dog", 1.0))).max()


def test_fused_output_matches_unfused(resident):
    unfused_dog, unfused_mix = ours(resident, ("sks-dog", 1.0)), ours(resident, ("sks-dog", 0.7), ("zwx-cat", 0.6))
    unfused_base = ours(resident)
    resident.fuse = True
    try:
        fused_dog = ours(resident, ("sks-dog", 1.0))
        assert resident.stats()["fused"]
        # merged wrappers are out of the forward path (base-speed generation), yet can still be unfused
        assert not any(getattr(m, "merged", False) for m in resident.pipe.unet.modules())
        fused_dog_again = ours(resident, ("sks-dog", 1.0))  # stays fused: no re-fuse
        fused_mix = ours(resident, ("sks-dog", 0.7), ("zwx-cat", 0.6))
        base_after_fusing = ours(resident)
    finally:
        resident.fuse = False
    ours(resident, ("zwx-cat", 1.0))
    assert not resident.stats()["fused"]
    assert any(hasattr(m, "lora_A") for m in resident.pipe.unet.modules())  # wrappers are back
    # fusing rounds differently in float32 (~1e-6): at most one 8-bit level apart
    assert np.abs(fused_dog - unfused_dog).max() <= 1 and np.abs(fused_mix - unfused_mix).max() <= 1
    np.testing.assert_array_equal(fused_dog, fused_dog_again)
    assert np.abs(base_after_fusing - unfused_base).max() <= 1


def test_concurrent_requests_do_not_share_adapter_state(resident):
    expected = {"sks-dog": ours(resident, ("sks-dog", 1.0)), "zwx-cat": ours(resident, ("zwx-cat", 1.0))}
    results: dict[str, list[np.ndarray]] = {"sks-dog": [], "zwx-cat": []}

    def worker(name: str) -> None:
        for _ in range(3):
            results[name].append(ours(resident, (name, 1.0)))

    threads = [threading.Thread(target=worker, args=(name,)) for name in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, images in results.items():
        assert len(images) == 3
        for image in images:
            np.testing.assert_array_equal(image, expected[name])


def test_seeds_are_per_image_so_any_image_can_be_reproduced_alone(resident):
    batch = ours(resident, ("sks-dog", 1.0), seed=7, n=2)
    assert np.abs(batch[0] - batch[1]).max() > 0
    second_alone = ours(resident, ("sks-dog", 1.0), seed=8)
    assert np.abs(batch[1] - second_alone[0]).max() <= 1  # batched vs single UNet calls may round differently


def test_requests_for_unknown_subjects_are_refused(resident):
    for name in ("nope", "../sks-dog", "/tmp/x"):
        with pytest.raises(UserInputError):
            ours(resident, (name, 1.0))


# -- load_adapter for plain diffusers code ---------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, *, tensors=None, metadata=None) -> Path:
    with safe_open(str(src), framework="pt") as fh:
        original_meta = fh.metadata()
    data = safetensors.torch.load_file(str(src)) if tensors is None else tensors
    safetensors.torch.save_file(data, str(dst), metadata=original_meta if metadata is None else metadata)
    return dst


def test_load_adapter_matches_load_lora_weights_and_checks_inputs(tmp_path, tiny_base, library_dir, caplog):
    dog_file = library_dir / "sks-dog" / ADAPTER_FILENAME
    pipe = plain_pipeline(tiny_base)
    assert load_adapter(pipe, library_dir / "sks-dog") == "ld_sks_dog"
    np.testing.assert_array_equal(reference_images(pipe),
                                  reference_images(plain_pipeline(tiny_base, library_dir / "sks-dog")))

    # pickle files: refused unless allowed; broken files: one line
    (tmp_path / "adapter.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(UserInputError, match="pickle"):
        load_adapter(pipe, tmp_path / "adapter.bin")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(dog_file.read_bytes()[:-100])
    with pytest.raises(UserInputError, match="not a valid .safetensors"):
        load_adapter(pipe, truncated)

    # a LoRA for another architecture: wrong shapes, or layers this model does not have
    tensors = safetensors.torch.load_file(str(dog_file))
    wider = {k: (torch.zeros(v.shape[0], v.shape[1] + 8) if ".down." in k else v) for k, v in tensors.items()}
    with pytest.raises(UserInputError, match=r"does not fit this pipeline: .* takes \d+ inputs") as wrong_shape:
        load_adapter(pipe, _rewrite(dog_file, tmp_path / "wider.safetensors", tensors=wider))
    assert "\n" not in str(wrong_shape.value)
    foreign = {k.replace("unet.down_blocks.0.", "unet.down_blocks.7."): v for k, v in tensors.items()}
    with pytest.raises(UserInputError, match="no layer 'down_blocks.7"):
        load_adapter(pipe, _rewrite(dog_file, tmp_path / "foreign.safetensors", tensors=foreign))
    sdxl = {k.replace("text_encoder.", "text_encoder_2."): v for k, v in tensors.items()}
    with pytest.raises(UserInputError, match="text_encoder_2"):
        load_adapter(pipe, _rewrite(dog_file, tmp_path / "sdxl.safetensors", tensors=sdxl))
    assert set(pipe.get_list_adapters()["unet"]) == {"ld_sks_dog"}, "failed loads must leave nothing behind"

    # metadata: missing -> warning, still loads; other base -> warning
    with safe_open(str(dog_file), framework="pt") as fh:
        meta = dict(fh.metadata())
    foreign_tool = _rewrite(dog_file, tmp_path / "other-tool.safetensors",
                            metadata={k: v for k, v in meta.items() if k != METADATA_KEY})
    other_base = _rewrite(dog_file, tmp_path / "other-base.safetensors", metadata={
        **meta, METADATA_KEY: json.dumps({**json.loads(meta[METADATA_KEY]), "base_model": "org/some-other-model"})})
    with caplog.at_level(logging.WARNING, logger="lora_dreambooth"):
        assert load_adapter(pipe, foreign_tool) == "ld_other_tool"
        assert load_adapter(pipe, other_base, name="custom") == "custom"
    assert "no lora-dreambooth metadata" in caplog.text
    assert "trained on base 'org/some-other-model'" in caplog.text


# -- requests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"prompt": "  "}, "prompt is empty"),
    ({"steps": 0}, "steps must be between 1 and 150"),
    ({"steps": 10_000}, "steps must be between"),
    ({"steps": 2.5}, "whole number"),
    ({"height": 30}, "height must be a multiple of 8"),
    ({"width": 8192}, "width must be a multiple of 8 between 8 and 2048"),
    ({"num_images": 100}, "number of images must be between 1 and 8"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"guidance": -1}, "guidance must be between 0"),
    ({"seed": -1}, "seed must be between"),
    ({"seed": "abc"}, "seed must be a whole number"),
    ({"adapters": (("sks-dog", 5.0),)}, "strength of 'sks-dog' must be between -2.0 and 2.0"),
    ({"adapters": (("sks-dog", 1.0), ("sks-dog", 0.5))}, "same subject is chosen twice"),
    ({"adapters": (("../x", 1.0),)}, "not a library name"),
])
def test_bad_requests_get_one_readable_line(change, message):
    with pytest.raises(UserInputError, match=message):
        replace(GenerationRequest(prompt=PROMPT), **change).validated()


def test_adapter_spec_parsing():
    assert parse_adapter_spec("out/sks-dog:0.8") == ("out/sks-dog", 0.8)
    assert parse_adapter_spec("out/sks-dog") == ("out/sks-dog", 1.0)
    assert parse_adapter_spec("C:\\adapters\\dog") == ("C:\\adapters\\dog", 1.0)
    assert parse_adapter_spec("weird:name:-0.5") == ("weird:name", -0.5)
