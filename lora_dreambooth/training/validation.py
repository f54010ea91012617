"""Validation images during training: a grid of fixed-seed samples every N steps, on the training modules.

Generation runs on the very UNet and text encoder being trained (adapters active, no copy), with fixed seeds
so grids from different steps compare directly. It draws no numbers from the training's generators, so a run
with validation trains exactly like one without. Modules moved onto the accelerator for generation go back
where they were, and the allocator cache is emptied afterwards.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_dreambooth.config import fill_prompt
from lora_dreambooth.files.grids import save_sample_grid

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
IMAGES_PER_PROMPT = 2


def validation_due(every: int, done: int) -> bool:
    """Whether a grid is due after `done` optimizer steps (every `every` steps; never when `every` is 0)."""
    return every > 0 and done % every == 0


def validation_prompts(prompts: tuple[str, ...], token: str, class_noun: str) -> list[str]:
    """The validation prompts with `{token}`/`{class}` filled in (the run's first subject)."""
    return [fill_prompt(p, token, class_noun) for p in prompts]


def grid_path(out_dir: str | Path, step: int) -> Path:
    """Where the grid of step `step` goes: `OUT/validation/step-000100.png`."""
    return Path(out_dir) / VALIDATION_DIR / f"step-{step:06d}.png"


@torch.no_grad()
def write_validation_grid(base: Any, prompts: list[str], out_dir: str | Path, step: int, *, seed: int, size: int,
                          inference_steps: int, device: torch.device | str, accelerator: Any = None) -> Path:
    """Generate `IMAGES_PER_PROMPT` fixed-seed images per prompt on `base`'s modules; write the grid (and a
    TensorBoard image when the accelerator has a tensorboard tracker); put modules back; free caches.

    Modules are moved, never cast: a cast would round the fp32 adapter weights the optimizer is training.
    Mixed dtypes (bf16 UNet, fp32 VAE) are reconciled by the accelerator's autocast.
    """
    modules = {name: getattr(base, name) for name in ("vae", "text_encoder", "unet")}
    homes = {name: next(m.parameters()).device for name, m in modules.items()}
    modes = {name: m.training for name, m in modules.items()}
    try:
        for module in modules.values():
            module.to(device).eval()
        pipe = base.pipeline()
        with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
            path = save_sample_grid(pipe, prompts, grid_path(out_dir, step), seed=seed, size=size,
                                    steps=inference_steps, images_per_prompt=IMAGES_PER_PROMPT)
        del pipe
    finally:
        for name, module in modules.items():
            module.to(homes[name]).train(modes[name])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _log_to_tensorboard(accelerator, path, step)
    log.info("validation grid for step %d: %s", step, path)
    return path


def _log_to_tensorboard(accelerator: Any, path: Path, step: int) -> None:
    if accelerator is None:
        return
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            with Image.open(path) as grid:
                tracker.writer.add_image("validation", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
            tracker.writer.flush()


def write_sample_images(base: Any, prompts: list[str], path: Path, *, device: torch.device | str, seed: int,
                        size: int) -> None:
    """`--sample-prompts`: one grid of the finished adapter's pictures beside the adapter (the VAE in fp32)."""
    pipe = base.pipeline()
    pipe.vae.to(device, torch.float32)
    save_sample_grid(pipe, prompts, path, seed=seed, size=size)
    pipe.vae.to("cpu")
