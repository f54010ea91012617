"""Sample images and grids (used after training, by the demo and by `generate`)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from lora_dreambooth.files.atomic import atomic_path


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Paste equally sized images into a grid (row-major)."""
    if not images:
        raise ValueError("no images for the grid")
    columns = columns or min(len(images), 4)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid


@torch.no_grad()
def save_sample_grid(pipe, prompts: list[str], path: str | Path, *, seed: int = 0, size: int = 512,
                     steps: int = 25, images_per_prompt: int = 2) -> Path:
    """One row per prompt, `images_per_prompt` seeds each, written atomically as PNG."""
    device = pipe.unet.device
    images = []
    for prompt in prompts:
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(images_per_prompt)]
        images += pipe(prompt=[prompt] * images_per_prompt, height=size, width=size, num_inference_steps=steps,
                       generator=generators).images
    with atomic_path(path) as tmp:
        image_grid(images, columns=images_per_prompt).save(tmp, format="PNG")
    return Path(path)
