"""Class images: each picture is a function of (seed, index) only, whatever the batch size or number of processes;
the cache key and manifest record how they were made."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from lora_dreambooth.models import load_base
from lora_dreambooth.training.priors import (MANIFEST, check_manifest, decode_latents, default_class_dir,
                                             fitted_batch_size, generate_class_images, generation_key, pixel_bytes,
                                             plan_class_images, write_manifest)

PROMPT = "a photo of dog"


@pytest.fixture(scope="module")
def base(tiny_base):
    return load_base(str(tiny_base))


def _generate(base, folder, *, batch_size, rank=0, world=1, wanted=5, plan=None):
    plan = plan or plan_class_images(folder, wanted, rank=rank, world_size=world)
    return generate_class_images(base.pipeline, plan, prompt=PROMPT, resolution=32, steps=3, seed=11,
                                 batch_size=batch_size)


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("class-*.png"))}


def test_class_images_do_not_depend_on_batch_size_or_process_count(tmp_path, base):
    one = tmp_path / "one"
    assert _generate(base, one, batch_size=1) == 5
    reference = _pixels(one)
    assert len(reference) == 5 and len({a.tobytes() for a in reference.values()}) == 5  # distinct pictures
    _generate(base, tmp_path / "three", batch_size=3)  # batches of 3 + 2
    split = tmp_path / "split"
    plans = [plan_class_images(split, 5, rank=r, world_size=2) for r in (0, 1)]  # every rank lists, then writes
    assert [p.missing_indices for p in plans] == [[0, 2, 4], [1, 3]]
    for plan in reversed(plans):
        _generate(base, split, batch_size=4, plan=plan)
    for folder in (tmp_path / "three", split):
        pictures = _pixels(folder)
        assert pictures.keys() == reference.keys()
        for name in reference:
            np.testing.assert_array_equal(pictures[name], reference[name], err_msg=f"{folder.name}/{name}")
    # a cache topped up later gets the very pictures a single run would have made
    topped = tmp_path / "topped"
    _generate(base, topped, batch_size=2, wanted=2)
    _generate(base, topped, batch_size=2, wanted=5)
    assert all(np.array_equal(a, reference[n]) for n, a in _pixels(topped).items())


def test_pixel_bytes_are_the_bytes_of_diffusers_postprocess(base):
    import torch

    processor = base.pipeline().image_processor
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.7  # some beyond [-1, 1]
    pixels[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0])  # the ends, and 127.5: a rounding tie
    expected = [np.asarray(image) for image in processor.postprocess(pixels, output_type="pil")]
    ours = pixel_bytes(processor, pixels).permute(0, 2, 3, 1).numpy()
    assert ours.dtype == np.uint8
    assert all(np.array_equal(a, b) for a, b in zip(expected, ours))


def test_an_fp16_decode_that_overflows_is_redone_in_fp32(base, caplog):
    import copy

    import torch

    pipe = base.pipeline()
    latents = torch.randn(3, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = [np.asarray(image, dtype=np.int16) for image in decode_latents(pipe, latents)]  # the fp32 VAE
    half = copy.deepcopy(pipe.vae).to(torch.float16)
    rounded = [np.asarray(image, dtype=np.int16) for image in decode_latents(pipe, latents, vae=half)]
    assert max(np.abs(a - b).max() for a, b in zip(rounded, reference)) <= 2  # fp16 rounding: a level or two
    with torch.no_grad():
        half.decoder.conv_in.weight.mul_(1e6)  # past fp16's largest value: the decode turns inf/NaN
    with caplog.at_level(logging.INFO, logger="lora_dreambooth"):
        redone = decode_latents(pipe, latents, vae=half)
    assert "overflowed in fp16" in caplog.text
    assert all(np.array_equal(np.asarray(a, dtype=np.int16), b) for a, b in zip(redone, reference))


def test_batches_are_balanced_and_capped():
    import torch

    cpu = torch.device("cpu")
    assert fitted_batch_size(100, 1.0, cpu, 512) == 25  # 4 batches of 25, not 32 + 32 + 32 + 4
    assert fitted_batch_size(7, 1.0, cpu, 512) == 7
    assert fitted_batch_size(33, 1.0, cpu, 512, cap=32) == 17


def test_cache_key_and_manifest_record_the_generation_settings(tmp_path, caplog):
    assert default_class_dir("base", PROMPT, 512, 25) != default_class_dir("base", PROMPT, 512, 20)
    assert default_class_dir("base", PROMPT, 512, 25) == default_class_dir("base", PROMPT, 512, 25)
    (tmp_path / "class-00000.png").write_bytes(b"")
    write_manifest(tmp_path, base="base", prompt=PROMPT, resolution=512, seed=0, steps=25)
    made = json.loads((tmp_path / MANIFEST).read_text())
    assert made["generation"] == generation_key(25) and made["sampler"] and made["inference_steps"] == 25
    with caplog.at_level(logging.WARNING, logger="lora_dreambooth"):
        check_manifest(tmp_path, prompt=PROMPT, steps=25)
        assert not caplog.records
        check_manifest(tmp_path, prompt=PROMPT, steps=10)
    assert "were generated with " + generation_key(25) in caplog.text
