"""Class images for prior preservation: generated once with the frozen base, cached, never regenerated."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from lora_dreambooth.config import TrainConfig, parse_size
from lora_dreambooth.data.examples import Example, load_examples
from lora_dreambooth.files.atomic import atomic_path, write_text_atomic
from lora_dreambooth.kernels import LOW_PRECISION

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CLASS_IMAGE_PATTERN = "class-{index:05d}.png"


def default_cache_root() -> Path:
    """`$LORA_DREAMBOOTH_CACHE` or `~/.cache/lora-dreambooth`."""
    env = os.environ.get("LORA_DREAMBOOTH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lora-dreambooth"


# How class images are made. Part of the cache key and the manifest: a cache made otherwise is never reused as if
# equal. v2: initial noise drawn on the CPU per index (the same pictures on any device, batch size or process
# count), classifier-free guidance 7.5; v1 caches (device-side noise, any step count) are left alone. The solver:
# DPM-Solver++ 2M with Karras sigmas (caches made with plain 2M, "dpmsolver++2m", keep their own key).
SAMPLER = "dpmsolver++2m-karras"
GUIDANCE_SCALE = 7.5
GENERATION_VERSION = 2


def generation_key(steps: int) -> str:
    """The generation settings that decide the pictures, as recorded in the cache key and the manifest."""
    return f"v{GENERATION_VERSION}-{SAMPLER}-{steps}steps-cfg{GUIDANCE_SCALE:g}"


def default_class_dir(base: str, class_prompt: str, resolution: int,
                      steps: int = TrainConfig.class_inference_steps) -> Path:
    """A cache folder keyed by base model, class prompt, resolution and the generation settings.

    A single-file base is keyed by its content hash (SHA-256, hashed once per run), so a renamed or moved file
    reuses its class images and a different file under the same name does not.
    """
    from lora_dreambooth.models import base_identity

    path = Path(base).expanduser()
    sha256 = base_identity(base).get("base_sha256")
    base_key = f"sha256:{sha256}" if sha256 else (str(path.resolve()) if path.exists() else base)
    key = f"{base_key}\n{class_prompt}\n{resolution}\n{generation_key(steps)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in class_prompt)[:40].strip("-")
    return default_cache_root() / "class-images" / f"{slug}-{digest}"


def class_image_pipeline(base):
    """The pipeline that generates class images: the base's own modules with the `SAMPLER` solver, built from the
    base's noise-scheduler config (its betas and prediction type).

    Karras sigmas at 10 steps land as close to the converged (100-step) picture as plain DPM-Solver++ 2M at 12, and
    adapters trained on either drew the Synthetic DreamBench subject alike over 5 seeds (BENCHMARKS.md, fifth pass):
    the same prior for 1/6 fewer UNet calls.
    """
    from diffusers import DPMSolverMultistepScheduler

    return base.pipeline(DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config, use_karras_sigmas=True))


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


def initial_latents(indices: list[int], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The starting noise of each image: its own CPU generator seeded `seed + index`, so a picture depends only on
    (seed, index), never on the device, the batch it shares or the number of processes."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


# Peak bytes one class image adds at 512 px in a 16-bit compute dtype: estimates with a margin (they grow with the
# pixels; a batch that still runs out of memory is halved). The UNet runs each image twice (guided and unguided).
DENOISE_BYTES_PER_IMAGE = 0.5 * (1 << 30)
DECODE_BYTES_PER_IMAGE = 1.5 * (1 << 30)
MAX_BATCH = 32  # 64 UNet rows with guidance: the GPU is busy; larger batches only add memory risk


def fitted_batch_size(count: int, per_image_bytes: float, device: torch.device, resolution: int,
                      cap: int = MAX_BATCH, max_bytes: int | None = None) -> int:
    """The largest batch (up to `cap`) predicted to fit half the free memory (and `max_bytes` in all, e.g.
    --max-vram), balanced over `count`. On a CPU: `cap`. Balanced means 100 images at a cap of 32 run as 4 batches
    of 25, not 32+32+32+4."""
    if count <= 0:
        return 1
    limit = cap
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.5 * free
        if max_bytes is not None:
            budget = min(budget, max_bytes - torch.cuda.memory_allocated(device))
        limit = max(1, min(cap, int(budget / (per_image_bytes * (resolution / 512) ** 2))))
    batches = -(-count // limit)
    return -(-count // batches)


@torch.no_grad()
def generate_class_images(pipeline_factory: Callable[[], object], plan: ClassImagePlan, *, prompt: str,
                          resolution: int, steps: int, seed: int, batch_size: int | None = None,
                          progress: Callable[[int], None] | None = None, max_bytes: int | None = None) -> int:
    """Generate the images of `plan.missing_indices` (index i starts from the noise of seed + i), each written
    atomically. Batches as large as memory (and `max_bytes` in all) allows, `batch_size` forces one; a batch that
    runs out of memory is split in two and retried, which changes no picture.

    On a CPU every picture is made on its own, whatever `batch_size` says: CPU BLAS and oneDNN choose their
    algorithm by row count and batch size, so rows of a batch come out a rounding apart from the same rows alone
    (seen on an AMD EPYC host in the time embedding's first Linear: 1.8e-7, then one pixel level), and a CPU gains
    little from batching (16 tiny class images, 2 cores: 4.5 s one by one, as long as in batches with oneDNN
    switched off, which batch-invariant convolutions needed before). On a GPU, cuBLAS and cuDNN also
    choose kernels by shape: pictures agree across batch sizes up to float rounding."""
    if not plan.missing_indices:
        return 0
    pipe = pipeline_factory()
    device = pipe.unet.device
    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    size = 1 if device.type == "cpu" else batch_size or fitted_batch_size(
        len(plan.missing_indices), DENOISE_BYTES_PER_IMAGE, device, resolution, max_bytes=max_bytes)
    pending, done, writes, spent = list(plan.missing_indices), 0, [], {"denoising": 0.0, "decoding": 0.0}
    started = time.perf_counter()
    writer = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # PNG encoding overlaps the denoising
    decoder = decoding_vae(pipe, max_bytes)
    try:
        done = _generate_batches(pipe, plan, pending, size, writer, writes, prompt=prompt, resolution=resolution,
                                 steps=steps, seed=seed, shape=shape, progress=progress, spent=spent,
                                 max_bytes=max_bytes, decoder=decoder)
        waited = time.perf_counter()
    finally:
        writer.shutdown(wait=True)
    for write in writes:
        write.result()  # a failed write raises here
    log.info("class images: %d in %.1f s (batches of up to %d, %d steps; denoising %.1f s, decoding %.1f s, "
             "writing %.1f s after the last batch)", done, time.perf_counter() - started, size, steps,
             spent["denoising"], spent["decoding"], time.perf_counter() - waited)
    return done


def _generate_batches(pipe, plan: ClassImagePlan, pending: list[int], size: int, writer, writes: list, *,
                      prompt: str, resolution: int, steps: int, seed: int, shape: tuple[int, int, int],
                      progress: Callable[[int], None] | None, spent: dict[str, float], max_bytes: int | None,
                      decoder) -> int:
    device, done = pipe.unet.device, 0
    while pending:
        chunk = pending[:size]
        try:
            with _timed(spent, "denoising", device):
                latents = pipe(prompt=[prompt] * len(chunk), height=resolution, width=resolution,
                               num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, output_type="latent",
                               latents=initial_latents(chunk, seed, shape).to(device, pipe.unet.dtype)).images
            with _timed(spent, "decoding", device):
                images = decode_latents(pipe, latents, max_bytes=max_bytes, vae=decoder)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(1, size // 2)
            log.info("class images: out of memory, batches of %d from now on", size)
            torch.cuda.empty_cache()
            continue
        writes += [writer.submit(_write_png, image, plan.folder / CLASS_IMAGE_PATTERN.format(index=index))
                   for index, image in zip(chunk, images)]
        pending = pending[len(chunk):]
        done += len(chunk)
        if progress:
            progress(len(chunk))
    return done


@contextmanager
def _timed(spent: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    spent[name] += time.perf_counter() - start


def _write_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=1)  # a fast zlib level: the default (6) costs far more CPU


def decoding_vae(pipe, max_bytes: int | None = None):
    """The VAE that decodes the class images: a copy in the UNet's 16-bit dtype when the UNet runs in one on a GPU
    and the run's memory is not bounded (`max_bytes`). In bf16 it was 19% faster than the fp32 weights under bf16
    autocast (an H200, 25 images), as its norm layers then run in bf16 too; in fp16, the dtype of GPUs without
    bf16 (a T4), it spares convolutions in fp32, which run there at an eighth of fp16's rate (`decode_latents`
    redoes a batch in fp32 if fp16 overflows). Otherwise the pipeline's own, which stays fp32 in any case: it
    encodes the training latents afterwards."""
    vae = pipe.vae
    if vae.device.type == "cuda" and pipe.unet.dtype in LOW_PRECISION and max_bytes is None:
        return copy.deepcopy(vae).to(pipe.unet.dtype)
    return vae


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, *, max_bytes: int | None = None, vae=None) -> list:
    """Decode with `vae` (default: the pipeline's) in batches that fit memory; an fp32 VAE under bf16 autocast when
    the UNet ran in bf16 (autocast rounds copies, never the weights). A batch an fp16 `vae` decodes to non-finite
    pixels (SD's VAE can overflow fp16's range) is decoded again by the pipeline's fp32 VAE, in halves, and so is
    every batch after it."""
    vae = vae if vae is not None else pipe.vae
    device = latents.device
    autocast = device.type == "cuda" and pipe.unet.dtype == torch.bfloat16 and vae.dtype == torch.float32
    halved = autocast or vae.dtype in LOW_PRECISION
    size = fitted_batch_size(latents.shape[0], DECODE_BYTES_PER_IMAGE / (2 if halved else 1), device,
                             latents.shape[-1] * pipe.vae_scale_factor, max_bytes=max_bytes)
    images = []
    for start in range(0, latents.shape[0], size):
        chunk = latents[start:start + size]
        pixels = _decode(vae, chunk, autocast)
        if vae.dtype == torch.float16 and not torch.isfinite(pixels).all():
            log.info("class images: the VAE overflowed in fp16; decoding in fp32 from here on")
            vae, autocast = pipe.vae, False
            pixels = torch.cat([_decode(vae, part, False) for part in chunk.split(max(1, size // 2))])
        images.append(pixel_bytes(pipe.image_processor, pixels))
    return [Image.fromarray(array) for array in torch.cat(images).permute(0, 2, 3, 1).cpu().numpy()]


def _decode(vae, latents: torch.Tensor, autocast: bool) -> torch.Tensor:
    """fp32 pixels of `latents` decoded by `vae` (under bf16 autocast if asked)."""
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()


def pixel_bytes(image_processor, pixels: torch.Tensor) -> torch.Tensor:
    """Decoded fp32 pixels as uint8 (N, C, H, W), on their own device: the same bytes as `image_processor.postprocess(
    pixels, output_type="pil")`, whose scaling and rounding run in numpy on one CPU core after a copy of 4x the
    bytes (0.6-0.9 s per 100 class images at 512 px on an H200's host; 0.2-0.3 s this way)."""
    unit = image_processor.denormalize(pixels) if image_processor.config.do_normalize else pixels.clamp(0, 1)
    return (unit * 255).round().to(torch.uint8)


def write_manifest(folder: Path, *, base: str, prompt: str, resolution: int, seed: int, steps: int) -> None:
    """Record how the class images were made (base, prompt, count, seed, sampler and steps) beside them."""
    from lora_dreambooth.data.images import IMAGE_EXTENSIONS

    count = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    manifest = {"base": base, "prompt": prompt, "resolution": resolution, "seed": seed,
                "inference_steps": steps, "sampler": SAMPLER, "guidance_scale": GUIDANCE_SCALE,
                "generation": generation_key(steps), "count": count}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_manifest(folder: Path, *, prompt: str, steps: int | None = None) -> None:
    """Warn when a reused class folder was made for another prompt, or with other generation settings."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        made = json.loads(path.read_text())
    except ValueError:
        return
    made_for = made.get("prompt")
    if made_for and made_for != prompt:
        log.warning("class images in '%s' were generated for prompt '%s', not '%s'", folder, made_for, prompt)
    made_with = made.get("generation", "v1 (before samplers were recorded)")
    if steps is not None and made_with != generation_key(steps):
        log.warning("class images in '%s' were generated with %s, not %s; they are reused as they are (delete the "
                    "folder to regenerate them)", folder, made_with, generation_key(steps))


def prepare_class_images(base, accelerator, cfg: TrainConfig, *, prompt: str, class_dir: str | None,
                         device: torch.device, weight_dtype: torch.dtype, offload_after: bool) -> list[Example]:
    """The class images of `prompt`: the missing ones generated with the frozen base (split across ranks, written
    atomically, recorded in the manifest), then all of them loaded as examples.

    The frozen models reach the device only when there is something to generate; with `offload_after` (the
    low-memory profile quantizes from the CPU copy) they go back to the CPU afterwards.
    """
    folder = (Path(class_dir) if class_dir
              else default_class_dir(cfg.base, prompt, cfg.resolution, cfg.class_inference_steps))
    check_manifest(folder, prompt=prompt, steps=cfg.class_inference_steps)
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
        generate_class_images(lambda: class_image_pipeline(base), plan, prompt=prompt, resolution=cfg.resolution,
                              steps=cfg.class_inference_steps, seed=cfg.seed * 7919 + 1,
                              max_bytes=parse_size(cfg.max_vram, option="--max-vram") if cfg.max_vram else None)
        if offload_after:
            for model in (base.unet, base.text_encoder, base.vae):
                model.to("cpu")
    accelerator.wait_for_everyone()
    made_now = plan.existing < cfg.num_class_images or not (folder / MANIFEST).is_file()
    if accelerator.is_main_process and made_now:  # a reused folder keeps the record of how it was made
        write_manifest(folder, base=cfg.base, prompt=prompt, resolution=cfg.resolution, seed=cfg.seed,
                       steps=cfg.class_inference_steps)
    examples = load_examples(folder, prompt, cfg.resolution, what="class image folder", skip_bad=True)
    return examples[: max(cfg.num_class_images, 1)]
