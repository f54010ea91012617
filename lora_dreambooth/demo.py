"""The offline demo: teach the shipped synthetic base a subject it has never drawn, and show the difference.

With no ``--base`` the demo uses the Synthetic DreamBench's pretrained base (shipped in the package: shapes in six
colours, 32 px) and the synthetic subject's photos (a teal-over-pink triangle with a black dot, which the base never
draws). With ``--base`` it trains a real SD v1.x model on the bundled dog photos. Either way it writes
``comparison.png``: the training photos, then the base and the adapter on the same seeds for the instance prompt
and for an edit prompt, each row labelled.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from lora_dreambooth.config import TrainConfig

log = logging.getLogger(__name__)

#: The synthetic demo's training settings: the cheapest measured to draw the subject visibly (see the README).
#: LoRA on attention *and* convolutions: in a UNet this small, attention-only LoRA cannot draw the subject.
SYNTHETIC_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out")
SYNTHETIC_STEPS = 600
SYNTHETIC_LR = 2e-3
CELL = 96  # pixels per picture in the comparison (32 px pictures are shown at 3x)
LABEL_WIDTH = 210
HEADER_HEIGHT = 34
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DemoPlan:
    """What one demo run trains on and how it draws the comparison."""

    base: str
    photos: Path
    token: str
    class_noun: str
    resolution: int
    steps: int
    edit_prompt: str
    sampling_steps: int
    guidance: float


def example_photos(subject: str = "dog") -> Path:
    """Folder of the bundled, downscaled example photos (see its ATTRIBUTION.md)."""
    return Path(str(resources.files("lora_dreambooth") / "assets" / "examples" / subject))


def synthetic_plan(out: Path, steps: int | None) -> DemoPlan:
    """The shipped synthetic base and the synthetic subject's photos, written to ``out/photos``."""
    from lora_dreambooth.synthetic.config import BenchConfig
    from lora_dreambooth.synthetic.pretrain import pretrained_base, shipped_base
    from lora_dreambooth.synthetic.world import write_subject_photos

    bench = BenchConfig()
    base = shipped_base(bench.pretrain) or pretrained_base(bench.pretrain, log=log.info)  # pretrains if missing
    photos = out / "photos"
    write_subject_photos(photos, bench.subject_photos, bench.pretrain.resolution, seed=bench.seed,
                         size=bench.subject_size)
    return DemoPlan(base=str(base), photos=photos, token=bench.token, class_noun=bench.class_noun,
                    resolution=bench.pretrain.resolution, steps=steps or SYNTHETIC_STEPS,
                    edit_prompt=f"a photo of {bench.token} {bench.class_noun} in {bench.edit_colors[0]}",
                    sampling_steps=20, guidance=4.0)


def real_base_plan(out: Path, base: str, steps: int | None, resolution: int | None) -> DemoPlan:
    """A real SD v1.x base and the bundled dog photos (copied to ``out/photos``)."""
    import shutil

    photos = out / "photos"
    shutil.copytree(example_photos("dog"), photos, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.md"))
    return DemoPlan(base=base, photos=photos, token="sks", class_noun="dog", resolution=resolution or 512,
                    steps=steps or 400, edit_prompt="a photo of sks dog on the beach", sampling_steps=25,
                    guidance=7.5)


def demo_config(plan: DemoPlan, out: Path, synthetic: bool) -> TrainConfig:
    """The trainer's config for the demo (fp32 on a CPU; no prior on the synthetic base, where it costs time)."""
    common = dict(instance_dir=str(plan.photos), base=plan.base, token=plan.token, class_noun=plan.class_noun,
                  output_dir=str(out / "adapter"), resolution=plan.resolution, steps=plan.steps, overwrite=True,
                  save_dtype="fp32", log_every=25, seed=0)
    if synthetic:
        return TrainConfig(**common, lr=SYNTHETIC_LR, rank=4, unet_target_modules=SYNTHETIC_TARGETS, prior=False,
                           mixed_precision="no", profile="plain")
    return TrainConfig(**common, lr=1e-4, num_class_images=50, class_dir=str(out / "class-images"))


def run_demo(out: Path, *, base: str | None = None, steps: int | None = None, resolution: int | None = None,
             seeds: int = 6) -> Path:
    """Train an adapter and write ``out/comparison.png`` (photos, base vs adapter on two prompts, same seeds)."""
    from lora_dreambooth.training.recipe import train

    out.mkdir(parents=True, exist_ok=True)
    synthetic = base is None
    if synthetic and "OMP_NUM_THREADS" not in os.environ:
        # A 32 px model gains nothing from more threads, and loses a lot when the cores are busy (sampling the
        # comparison measured 18 s on one thread vs 38 s on two, on a loaded 2-core machine).
        torch.set_num_threads(1)
    plan = synthetic_plan(out, steps) if synthetic else real_base_plan(out, base, steps, resolution)
    config = demo_config(plan, out, synthetic)
    started = time.perf_counter()
    log.info("training %d steps on the photos in '%s' ('%s %s'; base: %s)", plan.steps, plan.photos, plan.token,
             plan.class_noun, plan.base)
    result = train(config)
    log.info("trained in %.0f s", time.perf_counter() - started)
    prompts = [config.effective_instance_prompt, plan.edit_prompt]
    rows = comparison_rows(plan, Path(config.output_dir), prompts, seeds)
    grid_path = out / "comparison.png"
    labelled_grid(rows, CELL if synthetic else min(plan.resolution, 192)).save(grid_path)
    log.info("adapter: %s\ncomparison (photos; base and adapter on the same seeds): %s\n"
             "try it in the app: lora-dreambooth serve --base %s --adapters %s", result.adapter_path, grid_path,
             plan.base, out)
    return grid_path


@torch.no_grad()
def comparison_rows(plan: DemoPlan, adapter_dir: Path, prompts: Sequence[str], seeds: int
                    ) -> list[tuple[str, list[Image.Image]]]:
    """(label, pictures) rows: the photos, then base and adapter per prompt, loaded by plain diffusers."""
    from diffusers import StableDiffusionPipeline

    from lora_dreambooth.models import quiet_library_progress

    quiet_library_progress()
    pipe = StableDiffusionPipeline.from_pretrained(plan.base, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter_dir))
    photos = sorted(p for p in plan.photos.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    rows = [("training photos", [Image.open(p).convert("RGB") for p in photos][:max(seeds, 8)])]
    for prompt in prompts:
        for title, scale in (("base", 0.0), ("with the adapter", 1.0)):
            generators = [torch.Generator().manual_seed(s) for s in range(seeds)]
            images = pipe([prompt] * seeds, height=plan.resolution, width=plan.resolution,
                          num_inference_steps=plan.sampling_steps, guidance_scale=plan.guidance,
                          generator=generators, cross_attention_kwargs={"scale": scale}).images
            rows.append((f'{title}:\n"{prompt}"', images))
    return rows


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], cell: int) -> Image.Image:
    """One labelled row per entry (pictures scaled to ``cell`` pixels), with a header naming the seeds."""
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (LABEL_WIDTH + columns * cell, HEADER_HEIGHT + len(rows) * cell), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    draw.text((8, 10), "lora-dreambooth demo", fill="black", font=_font(15))
    draw.text((LABEL_WIDTH + 4, 12), "base and adapter rows: the same seed in each column (0, 1, 2, ...)",
              fill=(90, 90, 90), font=font)
    for r, (label, images) in enumerate(rows):
        y = HEADER_HEIGHT + r * cell
        if r and r % 2 == 1:  # a rule above each base/adapter pair
            draw.line([(0, y), (grid.width, y)], fill=(200, 200, 200))
        draw.multiline_text((8, y + cell // 2 - 16), label, fill="black", font=font, spacing=4)
        for i, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (LABEL_WIDTH + i * cell, y))
    return grid
