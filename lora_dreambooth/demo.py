"""The offline demo: tiny base (or a real one) + bundled dog photos -> adapter + comparison grid."""
from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import torch

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.files.grids import image_grid

log = logging.getLogger(__name__)


def example_photos(subject: str = "dog") -> Path:
    """Folder of the bundled, downscaled example photos (see its ATTRIBUTION.md)."""
    return Path(str(resources.files("lora_dreambooth") / "assets" / "examples" / subject))


def run_demo(out: Path, *, base: str | None = None, steps: int = 150, resolution: int = 64) -> Path:
    """Train on the bundled photos and write `comparison.png` (top row: base, bottom row: with the adapter)."""
    from lora_dreambooth.tiny import save_tiny_pipeline
    from lora_dreambooth.training.recipe import train

    out.mkdir(parents=True, exist_ok=True)
    if base is None:
        base_dir = out / "tiny-base"
        if not (base_dir / "model_index.json").exists():
            log.info("no base given: building a tiny random SD v1 base in '%s' (offline; images will be noise-like)",
                     base_dir)
            save_tiny_pipeline(base_dir, seed=0)
        base = str(base_dir)
    config = TrainConfig(instance_dir=str(example_photos("dog")), base=base, token="sks", class_noun="dog",
                         output_dir=str(out / "adapter"), resolution=resolution, steps=steps, lr=1e-3,
                         num_class_images=8, class_dir=str(out / "class-images"), class_inference_steps=10,
                         overwrite=True, save_dtype="fp32", log_every=10)
    result = train(config)
    grid = comparison_grid(base, Path(config.output_dir), config.effective_instance_prompt, resolution)
    grid_path = out / "comparison.png"
    grid.save(grid_path)
    log.info("adapter: %s\ncomparison grid (top: base, bottom: adapter): %s", result.adapter_path, grid_path)
    return grid_path


@torch.no_grad()
def comparison_grid(base: str, adapter_dir: Path, prompt: str, size: int, seeds: int = 4):
    """Same prompt and seeds with the adapter at strength 0 (base) and 1, loaded by plain diffusers."""
    from diffusers import StableDiffusionPipeline

    from lora_dreambooth.models import quiet_library_progress

    quiet_library_progress()
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter_dir))
    rows = []
    for scale in (0.0, 1.0):
        generators = [torch.Generator().manual_seed(s) for s in range(seeds)]
        rows += pipe([prompt] * seeds, height=size, width=size, num_inference_steps=20, generator=generators,
                     cross_attention_kwargs={"scale": scale}).images
    return image_grid(rows, columns=seeds)
