"""Images to score: folders, lists, generated-image records and their manifest."""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.errors import first_line as _first_line
from lora_dreambooth.evaluation.prompts import EvalPrompt
from lora_dreambooth.files.atomic import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAME = "images.json"


# ------------------------------------------------------------------------------------------ image input
@dataclass(frozen=True)
class GeneratedImage:
    """One image written by :func:`generate_for_evaluation`."""

    path: Path
    prompt: str
    clip_text: str
    prompt_index: int
    image_index: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "prompt": self.prompt, "clip_text": self.clip_text,
                "prompt_index": self.prompt_index, "image_index": self.image_index, "seed": self.seed}


ImageItem = Union[str, Path, Image.Image, GeneratedImage]
ImageSource = Union[str, Path, Sequence[ImageItem]]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; a clear error when there are none."""
    directory = Path(folder)
    if not directory.is_dir():
        raise UserInputError(f"image folder '{directory}' does not exist or is not a folder")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{directory}'")
    return files


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image file, apply its EXIF rotation, return RGB; a clear error naming a bad file."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserInputError(f"cannot read image '{path}': {_first_line(exc)}") from None


def load_images(source: ImageSource) -> tuple[list[Image.Image], list[str | None]]:
    """Images from a folder or a list of paths / PIL images / :class:`GeneratedImage`; returns (images, file
    names or None for in-memory images)."""
    items: Sequence[ImageItem] = list_images(source) if isinstance(source, (str, Path)) else source
    images: list[Image.Image] = []
    files: list[str | None] = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
            files.append(None)
            continue
        path = item.path if isinstance(item, GeneratedImage) else Path(item)
        images.append(open_rgb(path))
        files.append(str(path))
    if not images:
        raise UserInputError("no images to score")
    return images, files


def _as_eval_prompt(item: str | EvalPrompt) -> EvalPrompt:
    return item if isinstance(item, EvalPrompt) else EvalPrompt(str(item), str(item))


def _generated_with_prompts(
    generated: ImageSource, prompts_per_image: Sequence[str | EvalPrompt] | None
) -> tuple[list[Image.Image], list[str | None], list[EvalPrompt] | None]:
    """Decode generated images and pair them with prompts (given, from GeneratedImage, or a folder manifest)."""
    if prompts_per_image is None and isinstance(generated, (str, Path)) and (Path(generated) / MANIFEST_NAME).is_file():
        generated = read_manifest(generated)
    if prompts_per_image is None and not isinstance(generated, (str, Path)):
        if generated and all(isinstance(item, GeneratedImage) for item in generated):
            prompts_per_image = [EvalPrompt(g.prompt, g.clip_text) for g in generated]  # type: ignore[union-attr]
    images, files = load_images(generated)
    if prompts_per_image is None:
        return images, files, None
    prompts = [_as_eval_prompt(p) for p in prompts_per_image]
    if len(prompts) != len(images):
        raise UserInputError(f"{len(images)} generated images but {len(prompts)} prompts: give one prompt per image")
    return images, files, prompts


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _atomic_write_bytes(path, buffer.getvalue())


def read_manifest(folder: str | Path) -> list[GeneratedImage]:
    """The :class:`GeneratedImage` records that :func:`generate_for_evaluation` wrote into ``folder``."""
    directory = Path(folder)
    try:
        entries = json.loads((directory / MANIFEST_NAME).read_text("utf-8"))["images"]
        return [GeneratedImage(path=directory / e["file"], prompt=e["prompt"], clip_text=e["clip_text"],
                               prompt_index=e["prompt_index"], image_index=e["image_index"], seed=e["seed"])
                for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"cannot read '{directory / MANIFEST_NAME}': {_first_line(exc)}") from None


