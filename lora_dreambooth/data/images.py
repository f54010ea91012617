"""Finding and decoding users' training photos, with one clear line per bad input.

Every problem a user can cause (a missing folder, a zero-byte file, a truncated JPEG, a HEIC photo renamed
``.jpg``, a 100000x100000 PNG) becomes a :class:`~lora_dreambooth.errors.UserInputError` whose message
quotes the file; odd-but-usable inputs (EXIF-rotated, CMYK, 16-bit, transparent, animated, tiny) are
converted to plain RGB, with a logged warning where the result may surprise.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lora_dreambooth.errors import UserInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
"""Suffixes (compared lowercase) that :func:`find_images` treats as photos."""

# Files that operating systems drop into folders; never worth mentioning to the user.
_SYSTEM_FILE_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"})
_EXTENSION_HINT = "(.jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff)"
# Formats people try that Pillow cannot decode: suffix or magic -> what to tell them.
_UNSUPPORTED_SUFFIXES = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".svg": "SVG",
                         ".raw": "camera RAW", ".cr2": "camera RAW", ".nef": "camera RAW",
                         ".arw": "camera RAW", ".dng": "camera RAW", ".psd": "Photoshop"}
# Leading bytes of the supported formats: a file that starts like one but fails to open is damaged.
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF/WebP"))
# Exceptions Pillow raises on corrupt data (decoders are not consistent about which).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, zlib.error)

# Pillow's limits are module globals; we swap them for the duration of one decode (or of one batch decoded in
# threads), so serialise.
_PIL_SETTINGS_LOCK = threading.Lock()
MAX_PIXELS = 64_000_000  # a photo larger than this is refused before decoding (a decompression bomb)


def _quote(path: str | Path) -> str:
    """The path in single quotes, escaped if it holds control characters (keeps messages one line)."""
    text = str(path)
    if any(ch < " " or ch == "\x7f" for ch in text):
        return repr(text)
    return f"'{text}'"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _is_system_file(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILE_NAMES


def _describe_names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def find_images(folder: str | Path, *, what: str = "instance folder") -> list[Path]:
    """Sorted image files directly in ``folder`` (not recursive).

    Hidden files (``.DS_Store``, ``._foo.jpg``), ``Thumbs.db``, ``desktop.ini`` and sidecar files
    (captions, ``.json``, ``.npz``, ...) are ignored. ``what`` names the folder in messages
    ("instance folder 'x' does not exist").

    Raises:
        UserInputError: the folder is missing, not a folder, unreadable, empty, or holds no image.
    """
    folder = Path(folder)
    label = f"{what} {_quote(folder)}"
    if not folder.exists():
        raise UserInputError(f"{label} does not exist")
    if not folder.is_dir():
        raise UserInputError(f"{label} is a file, not a folder; pass the folder that holds the photos")
    try:
        entries = list(os.scandir(folder))
    except PermissionError:
        raise UserInputError(f"cannot list {label}: permission denied") from None
    except OSError as exc:
        raise UserInputError(f"cannot list {label}: {_one_line(exc)}") from None

    images: list[Path] = []
    other_files: list[str] = []
    subfolders: list[str] = []
    for entry in entries:
        if _is_system_file(entry.name):
            continue
        if entry.is_dir():
            subfolders.append(entry.name)
        elif not entry.is_file():
            continue  # broken symlink, socket, ...
        elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
            images.append(folder / entry.name)
        else:
            other_files.append(entry.name)

    if not images:
        raise UserInputError(_no_images_message(label, other_files, subfolders))
    images.sort(key=lambda path: path.name)
    if len(images) == 1 and not what.startswith("class image"):  # one class image per prompt is a normal split
        logger.warning("%s holds only one image (%s); DreamBooth usually needs 3-20 photos of the subject",
                       label, images[0].name)
    return images


def _no_images_message(label: str, other_files: list[str], subfolders: list[str]) -> str:
    if other_files:
        count = f"{len(other_files)} file{'s' if len(other_files) != 1 else ''}"
        message = (f"{label} holds {count} ({_describe_names(other_files)}) but none is an image "
                   f"{_EXTENSION_HINT}")
        unsupported = {_UNSUPPORTED_SUFFIXES[Path(n).suffix.lower()] for n in other_files
                       if Path(n).suffix.lower() in _UNSUPPORTED_SUFFIXES}
        if unsupported:
            message += f"; {'/'.join(sorted(unsupported))} files are not supported: convert them to JPEG or PNG"
        return message
    if subfolders:
        return (f"{label} holds no image, only subfolder(s) ({_describe_names(subfolders)}); "
                "put the photos directly in the folder")
    return f"{label} is empty; put the photos of the subject {_EXTENSION_HINT} in it"


@contextmanager
def _pillow_settings() -> Iterator[list[warnings.WarningMessage]]:
    """Disable Pillow's own bomb check (we check the header size ourselves, with the caller's limit) and
    make truncated files errors, restoring both module settings afterwards. Pillow's warnings (corrupt
    EXIF, ...) are captured into the yielded list instead of reaching the user as multi-line text."""
    with _PIL_SETTINGS_LOCK:
        saved_max_pixels = Image.MAX_IMAGE_PIXELS
        saved_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = None
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield caught
        finally:
            Image.MAX_IMAGE_PIXELS = saved_max_pixels
            ImageFile.LOAD_TRUNCATED_IMAGES = saved_load_truncated


def _check_file(path: Path) -> None:
    """Fail early, with a precise reason, on what can be told without decoding."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserInputError(f"image {_quote(path)} does not exist") from None
    except OSError as exc:
        raise UserInputError(f"cannot read image {_quote(path)}: {_one_line(exc)}") from None
    if path.is_dir():
        raise UserInputError(f"image {_quote(path)} is a folder, not an image file")
    if stat.st_size == 0:
        raise UserInputError(f"image {_quote(path)} is empty (0 bytes); re-copy or re-export it")


def _unidentified_message(path: Path) -> str:
    """Why Pillow could not even identify the file: sniff the first bytes for a useful hint."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        head = b""
    kind = _UNSUPPORTED_SUFFIXES.get(path.suffix.lower())
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        kind = "AVIF" if brand in (b"avif", b"avis") else "HEIC/HEIF" if brand[:3] in (b"hei", b"hev", b"mif") else kind
    elif head.lstrip().startswith((b"<svg", b"<?xml")):
        kind = "SVG"
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic):
            return (f"image {_quote(path)} looks like a {name} file but its header cannot be read "
                    "(truncated or corrupt); re-copy or re-export it, or remove it")
    if kind:
        return (f"image {_quote(path)} is a {kind} file, which is not supported; "
                "convert it to JPEG or PNG")
    return (f"image {_quote(path)} is not an image that can be read (unrecognised contents; "
            f"expected one of {_EXTENSION_HINT})")


def _decode_error_message(path: Path, exc: BaseException) -> str:
    reason = _one_line(exc)
    if "truncated" in reason.lower() or isinstance(exc, (EOFError, zlib.error)) or "broken" in reason.lower():
        return (f"image {_quote(path)} is truncated or corrupt ({reason}); "
                "re-copy or re-export it, or remove it")
    return f"image {_quote(path)} could not be decoded ({reason}); re-export it as JPEG or PNG, or remove it"


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float greyscale image to 8 bits (65535 -> 255), instead of clipping."""
    values = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 1.0
        scaled = np.nan_to_num(values.astype(np.float64) * scale)
    else:  # I;16*, or "I" as Pillow opens 16-bit greyscale PNG/TIFF
        scaled = values.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> a new RGB image; transparency is composited on white."""
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_l(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _on_white(image)
    return image.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, LAB, HSV


def _decode(path: Path, image: Image.Image, max_pixels: int, notes: list[str]) -> Image.Image:
    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise UserInputError(
            f"image {_quote(path)} is {width}x{height} ({width * height:,} pixels), more than the limit of "
            f"{max_pixels:,} pixels; shrink it (possible decompression bomb)")
    if getattr(image, "is_animated", False) and image.format != "MPO":  # MPO: camera stereo/preview pair
        notes.append(f"image {_quote(path)} is animated ({getattr(image, 'n_frames', 0)} frames); using its first "
                     "frame only")
        image.seek(0)
    image.load()
    try:
        oriented = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        notes.append(f"image {_quote(path)} has unreadable EXIF orientation ({_one_line(exc)}); using it as stored")
        oriented = image
    return _to_rgb(oriented if oriented is not None else image)


def load_image(path: str | Path, *, min_size: int | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode one photo into a fully loaded RGB image.

    Applies the EXIF orientation; converts CMYK, 16-bit (scaled, not clipped), palette and greyscale images;
    composites transparency on white; takes the first frame of animations (with a warning). Warns when the
    shorter side is below ``min_size`` (the photo will be upscaled). The size is checked against
    ``max_pixels`` from the file header, before any pixel is decoded.

    Raises:
        UserInputError: naming the file, when it is missing, unreadable, empty, truncated, not an image,
            in an unsupported format, or larger than ``max_pixels``.
    """
    path, notes = Path(path), []
    with _pillow_settings() as pillow_warnings:
        rgb = _decode_file(path, max_pixels, notes)
    notes += [f"image {_quote(path)}: {_one_line(caught.message)}" for caught in pillow_warnings]
    _log_notes(path, rgb, notes, min_size)
    return rgb


def _decode_file(path: Path, max_pixels: int, notes: list[str]) -> Image.Image:
    """The decoding part of :func:`load_image` (what would surprise the user goes into `notes`); the caller
    holds :func:`_pillow_settings`."""
    _check_file(path)
    try:
        with Image.open(path) as image:
            return _decode(path, image, max_pixels, notes)
    except UserInputError:
        raise
    except PermissionError:
        raise UserInputError(f"cannot read image {_quote(path)}: permission denied") from None
    except UnidentifiedImageError:
        raise UserInputError(_unidentified_message(path)) from None
    except _DECODE_ERRORS as exc:
        raise UserInputError(_decode_error_message(path, exc)) from None
    except MemoryError:
        raise UserInputError(f"image {_quote(path)} is too large to decode in the available memory") from None


def _log_notes(path: Path, rgb: Image.Image, notes: list[str], min_size: int | None) -> None:
    for note in notes:
        logger.warning("%s", note)
    if min_size is not None and min(rgb.size) < min_size:
        logger.warning("image %s is only %dx%d: its shorter side is below %d px, so it will be upscaled "
                       "(expect blur)", _quote(path), rgb.width, rgb.height, min_size)


def decode_workers() -> int:
    """Threads that decode a folder of photos at once (Pillow's decoders release the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))


def load_images(paths: Sequence[Path], *, min_size: int | None = None,
                skip_bad: bool = False, workers: int = 1) -> list[tuple[Path, Image.Image]]:
    """Load every photo with :func:`load_image`, in order.

    On a bad file, raise its :class:`UserInputError`; with ``skip_bad=True``, log
    ``skipping <file>: <reason>`` and go on. An empty ``paths`` gives an empty list. With ``workers`` > 1 the
    files decode in that many threads; the results, errors and warnings are the same, in the same order, as
    one by one.

    Raises:
        UserInputError: a file is bad (``skip_bad=False``), or every file was skipped.
    """
    paths = [Path(path) for path in paths]
    decoded = _decode_in_threads(paths, workers) if workers > 1 and len(paths) > 1 else None
    loaded: list[tuple[Path, Image.Image]] = []
    for index, path in enumerate(paths):
        try:
            if decoded is None:
                image = load_image(path, min_size=min_size)
            elif isinstance(decoded[index], UserInputError):
                raise decoded[index]
            else:
                image, notes = decoded[index]
                _log_notes(path, image, notes, min_size)
            loaded.append((path, image))
        except UserInputError as exc:
            if not skip_bad:
                raise
            logger.warning("skipping %s: %s", _quote(path), exc)
    if paths and not loaded:
        raise UserInputError(f"none of the {len(paths)} image(s) could be loaded (first: {_quote(paths[0])}); "
                             "see the warnings above")
    return loaded


def _decode_in_threads(paths: list[Path], workers: int
                       ) -> list[tuple[Image.Image, list[str]] | UserInputError] | None:
    """Every file decoded with its notes (or its error) under one Pillow-settings session; None when Pillow
    warned about any of them, since a warning caught across threads cannot name its file: the caller then decodes
    one by one."""
    def decode(path: Path) -> tuple[Image.Image, list[str]] | UserInputError:
        notes: list[str] = []
        try:
            return _decode_file(path, MAX_PIXELS, notes), notes
        except UserInputError as exc:
            return exc

    with _pillow_settings() as pillow_warnings, ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(decode, paths))
    return None if pillow_warnings else results
