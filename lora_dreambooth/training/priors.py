"""Class images for prior preservation: generated once with the frozen base, cached, never regenerated."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data.examples import Example, load_examples
from lora_dreambooth.files.atomic import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLASS_IMAGE_PATTERN = "class-{index:05d}.png"


def default_cache_root() -> Path:
    """`$LORA_DREAMBOOTH_CACHE` or `~/.cache/lora-dreambooth`."""
    env = os.environ.get("LORA_DREAMBOOTH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-dreambooth"


def default_class_dir(base: str, class_prompt: str, resolution: int) -> Path:
    """A cache folder keyed by base model, class prompt and resolution.

    A single-file base is keyed by its content hash (SHA-256, hashed once per run), so a renamed or moved file
    reuses its class images and a different file under the same name does not.
    """
    from lora_dreambooth.models import base_identity

    path = Path(base).expanduser()
    sha256 = base_identity(base).get("base_sha256")
    base_key = f"sha256:{sha256}" if sha256 else (str(path.resolve()) if path.exists() else base)
    digest = hashlib.sha256(f"{base_key}\n{class_prompt}\n{resolution}".encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in class_prompt)[:40].strip("-")
    return default_cache_root() / "class-images" / f"{slug}-{digest}"


@dataclass
class ClassImagePlan:
    """How many class images exist and which indices still need generating."""

    folder: Path
    existing: int
    missing_indices: list[int]


def plan_class_images(folder: Path, wanted: int, *, rank: int = 0, world_size: int = 1) -> ClassImagePlan:
    """Count usable images in `folder`; the missing ones get the next free indices, split across ranks."""
    from lora_dreambooth.data.images import IMAGE_EXTENSIONS

    folder.mkdir(parents=True, exist_ok=True)
    present = sorted(p for p in folder.iterdir()
                     if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    missing_count = max(0, wanted - len(present))
    taken = {p.name for p in present}
    indices: list[int] = []
    index = 0
    while len(indices) < missing_count:
        if CLASS_IMAGE_PATTERN.format(index=index) not in taken:
            indices.append(index)
        index += 1
    return ClassImagePlan(folder, len(present), indices[rank::world_size])


@torch.no_grad()
def generate_class_images(pipeline_factory: Callable[[], object], plan: ClassImagePlan, *, prompt: str,
                          resolution: int, steps: int, seed: int, batch_size: int = 4,
                          progress: Callable[[int], None] | None = None) -> int:
    """Generate the images of `plan.missing_indices` (index i always uses seed + i), each written atomically."""
    if not plan.missing_indices:
        return 0
    pipe = pipeline_factory()
    device = pipe.unet.device
    done = 0
    for start in range(0, len(plan.missing_indices), batch_size):
        chunk = plan.missing_indices[start:start + batch_size]
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in chunk]
        latents = pipe(prompt=[prompt] * len(chunk), height=resolution, width=resolution,
                       num_inference_steps=steps, generator=generators, output_type="latent").images
        images = decode_latents(pipe, latents)
        for index, image in zip(chunk, images):
            with atomic_path(plan.folder / CLASS_IMAGE_PATTERN.format(index=index)) as tmp:
                image.save(tmp, format="PNG")
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return done


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list:
    """Decode in the VAE's own dtype (kept fp32 for training), whatever dtype the UNet produced the latents in."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def write_manifest(folder: Path, *, base: str, prompt: str, resolution: int, seed: int, steps: int) -> None:
    """Record how the class images were made (base, prompt, count, seed) beside them."""
    from lora_dreambooth.data.images import IMAGE_EXTENSIONS

    count = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    manifest = {"base": base, "prompt": prompt, "resolution": resolution, "seed": seed,
                "inference_steps": steps, "count": count}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_manifest(folder: Path, *, prompt: str) -> None:
    """Warn when a reused class folder was made for another prompt."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        made_for = json.loads(path.read_text()).get("prompt")
    except ValueError:
        return
    if made_for and made_for != prompt:
        log.warning("class images in '%s' were generated for prompt '%s', not '%s'", folder, made_for, prompt)


def prepare_class_images(base, accelerator, cfg: TrainConfig, *, prompt: str, class_dir: str | None,
                         device: torch.device, weight_dtype: torch.dtype, offload_after: bool) -> list[Example]:
    """The class images of `prompt`: the missing ones generated with the frozen base (split across ranks, written
    atomically, recorded in the manifest), then all of them loaded as examples.

    The frozen models reach the device only when there is something to generate; with `offload_after` (the
    low-memory profile quantizes from the CPU copy) they go back to the CPU afterwards.
    """
    folder = Path(class_dir) if class_dir else default_class_dir(cfg.base, prompt, cfg.resolution)
    check_manifest(folder, prompt=prompt)
    accelerator.wait_for_everyone()
    plan = plan_class_images(folder, cfg.num_class_images, rank=accelerator.process_index,
                             world_size=accelerator.num_processes)
    accelerator.wait_for_everyone()  # all ranks have listed the folder before any of them writes into it
    if plan.missing_indices or plan.existing < cfg.num_class_images:
        log.info("class images: %d in '%s', generating %d on this process", plan.existing, folder,
                 len(plan.missing_indices))
    if plan.missing_indices:
        base.unet.to(device, weight_dtype)
        base.text_encoder.to(device, weight_dtype)
        base.vae.to(device, torch.float32)  # never rounded: the same VAE then encodes the latents
        generate_class_images(base.pipeline, plan, prompt=prompt, resolution=cfg.resolution,
                              steps=cfg.class_inference_steps, seed=cfg.seed * 7919 + 1)
        if offload_after:
            for model in (base.unet, base.text_encoder, base.vae):
                model.to("cpu")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(folder, base=cfg.base, prompt=prompt, resolution=cfg.resolution, seed=cfg.seed,
                       steps=cfg.class_inference_steps)
    examples = load_examples(folder, prompt, cfg.resolution, what="class image folder", skip_bad=True)
    return examples[: max(cfg.num_class_images, 1)]
