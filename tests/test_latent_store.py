"""Latents kept on disk between runs: a rerun loads them and trains exactly as encoding would; every input the
latents depend on changes the key; a damaged file is a miss and an unwritable cache only warns. Real tiny VAE and
training runs through the CLI entry point; CPU, a few seconds each."""
from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from lora_dreambooth.data.examples import encode_latents, image_generators
from lora_dreambooth.data.latent_store import LatentStore, weights_fingerprint
from lora_dreambooth.files.metadata import ADAPTER_FILENAME
from lora_dreambooth.training.startup import encoding_precision

from .conftest import cli_in_process, small_train_args


@pytest.fixture(autouse=True, scope="module")
def _bitwise(deterministic_gpu_kernels):
    """The runs below are compared bit for bit."""


@pytest.fixture(scope="module")
def vae(tiny_base):
    return AutoencoderKL.from_pretrained(tiny_base / "vae").eval()


def _pixels(seed: int = 0, count: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_rerun_loads_the_latents_and_trains_exactly_as_encoding_would(tmp_path, tiny_base, dog_dir, capsys,
                                                                        monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_DREAMBOOTH_CACHE", str(cache))
    adapters, hits = {}, {}
    for name, extra in (("first", ()), ("rerun", ()), ("no-cache", ("--no-latent-cache",))):
        before = sorted(p.name for p in (cache / "latents").glob("*.safetensors"))
        run = cli_in_process(capsys, *small_train_args(dog_dir, tiny_base, tmp_path / name, *extra))
        assert run.returncode == 0, run.stderr
        hits[name] = [line for line in run.stderr.splitlines() if "loaded from the cache" in line]
        adapters[name] = load_file(tmp_path / name / ADAPTER_FILENAME)
        if name == "first":  # the photos and the class images: one file each
            assert len(list((cache / "latents").glob("*.safetensors"))) == 2
        if name == "no-cache":
            assert sorted(p.name for p in (cache / "latents").glob("*.safetensors")) == before
    assert hits["first"] == [] and hits["no-cache"] == []
    assert len(hits["rerun"]) == 2 and "latents of 5 images" in hits["rerun"][0]
    assert not list(cache.glob("latents/*.partial"))
    for name in ("rerun", "no-cache"):
        assert adapters[name].keys() == adapters["first"].keys()
        for key, tensor in adapters["first"].items():
            assert torch.equal(adapters[name][key], tensor), (name, key)


def test_the_key_changes_with_every_input_the_latents_depend_on(tmp_path, vae):
    store = LatentStore(tmp_path)
    pixels = _pixels()
    key = store.key(vae, pixels, seed=0, flip=False, device_type="cpu")
    assert store.key(copy.deepcopy(vae), pixels.clone(), seed=0, flip=False, device_type="cpu") == key
    one_pixel = pixels.clone()
    one_pixel[1, 2, 3, 4] ^= 1
    nudged = copy.deepcopy(vae)
    with torch.no_grad():
        weight = nudged.encoder.conv_in.weight
        weight[0, 0, 0, 0] = torch.nextafter(weight[0, 0, 0, 0], torch.tensor(10.0))  # one bit of one weight
    other_config = AutoencoderKL.from_config({**vae.config, "scaling_factor": 0.2})
    other_config.load_state_dict(vae.state_dict())
    variants = [
        store.key(vae, one_pixel, seed=0, flip=False, device_type="cpu"),
        store.key(vae, pixels[:2], seed=0, flip=False, device_type="cpu"),
        store.key(vae, pixels, seed=1, flip=False, device_type="cpu"),
        store.key(vae, pixels, seed=0, flip=True, device_type="cpu"),
        store.key(vae, pixels, seed=0, flip=False, device_type="cuda"),
        store.key(nudged, pixels, seed=0, flip=False, device_type="cpu"),
        store.key(other_config, pixels, seed=0, flip=False, device_type="cpu"),
    ]
    with torch.autocast("cpu", dtype=torch.float16):  # latents encoded under autocast are rounded otherwise
        variants.append(store.key(vae, pixels, seed=0, flip=False, device_type="cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        variants.append(store.key(vae, pixels, seed=0, flip=False, device_type="cpu"))
    assert len(set(variants)) == len(variants) and key not in variants


def test_latents_encoded_under_fp16_autocast_are_fp32_s_rounded_and_an_overflow_is_encoded_in_fp32(vae, caplog):
    """The encoding precision of GPUs without fast fp32 (`encoding_precision`: a T4 runs under fp16 autocast), on a
    CPU: the posterior's noise is drawn in fp32 either way, so only the rounding differs."""
    pixels = _pixels(count=4)
    generators = lambda: image_generators(0, range(4), "cpu")  # noqa: E731 - fresh ones for each encoding
    exact = encode_latents(vae, pixels, generator=generators(), batch_size=2)
    with torch.autocast("cpu", dtype=torch.float16):
        rounded = encode_latents(vae, pixels, generator=generators(), batch_size=2)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)
    assert torch.allclose(rounded, exact, atol=2e-2, rtol=1e-2)
    overflowing = copy.deepcopy(vae)
    with torch.no_grad():
        overflowing.encoder.conv_in.weight.mul_(1e6)  # past fp16's largest value: the encoder's output turns inf/NaN
        reference = encode_latents(overflowing, pixels, generator=generators(), batch_size=2)
    with caplog.at_level(logging.INFO, logger="lora_dreambooth"), torch.autocast("cpu", dtype=torch.float16):
        redone = encode_latents(overflowing, pixels, generator=generators(), batch_size=2)
    assert "overflowed fp16" in caplog.text and torch.isfinite(reference).all()
    assert torch.equal(redone, reference)


def test_the_encoding_precision_is_fp16_autocast_only_where_a_gpu_computes_in_fp16():
    import contextlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.autocast("cuda") on a machine without CUDA warns that it is off
        half = encoding_precision(torch.device("cuda"), torch.float16)
    assert isinstance(half, torch.autocast) and half.fast_dtype == torch.float16
    for device, dtype in (("cuda", torch.bfloat16), ("cuda", torch.float32), ("cpu", torch.float16)):
        assert isinstance(encoding_precision(torch.device(device), dtype), contextlib.nullcontext)


def test_vaes_made_and_freed_one_after_another_each_get_their_own_key(tmp_path, vae):
    """The fingerprint is remembered per VAE object, not per id(): a freed VAE's id is reused by the next one
    (this made the test above fail now and then, and gave 8 keys for 20 different VAEs)."""
    store, pixels = LatentStore(tmp_path), _pixels()
    keys = set()
    for nudge in range(20):
        other = copy.deepcopy(vae)
        with torch.no_grad():
            other.encoder.conv_in.weight[0, 0, 0, 0] += nudge
        keys.add(store.key(other, pixels, seed=0, flip=False, device_type="cpu"))
        del other
    assert len(keys) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_weights_fingerprint_is_the_same_on_the_gpu(vae):
    assert weights_fingerprint(copy.deepcopy(vae).cuda()) == weights_fingerprint(vae)


def test_a_damaged_or_foreign_file_is_a_miss_and_an_unwritable_cache_only_warns(tmp_path, caplog):
    store = LatentStore(tmp_path / "latents")
    latents = torch.randn(3, 4, 4, 4)
    store.save("good", {"plain": latents})
    assert torch.equal(store.load("good", count=3, flip=False, device="cpu")["plain"], latents)
    assert store.load("good", count=4, flip=False, device="cpu") is None  # another number of images
    assert store.load("good", count=3, flip=True, device="cpu") is None  # no mirrored set in it
    assert store.load("absent", count=3, flip=False, device="cpu") is None
    store.path("damaged").write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="lora_dreambooth"):
        assert store.load("damaged", count=3, flip=False, device="cpu") is None
    assert "unreadable" in caplog.text and "damaged" in caplog.text

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_dreambooth"):
        LatentStore(blocked / "latents").save("key", {"plain": latents})  # its folder cannot be made
    assert "could not write" in caplog.text


def test_only_the_most_recently_used_files_are_kept(tmp_path):
    store = LatentStore(tmp_path, max_files=3)
    for age, key in enumerate(("a", "b", "c")):
        store.save(key, {"plain": torch.zeros(1, 4, 2, 2)})
        os.utime(store.path(key), (1_000_000 + age, 1_000_000 + age))  # a is the oldest
    assert store.load("a", count=1, flip=False, device="cpu") is not None  # a use makes it the newest
    store.save("d", {"plain": torch.zeros(1, 4, 2, 2)})
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["a", "c", "d"]  # b was the least recent


def test_the_cache_stays_within_its_bytes_and_keeps_the_newest_file(tmp_path):
    store = LatentStore(tmp_path, max_bytes=1)  # smaller than any file
    for age, key in enumerate(("a", "b")):
        store.save(key, {"plain": torch.zeros(1, 4, 2, 2)})
        os.utime(store.path(key), (1_000_000 + age, 1_000_000 + age))
    assert [p.stem for p in tmp_path.glob("*.safetensors")] == ["b"]
