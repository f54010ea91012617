"""Discovery and decoding of training photos, over a corpus of bad and odd inputs built here with PIL."""
from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lora_dreambooth.data.images import IMAGE_EXTENSIONS, find_images, load_image, load_images
from lora_dreambooth.errors import UserInputError

REAL_PHOTO = Path("/work/shared/data/dreambooth/dog/00.jpg")
LOGGER = "lora_dreambooth.data.images"


def save(image: Image.Image, path: Path, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **params)
    return path


def noisy_rgb(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Noise, so that JPEG/PNG payloads are large enough to cut meaningfully."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def assert_one_line_naming(exc_info: pytest.ExceptionInfo, path: Path, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    assert f"'{path}'" in message
    for fragment in fragments:
        assert fragment in message
    return message


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with one tiny IDAT: nothing big exists anywhere."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


class _no_pil_warnings:
    """Fail if any warning escapes (Pillow's DecompressionBombWarning in particular)."""

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        assert not [str(w.message) for w in self._caught]
        return False


# --- find_images -----------------------------------------------------------------------------------------

def test_extensions_are_lowercase_with_dot():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


def test_find_images_sorted_ignores_hidden_system_and_sidecars(tmp_path):
    for name in ["b.png", "a.JPG", "c.webp"]:
        save(noisy_rgb(8, 8), tmp_path / name, format="PNG" if name.endswith("png") else
             "JPEG" if name.endswith("JPG") else "WEBP")
    for name in [".DS_Store", "._a.jpg", "Thumbs.db", "desktop.ini", "a.txt", "a.caption", "meta.json",
                 "latents.npz"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "nested").mkdir()
    save(noisy_rgb(8, 8), tmp_path / "nested" / "deep.png")

    assert [p.name for p in find_images(tmp_path)] == ["a.JPG", "b.png", "c.webp"]


def test_find_images_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserInputError) as exc_info:
        find_images(missing, what="class folder")
    assert_one_line_naming(exc_info, missing, "class folder", "does not exist")


def test_find_images_file_instead_of_folder(tmp_path):
    file = save(noisy_rgb(8, 8), tmp_path / "photo.png")
    with pytest.raises(UserInputError) as exc_info:
        find_images(file)
    assert_one_line_naming(exc_info, file, "instance folder", "not a folder")


def test_find_images_empty_folder(tmp_path):
    with pytest.raises(UserInputError) as exc_info:
        find_images(tmp_path)
    assert_one_line_naming(exc_info, tmp_path, "is empty")


def test_find_images_only_hidden_files_counts_as_empty(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(UserInputError) as exc_info:
        find_images(tmp_path)
    assert_one_line_naming(exc_info, tmp_path, "is empty")


def test_find_images_says_what_the_folder_holds(tmp_path):
    for name in ["notes.txt", "IMG_1.HEIC", "IMG_2.heic"]:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserInputError) as exc_info:
        find_images(tmp_path)
    assert_one_line_naming(exc_info, tmp_path, "holds 3 files", "none is an image", ".jpg", "IMG_1.HEIC",
                           "HEIC", "convert")


def test_find_images_only_subfolders(tmp_path):
    save(noisy_rgb(8, 8), tmp_path / "photos" / "a.png")
    with pytest.raises(UserInputError) as exc_info:
        find_images(tmp_path)
    assert_one_line_naming(exc_info, tmp_path, "subfolder", "photos")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read every folder")
def test_find_images_unreadable_folder(tmp_path):
    folder = tmp_path / "locked"
    save(noisy_rgb(8, 8), folder / "a.png")
    folder.chmod(0)
    try:
        with pytest.raises(UserInputError) as exc_info:
            find_images(folder)
    finally:
        folder.chmod(0o755)
    assert_one_line_naming(exc_info, folder, "permission denied")


def test_find_images_warns_on_a_single_image(tmp_path, caplog):
    save(noisy_rgb(8, 8), tmp_path / "only.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert [p.name for p in find_images(tmp_path)] == ["only.png"]
    assert "only one image" in caplog.text


def test_non_ascii_and_space_paths(tmp_path):
    folder = tmp_path / "фото de Zoë 🐕"
    save(noisy_rgb(16, 12), folder / "mon chien é.jpg", format="JPEG")
    save(noisy_rgb(16, 12), folder / "犬 2.png")
    found = find_images(folder)
    assert [p.name for p in found] == ["mon chien é.jpg", "犬 2.png"]
    assert [image.size for _, image in load_images(found)] == [(16, 12), (16, 12)]

    with pytest.raises(UserInputError) as exc_info:
        load_image(folder / "absent ñ.jpg")
    assert_one_line_naming(exc_info, folder / "absent ñ.jpg", "does not exist")


# --- load_image: errors ----------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(UserInputError) as exc_info:
        load_image(tmp_path / "gone.jpg")
    assert_one_line_naming(exc_info, tmp_path / "gone.jpg", "does not exist")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(UserInputError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path, "0 bytes")


def test_folder_named_like_an_image(tmp_path):
    path = tmp_path / "dir.jpg"
    path.mkdir()
    with pytest.raises(UserInputError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path, "folder")


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_image(tmp_path, fmt, suffix):
    buffer = io.BytesIO()
    noisy_rgb(128, 96).save(buffer, format=fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path, "truncated")


def test_truncated_image_stays_an_error_even_if_pillow_was_told_otherwise(tmp_path, monkeypatch):
    buffer = io.BytesIO()
    noisy_rgb(128, 96).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:2000])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UserInputError):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored, not clobbered


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    with pytest.raises(UserInputError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path, "not an image")


def test_heic_renamed_to_jpg_is_named_as_unsupported(tmp_path):
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    with pytest.raises(UserInputError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path, "HEIC", "not supported")


def test_huge_dimensions_rejected_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_claiming(100_000, 100_000))  # 10^10 pixels, ~30 GB if decoded
    limit_before = Image.MAX_IMAGE_PIXELS
    with _no_pil_warnings(), pytest.raises(UserInputError) as exc_info:
        load_image(path)
    assert_one_line_naming(exc_info, path, "100000x100000", "64,000,000")
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_max_pixels_is_per_call(tmp_path):
    path = save(noisy_rgb(40, 30), tmp_path / "small.png")
    with pytest.raises(UserInputError) as exc_info:
        load_image(path, max_pixels=1000)
    assert_one_line_naming(exc_info, path, "40x30", "1,000")
    assert load_image(path).size == (40, 30)


def test_limit_between_pillow_warning_and_error_does_not_leak_warning(tmp_path):
    # 1.5x Pillow's own limit: Pillow alone would emit DecompressionBombWarning at open.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = tmp_path / "big.png"
    path.write_bytes(png_header_claiming(side, side))
    with _no_pil_warnings(), pytest.raises(UserInputError):
        load_image(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read every file")
def test_unreadable_permissions(tmp_path):
    path = save(noisy_rgb(8, 8), tmp_path / "secret.png")
    path.chmod(0)
    try:
        with pytest.raises(UserInputError) as exc_info:
            load_image(path)
    finally:
        path.chmod(0o644)
    assert_one_line_naming(exc_info, path, "permission denied")


# --- load_image: odd but usable --------------------------------------------------------------------------

def test_real_photo():
    if not REAL_PHOTO.exists():
        pytest.skip(f"{REAL_PHOTO} not present")
    image = load_image(REAL_PHOTO, min_size=512)
    assert image.mode == "RGB" and min(image.size) >= 512
    image.load()  # already loaded: no file handle, no lazy decode
    assert np.asarray(image).std() > 10


def test_result_is_fully_loaded_and_file_closed(tmp_path):
    path = save(noisy_rgb(20, 10), tmp_path / "a.png")
    image = load_image(path)
    path.unlink()  # a lazy image would now fail to decode
    assert image.mode == "RGB" and np.asarray(image).shape == (10, 20, 3)


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_palette_png_with_transparency(tmp_path):
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_image.putdata([0, 1])
    path = save(palette_image, tmp_path / "pal.png", transparency=0)
    pixels = np.asarray(load_image(path))
    assert pixels[0, 0].tolist() == [255, 255, 255]  # transparent red -> white
    assert pixels[0, 1].tolist() == [0, 0, 255]


@pytest.mark.parametrize("mode, value, expected", [("L", 100, [100, 100, 100]), ("1", 1, [255, 255, 255])])
def test_greyscale(tmp_path, mode, value, expected):
    path = save(Image.new(mode, (5, 3), value), tmp_path / f"grey_{mode}.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (5, 3)
    assert np.asarray(image)[1, 2].tolist() == expected


@pytest.mark.parametrize("mode, transparent, opaque, opaque_rgb",
                         [("RGBA", (255, 0, 0, 0), (0, 128, 0, 255), [0, 128, 0]),
                          ("LA", (0, 0), (50, 255), [50, 50, 50])])
def test_alpha_composited_on_white(tmp_path, mode, transparent, opaque, opaque_rgb):
    image = Image.new(mode, (2, 1))
    image.putdata([transparent, opaque])
    pixels = np.asarray(load_image(save(image, tmp_path / f"alpha_{mode}.png")))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 1].tolist() == opaque_rgb


def test_exif_orientation_applied(tmp_path):
    # 40x20: left half red, right half blue. Orientation 6 means "rotate 90 degrees clockwise to display".
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)

    image = load_image(path)
    assert image.size == (20, 40)
    pixels = np.asarray(image).astype(int)
    # Clockwise rotation puts the stored left (red) half on top and the right (blue) half at the bottom.
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_corrupt_exif_is_logged_not_leaked_as_python_warning(tmp_path, caplog):
    path = tmp_path / "bad exif.jpg"
    broken_ifd = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x02\x00\x12\x01\x03\x00\x01\x00"  # 2 entries, half of one
    Image.new("RGB", (40, 20), (200, 0, 0)).save(path, exif=broken_ifd)
    with caplog.at_level(logging.WARNING, logger=LOGGER), _no_pil_warnings():
        image = load_image(path)
    assert image.size == (40, 20)
    assert "Corrupt EXIF" in caplog.text and f"'{path}'" in caplog.text


def test_animated_gif_uses_first_frame_with_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        image = load_image(path)
    assert np.asarray(image)[4, 4].tolist() == [255, 0, 0]
    assert "animated" in caplog.text and "anim.gif" in caplog.text


def test_animated_webp_uses_first_frame_with_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(0, 0, 255), (255, 255, 0)]]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        image = load_image(path)
    assert np.asarray(image)[4, 4].tolist() == [0, 0, 255]
    assert "animated" in caplog.text


def test_tiny_image_warns_about_upscaling(tmp_path, caplog):
    path = save(noisy_rgb(64, 48), tmp_path / "tiny.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_image(path, min_size=512)
    assert "tiny.png" in caplog.text and "upscaled" in caplog.text and "64x48" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_image(path, min_size=48)
    assert caplog.text == ""


@pytest.mark.parametrize("suffix, fmt", [(".bmp", "BMP"), (".tif", "TIFF"), (".webp", "WEBP")])
def test_other_formats(tmp_path, suffix, fmt):
    path = save(Image.new("RGB", (6, 4), (10, 20, 30)), tmp_path / f"img{suffix}", format=fmt,
                **({"lossless": True} if fmt == "WEBP" else {}))
    assert np.asarray(load_image(path))[2, 3].tolist() == [10, 20, 30]


# --- load_images -----------------------------------------------------------------------------------------

def _good_and_bad(tmp_path: Path) -> list[Path]:
    good_a = save(noisy_rgb(8, 8), tmp_path / "a.png")
    bad = tmp_path / "b.jpg"
    bad.write_text("not an image")
    good_c = save(noisy_rgb(8, 8, seed=1), tmp_path / "c.png")
    return [good_a, bad, good_c]


def test_load_images_raises_on_first_bad_file(tmp_path):
    paths = _good_and_bad(tmp_path)
    with pytest.raises(UserInputError) as exc_info:
        load_images(paths)
    assert_one_line_naming(exc_info, paths[1])


def test_load_images_skip_bad(tmp_path, caplog):
    paths = _good_and_bad(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = load_images(paths, skip_bad=True)
    assert [path for path, _ in loaded] == [paths[0], paths[2]]
    assert all(image.mode == "RGB" for _, image in loaded)
    assert f"skipping '{paths[1]}'" in caplog.text


def test_load_images_all_skipped_raises(tmp_path):
    paths = [tmp_path / "x.jpg", tmp_path / "y.png"]
    paths[0].write_bytes(b"")
    paths[1].write_text("nope")
    with pytest.raises(UserInputError) as exc_info:
        load_images(paths, skip_bad=True)
    assert "none of the 2" in str(exc_info.value) and "\n" not in str(exc_info.value)


def _mixed_folder(tmp_path: Path) -> list[Path]:
    """Good photos around every kind of note: a bad file, a tiny one, an animated GIF, a corrupt EXIF block."""
    paths = [save(noisy_rgb(40, 30, seed=i), tmp_path / f"{i:02d}.png") for i in range(6)]
    (tmp_path / "03.png").write_text("not an image")
    save(noisy_rgb(8, 6), tmp_path / "04.png")
    frames = [Image.new("RGB", (40, 40), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "06.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return paths + [tmp_path / "06.gif"]


@pytest.mark.parametrize("with_pillow_warning", [False, True])
def test_load_images_in_threads_match_one_by_one(tmp_path, caplog, with_pillow_warning):
    paths = _mixed_folder(tmp_path)
    if with_pillow_warning:  # a warning Pillow raises cannot be traced to its file across threads
        broken_ifd = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x02\x00\x12\x01\x03\x00\x01\x00"
        Image.new("RGB", (40, 20), (200, 0, 0)).save(tmp_path / "07.jpg", exif=broken_ifd)
        paths.append(tmp_path / "07.jpg")
    runs = []
    for workers in (1, 4):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER), _no_pil_warnings():
            loaded = load_images(paths, min_size=20, skip_bad=True, workers=workers)
        runs.append(([(path, np.asarray(image).tolist()) for path, image in loaded],
                     [record.getMessage() for record in caplog.records]))
        with pytest.raises(UserInputError) as exc_info:
            load_images(paths, workers=workers)
        assert_one_line_naming(exc_info, paths[3])
    assert runs[0] == runs[1]
    loaded, messages = runs[1]
    assert [path.name for path, _ in loaded] == ["00.png", "01.png", "02.png", "04.png", "05.png", "06.gif"] + (
        ["07.jpg"] if with_pillow_warning else [])
    assert [m.split("'")[1].rsplit("/", 1)[-1] for m in messages] == ["03.png", "04.png", "06.gif"] + (
        ["07.jpg"] if with_pillow_warning else [])
