"""Every bad input a user can hand us, through the real CLI entry point: exit code 2, one `Error:` line naming the
culprit, no traceback, nothing written; or, with --skip-bad-images, a warning per skipped file and a finished run.

The corpus is generated here (no binary blobs). Most cases call `lora_dreambooth.cli.main` in-process (the same
code path as the console script, without ~5 s of start-up each); one case runs the real subprocess. A tripwire
makes every refusal prove that it happened before the base model was loaded or anything was written.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_dreambooth.files.metadata import ADAPTER_FILENAME, read_summary

from .conftest import cli_in_process, run_cli

# --- the corpus: generators -------------------------------------------------------------------------------------

def noisy(width: int = 48, height: int = 40, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb without the bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


class PickleTrap:
    """Unpickling this object creates `marker`: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_pickle_trap(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"state_dict": PickleTrap(marker)}))
    return path


# Bad photos: file name -> (bytes, words the error must contain).
BAD_PHOTOS = {
    "empty.jpg": (lambda: b"", "empty (0 bytes)"),
    "cut.jpg": (lambda: encoded(noisy(128, 96), "JPEG")[:1500], "truncated"),
    "cut.png": (lambda: encoded(noisy(128, 96), "PNG")[:3000], "truncated"),
    "notes.jpg": (lambda: b"these are not pixels\n", "not an image that can be read"),
    "IMG_0001.jpg": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "HEIC"),
    "bomb.png": (lambda: png_header_claiming(100_000, 100_000), "decompression bomb"),
}


def odd_but_usable_photos(folder: Path) -> list[str]:
    """Photos that must be converted, not refused: CMYK, 16-bit, palette + transparency, grey, RGBA, EXIF-rotated,
    animated GIF/WebP, and one smaller than the training resolution. Returns the names that must warn."""
    folder.mkdir(parents=True, exist_ok=True)
    noisy(40, 40, 1, "CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    palette = noisy(40, 40, 2).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.save(folder / "palette.png", transparency=0)
    noisy(40, 40, 3, "L").save(folder / "grey.png")
    noisy(40, 40, 4, "RGBA").save(folder / "alpha.png")
    rotated = noisy(48, 40, 5)
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated.save(folder / "rotated.jpg", exif=exif)
    frames = [noisy(40, 40, s) for s in (6, 7)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(folder / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    noisy(16, 16, 8).save(folder / "tiny.png")
    return ["anim.gif", "anim.webp", "tiny.png"]


# --- helpers ----------------------------------------------------------------------------------------------------

def train_args(instance: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(instance), "--base", str(base), "--token", "sks", "--class-noun", "dog", "--output",
            str(out), "--resolution", "32", "--steps", "1", "--no-prior", "--save-dtype", "fp32", *extra]


def assert_refused(run, *fragments: str, out: Path | None = None) -> str:
    """Exit code 2, exactly one `Error:` line (the last one) holding every fragment, no traceback, no output."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], run.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in run.stderr + run.stdout
    if out is not None:
        assert not out.exists(), f"{out} was created by a refused run"
    return errors[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Tripwire: refusals must come before the base model loads, class images are made or the output is touched."""
    from lora_dreambooth.training import priors
    from lora_dreambooth.training import recipe as training

    def tripped(*args, **kwargs):
        raise AssertionError("expensive setup started before the bad input was refused")

    monkeypatch.setattr(training, "load_base", tripped)
    monkeypatch.setattr(priors, "generate_class_images", tripped)
    monkeypatch.setattr(training, "make_accelerator", tripped)


def one_good_photo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    noisy(48, 40).save(folder / "good.png")
    return folder


# --- instance folder --------------------------------------------------------------------------------------------

def _missing(tmp: Path) -> Path:
    return tmp / "no-such-folder"


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _a_file(tmp: Path) -> Path:
    noisy().save(tmp / "photo.png")
    return tmp / "photo.png"


def _only_non_images(tmp: Path) -> Path:
    folder = tmp / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("caption")
    (folder / "IMG_1.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    return folder


def _only_hidden_and_system(tmp: Path) -> Path:
    folder = tmp / "hidden"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "._photo.jpg").write_bytes(b"\0\5\26\7")  # macOS AppleDouble sidecar
    return folder


@pytest.mark.parametrize("make, fragments", [
    (_missing, ("instance folder", "does not exist")),
    (_empty, ("instance folder", "is empty")),
    (_a_file, ("is a file, not a folder",)),
    (_only_non_images, ("none is an image", "notes.txt", "HEIC files are not supported")),
    (_only_hidden_and_system, ("is empty",)),
], ids=["missing", "empty", "file", "non-images", "hidden-only"])
def test_bad_instance_folder(tmp_path, tiny_base, capsys, nothing_loads, make, fragments):
    instance = make(tmp_path)
    run = cli_in_process(capsys, *train_args(instance, tiny_base, tmp_path / "out"))
    assert_refused(run, f"'{instance}'", *fragments, out=tmp_path / "out")


# --- photos -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BAD_PHOTOS))
def test_bad_photo_is_named_before_anything_loads(tmp_path, tiny_base, capsys, nothing_loads, name):
    folder = one_good_photo(tmp_path / "photos")
    make_bytes, fragment = BAD_PHOTOS[name]
    (folder / name).write_bytes(make_bytes())
    run = cli_in_process(capsys, *train_args(folder, tiny_base, tmp_path / "out"))
    assert_refused(run, f"'{folder / name}'", fragment, out=tmp_path / "out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read every file")
def test_unreadable_photo(tmp_path, tiny_base, capsys, nothing_loads):
    folder = one_good_photo(tmp_path / "photos")
    secret = folder / "secret.png"
    noisy().save(secret)
    secret.chmod(0)
    try:
        run = cli_in_process(capsys, *train_args(folder, tiny_base, tmp_path / "out"))
    finally:
        secret.chmod(0o644)
    assert_refused(run, f"'{secret}'", "permission denied", out=tmp_path / "out")


def test_bad_photo_in_a_real_process_with_non_ascii_path(tmp_path, tiny_base):
    """The console entry point itself (a subprocess): no traceback, exit 2, the odd path quoted intact."""
    folder = one_good_photo(tmp_path / "fotos del perro ñ 犬")
    bad = folder / "día 1.jpg"
    bad.write_bytes(encoded(noisy(128, 96), "JPEG")[:1500])
    proc = run_cli(*train_args(folder, tiny_base, tmp_path / "out"))
    assert_refused(proc, f"'{bad}'", "truncated", out=tmp_path / "out")


def test_skip_bad_images_warns_per_file_and_trains_on_the_rest(tmp_path, tiny_base, capsys):
    folder = tmp_path / "mixed photos"
    folder.mkdir()
    for seed in range(2):
        noisy(48, 40, seed).save(folder / f"good-{seed}.png")
    for name, (make_bytes, _) in BAD_PHOTOS.items():
        (folder / name).write_bytes(make_bytes())
    (folder / "good-0.txt").write_text("a photo of sks dog on grass")  # caption sidecar: not an image
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "._good-0.png").write_bytes(b"\0\5\26\7")
    out = tmp_path / "out"
    run = cli_in_process(capsys, *train_args(folder, tiny_base, out, "--skip-bad-images"))
    assert run.returncode == 0, run.stderr[-3000:]
    skipped = [line for line in run.stderr.splitlines() if line.startswith("Warning: skipping")]
    assert len(skipped) == len(BAD_PHOTOS), run.stderr
    for name in BAD_PHOTOS:
        assert any(f"'{folder / name}'" in line for line in skipped), name
    for ignored in ("good-0.txt", ".DS_Store", "Thumbs.db", "._good-0.png"):
        assert ignored not in run.stderr
    assert "Traceback" not in run.stderr
    assert read_summary(out / ADAPTER_FILENAME)["num_instance_images"] == 2


def test_odd_photos_are_converted_with_warnings_and_train(tmp_path, tiny_base, capsys):
    folder = tmp_path / "odd fotos ñ"
    warned = odd_but_usable_photos(folder)
    out = tmp_path / "out"
    run = cli_in_process(capsys, *train_args(folder, tiny_base, out))
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("Warning:")]
    for name in warned:
        assert any(name in line for line in warnings), (name, warnings)
    assert sum("animated" in line for line in warnings) == 2
    assert any("upscaled" in line for line in warnings)
    assert read_summary(out / ADAPTER_FILENAME)["num_instance_images"] == 9


def test_a_single_photo_is_allowed_with_a_warning(tmp_path, tiny_base, capsys):
    folder = one_good_photo(tmp_path / "one")
    run = cli_in_process(capsys, *train_args(folder, tiny_base, tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "holds only one image" in run.stderr
    assert (tmp_path / "out" / ADAPTER_FILENAME).is_file()


# --- options ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragments", [
    (("--token", "dog"), ("--token 'dog' equals --class-noun",)),
    (("--token", "Dog"), ("equals --class-noun",)),
    (("--token", " "), ("--token must not be empty",)),
    (("--token", ""), ("missing --token",)),
    (("--rank", "0"), ("--rank must be a positive integer, got 0",)),
    (("--rank", "-4"), ("--rank must be a positive integer, got -4",)),
    (("--rank", "four"), ("Invalid value for '--rank'",)),
    (("--resolution", "500"), ("--resolution must be a positive multiple of 8, got 500",)),
    (("--steps", "0"), ("--steps must be positive, got 0",)),
    (("--lr", "0"), ("--lr must be positive, got 0",)),
    (("--lr", "-1e-4"), ("--lr must be positive",)),
    (("--mixed-precision", "fp8"), ("Invalid value for '--mixed-precision'", "'fp8'")),
    (("--checkpoints-total-limit", "0"), ("--checkpoints-total-limit must be positive",)),
    (("--config", "no-such.toml"), ("config file 'no-such.toml' does not exist",)),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) and v and v[0].startswith("--") else None)
def test_bad_option(tmp_path, tiny_base, dog_dir, capsys, nothing_loads, extra, fragments):
    run = cli_in_process(capsys, *train_args(dog_dir, tiny_base, tmp_path / "out", *extra))
    assert_refused(run, *fragments, out=tmp_path / "out")


def test_malformed_toml_config(tmp_path, tiny_base, dog_dir, capsys, nothing_loads):
    config = tmp_path / "run.toml"
    config.write_text("rank = [unclosed\n")
    run = cli_in_process(capsys, *train_args(dog_dir, tiny_base, tmp_path / "out", "--config", str(config)))
    assert_refused(run, f"config file '{config}' is not valid TOML", out=tmp_path / "out")


def test_fp16_on_a_machine_without_cuda(tmp_path, tiny_base, dog_dir, capsys, nothing_loads):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    run = cli_in_process(capsys, *train_args(dog_dir, tiny_base, tmp_path / "out", "--mixed-precision", "fp16"))
    assert_refused(run, "--mixed-precision fp16 needs a CUDA GPU", "bf16", out=tmp_path / "out")


def test_output_holding_a_finished_adapter_is_kept_unless_overwrite(tmp_path, tiny_base, dog_dir, capsys,
                                                                    nothing_loads):
    out = tmp_path / "out"
    out.mkdir()
    (out / ADAPTER_FILENAME).write_bytes(b"precious")
    run = cli_in_process(capsys, *train_args(dog_dir, tiny_base, out))
    assert_refused(run, f"output folder '{out}' already holds a finished adapter", "--overwrite")
    assert (out / ADAPTER_FILENAME).read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_FILENAME]


def test_output_that_is_a_file(tmp_path, tiny_base, dog_dir, capsys, nothing_loads):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    run = cli_in_process(capsys, *train_args(dog_dir, tiny_base, out))
    assert_refused(run, f"--output '{out}' exists and is not a folder")
    assert out.read_text() == "mine"


# --- base model -------------------------------------------------------------------------------------------------

def base_variant(tiny_base: Path, folder: Path, *, drop: tuple[str, ...] = (), index: dict | None = None,
                 unet_config: dict | None = None, pickle_unet: Path | None = None) -> Path:
    """A copy of the tiny base (parts linked, not copied) with parts removed or replaced."""
    folder.mkdir(parents=True)
    data = json.loads((tiny_base / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**data, **(index or {})}))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part in drop:
            continue
        if part == "unet" and (unet_config or pickle_unet):
            (folder / "unet").mkdir()
            config = json.loads((tiny_base / "unet" / "config.json").read_text())
            (folder / "unet" / "config.json").write_text(json.dumps({**config, **(unet_config or {})}))
            if pickle_unet:
                write_pickle_trap(folder / "unet" / "diffusion_pytorch_model.bin", pickle_unet)
            else:
                (folder / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(
                    tiny_base / "unet" / "diffusion_pytorch_model.safetensors")
            continue
        (folder / part).symlink_to(tiny_base / part, target_is_directory=True)
    return folder


def test_bad_base_models(tmp_path, tiny_base, dog_dir, capsys, nothing_loads):
    marker = tmp_path / "pickle-was-loaded"
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0" * 16)
    no_index = tmp_path / "no-index"
    shutil.copytree(tiny_base / "scheduler", no_index / "scheduler")
    cases = [
        (tmp_path / "nowhere", ("does not exist",)),
        (single, ("not a readable .safetensors file",)),
        (no_index, ("has no model_index.json",)),
        (base_variant(tiny_base, tmp_path / "no-vae", drop=("vae", "tokenizer")), ("missing vae, tokenizer",)),
        (base_variant(tiny_base, tmp_path / "sdxl", index={"_class_name": "StableDiffusionXLPipeline",
                                                           "text_encoder_2": ["transformers", "X"]}),
         ("is SDXL", "only Stable Diffusion v1.x is supported")),
        (base_variant(tiny_base, tmp_path / "sd2", unet_config={"cross_attention_dim": 1024}),
         ("Stable Diffusion 2.x", "only v1.x is supported")),
        (base_variant(tiny_base, tmp_path / "pickled", pickle_unet=marker), ("pickle weights", "--allow-pickle")),
    ]
    for base, fragments in cases:
        out = tmp_path / f"out-{base.name}"
        run = cli_in_process(capsys, *train_args(dog_dir, base, out))
        assert_refused(run, f"'{base}", *fragments, out=out)
    assert not marker.exists(), "a pickle was unpickled"


# --- adapter files given to `inspect` ---------------------------------------------------------------------------

def lora_tensors(width: int = 32, rank: int = 4) -> dict[str, torch.Tensor]:
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    return {f"{prefix}.lora_A.weight": torch.randn(rank, width), f"{prefix}.lora_B.weight": torch.zeros(width, rank)}


def test_bad_adapter_files_for_inspect(tmp_path, capsys):
    from safetensors.torch import save_file

    marker = tmp_path / "pickle-was-loaded"
    good = tmp_path / "good.safetensors"
    save_file(lora_tensors(), str(good))
    data = good.read_bytes()
    (tmp_path / "folder").mkdir()
    cases = {
        "missing.safetensors": (None, ("does not exist",)),
        "folder": (None, (f"has no {ADAPTER_FILENAME}",)),
        "text.safetensors": (b"not tensors at all, just text\n", ("not a valid .safetensors file",)),
        "zero.safetensors": (b"", ("not a valid .safetensors file", "too short")),
        "truncated.safetensors": (data[: len(data) - 40], ("not a valid .safetensors file", "truncated")),
        "huge-header.safetensors": (struct.pack("<Q", 2**40) + b"{}", ("bad header length",)),
        "garbage-header.safetensors": (struct.pack("<Q", 8) + b"\xff\xfe{]]]]]" + b"\0" * 8, ("not a valid",)),
    }
    for name, (content, fragments) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        assert_refused(cli_in_process(capsys, "inspect", path), f"'{path}", *fragments)
    for suffix in (".bin", ".ckpt", ".pt"):
        path = write_pickle_trap(tmp_path / f"adapter{suffix}", marker)
        assert_refused(cli_in_process(capsys, "inspect", path), f"'{path}'", "pickle file", "--allow-pickle")
        assert_refused(cli_in_process(capsys, "inspect", path, "--allow-pickle"), "reads .safetensors files only")
    assert not marker.exists(), "a pickle was unpickled"


def test_adapter_without_metadata_still_inspects(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "other-tool.safetensors"
    save_file(lora_tensors(), str(path))
    run = cli_in_process(capsys, "inspect", path)
    assert run.returncode == 0, run.stderr
    assert "none from lora-dreambooth" in run.stdout and "loaders assume alpha = rank" in run.stdout


# --- adapter files given to `generate` --------------------------------------------------------------------------

def generate_args(base: Path, adapter: Path, out: Path) -> list[str]:
    return ["generate", "--base", str(base), "--adapter", str(adapter), "--prompt", "a photo of sks dog", "--out",
            str(out), "--num-images", "1", "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]


def test_bad_adapter_files_for_generate_fail_before_the_base_loads(tmp_path, tiny_base, capsys, monkeypatch):
    from safetensors.torch import save_file

    from lora_dreambooth import models

    def tripped(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapter file was checked")

    monkeypatch.setattr(models, "load_base", tripped)
    marker = tmp_path / "pickle-was-loaded"
    good = tmp_path / "good.safetensors"
    save_file(lora_tensors(), str(good))
    data = good.read_bytes()
    (tmp_path / "empty-folder").mkdir()
    cases = {
        "missing.safetensors": (None, ("does not exist",)),
        "empty-folder": (None, (f"has no {ADAPTER_FILENAME}",)),
        "text.safetensors": (b"not tensors\n", ("not a valid .safetensors file",)),
        "truncated.safetensors": (data[: len(data) - 40], ("truncated",)),
    }
    for name, (content, fragments) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        out = tmp_path / f"out-{name}"
        assert_refused(cli_in_process(capsys, *generate_args(tiny_base, tmp_path / name, out)), f"'{tmp_path / name}",
                       *fragments, out=out)
    pickled = write_pickle_trap(tmp_path / "adapter.bin", marker)
    assert_refused(cli_in_process(capsys, *generate_args(tiny_base, pickled, tmp_path / "o")), "pickle file",
                   "--allow-pickle", out=tmp_path / "o")
    assert not marker.exists(), "a pickle was unpickled"


def test_adapters_for_another_architecture_or_without_metadata(tmp_path, tiny_base, capsys):
    from safetensors.torch import save_file

    sdxl_key = "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"
    other = {
        "sdxl-unet.safetensors": ({f"{sdxl_key}.lora_A.weight": torch.randn(4, 2048),
                                   f"{sdxl_key}.lora_B.weight": torch.zeros(1280, 4)}, "another architecture"),
        "sdxl-te2.safetensors": ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                  torch.randn(4, 1280)}, "'text_encoder_2', which this pipeline lacks"),
        "wide.safetensors": (lora_tensors(width=768), "takes 768 inputs, the layer has 32"),
    }
    for name, (tensors, fragment) in other.items():
        save_file(tensors, str(tmp_path / name))
        out = tmp_path / f"out-{name}"
        assert_refused(cli_in_process(capsys, *generate_args(tiny_base, tmp_path / name, out)), f"'{tmp_path / name}'",
                       fragment, out=out)
    plain = tmp_path / "no-metadata.safetensors"
    save_file(lora_tensors(), str(plain))  # fits the tiny UNet, written by "another tool": no metadata at all
    run = cli_in_process(capsys, *generate_args(tiny_base, plain, tmp_path / "images"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"Warning: adapter '{plain}' has no lora-dreambooth metadata" in run.stderr
    assert (tmp_path / "images" / "image-00-seed0.png").is_file()
