"""Start-up speed: choose the execution plan before any weight is read, so the base loads once, straight to where it
runs; size the latent-encoding batches to the memory the plan leaves free.

Nothing here knows the recipe: each function takes the values it needs.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data.latent_store import LatentStore
from lora_dreambooth.prefetch import WeightPrefetch, unet_weights_file
from lora_dreambooth.single_file import config_folder_for, is_single_file
from lora_dreambooth.training.lowmem import (ExecutionPlan, device_free_bytes, placed_unquantized_likely, plan_for_base,
                                             start_likely_kernel_compiles)
from lora_dreambooth.training.priors import default_cache_root

log = logging.getLogger(__name__)
# Peak bytes of encoding one 512 px image with the fp32 VAE (measured: a batch of 8 peaks at 6.3 GiB)
ENCODE_BYTES_PER_IMAGE = 0.8 * (1 << 30)
MAX_ENCODE_BATCH = 32
# GPU memory left over while the UNet's file and its cast copy are both there, for the rest of the start-up
PREFETCH_SPARE_BYTES = 1 << 30


@dataclass(frozen=True)
class EarlyStart:
    """What :func:`start_before_imports` began: the UNet's read (None if not begun), and the GPU's free memory just
    before it (None on a CPU), which the plan counts: the read's buffer is freed again once the UNet is built."""

    unet_prefetch: WeightPrefetch | None
    free_bytes: int | None


def start_before_imports(cfg: TrainConfig, location: str, device: torch.device, dtype: torch.dtype,
                         num_processes: int) -> EarlyStart:
    """Begin what does not need diffusers or transformers, so that it runs while they import (7 s on a GPU host):
    the Triton kernels' compile when the plan will surely run them (`start_likely_kernel_compiles`), and the read of
    the UNet's weights onto the GPU when the base will surely be placed there unquantized and the GPU holds the file
    and its cast copy at once (an fp16 file cast to fp32 at worst).
    """
    free = device_free_bytes(device)
    start_likely_kernel_compiles(cfg, device, dtype, num_processes, free)
    file = unet_weights_file(location) if device.type == "cuda" else None
    if file is None or not placed_unquantized_likely(cfg, device, free):
        return EarlyStart(None, free)
    size = file.stat().st_size
    if free < size * (1 + dtype.itemsize / 2) + PREFETCH_SPARE_BYTES:
        return EarlyStart(None, free)
    return EarlyStart(WeightPrefetch.start(file, device), free)


def plan_before_loading(cfg: TrainConfig, location: str, *, device: torch.device, num_processes: int,
                        early: EarlyStart | None = None) -> ExecutionPlan:
    """The plan for this base, from its configs alone: the UNet and text encoder are built on the meta device
    (shapes, no storage), which is all the planner counts; the GPU's free memory as it was before `early` began."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if is_single_file(location) and Path(location).is_file():  # the configs the single-file loader builds it from
        location = str(config_folder_for(Path(location)))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(location, subfolder="unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(location, subfolder="text_encoder"))
    shapes = SimpleNamespace(unet=unet, text_encoder=text_encoder)
    free = early.free_bytes if early is not None else None
    return plan_for_base(cfg, shapes, device=device, num_processes=num_processes, free_bytes=free)


def base_placement(cfg: TrainConfig, plan: ExecutionPlan, device: torch.device, weight_dtype: torch.dtype,
                   unet_prefetch: WeightPrefetch | None = None) -> dict[str, Any]:
    """`load_base` arguments: on a GPU the UNet and text encoder load once, straight to it in the compute dtype,
    the UNet from `unet_prefetch` where :func:`start_before_imports` began reading it.

    Not for the low-memory profile, whose rule is that the full-precision model never lands on the GPU (NF4
    quantizes from the CPU copy, layer by layer), and not on a CPU (the recipe casts there, as it always did); a
    prefetch then gives its memory back unused.
    """
    where: dict[str, Any] = {"allow_pickle": cfg.allow_pickle, "unet_prefetch": unet_prefetch}
    if device.type != "cuda" or plan.quantize:
        return where
    return {**where, "device": device, "dtype": weight_dtype}


def latent_batch_size(cfg: TrainConfig, plan: ExecutionPlan, device: torch.device,
                      vae: torch.nn.Module | None = None) -> int:
    """Images per VAE-encoding batch: as many as fit the memory the run may use.

    Half the free memory, unless the user bounded the run's memory (the low-memory profile, or --max-vram): then
    caching stays under the plan's predicted loop peak (usually 1 image at a time, as VAE slicing did). A `vae` not
    on the device yet (it moves there only to encode) is counted as if it were. On a CPU: 8, the old default.
    """
    if device.type != "cuda":
        return 8
    per_image = ENCODE_BYTES_PER_IMAGE * (cfg.resolution / 512) ** 2
    arriving = 0 if vae is None else sum(p.numel() * p.element_size() for p in vae.parameters()
                                     if p.device.type != device.type)
    free, _ = torch.cuda.mem_get_info(device)
    budget = 0.5 * (free - arriving)
    if (plan.quantize or cfg.max_vram) and plan.predicted_bytes:
        budget = min(budget, plan.predicted_bytes - torch.cuda.memory_allocated(device) - arriving)
    return max(1, min(MAX_ENCODE_BATCH, int(budget // per_image)))


def encoding_precision(device: torch.device, weight_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The precision the training latents are encoded in: fp32, except under fp16 autocast where the run computes
    in fp16 on a GPU. That is the choice of GPUs without bf16 (a T4, a V100), which have no TF32 either and run fp32
    convolutions at a fraction (an eighth on a T4) of their fp16 rate: the latents of 9 photos and 100 class images
    take ~20 s there in fp32, by FLOP count. A newer GPU told to use fp16 gets the same rounding, so that a run's
    latents follow its compute dtype alone. kohya's scripts cache latents with the VAE in fp16 by default; here the
    norms stay fp32 under autocast, and a batch that overflows is encoded again in fp32 (`encode_latents`)."""
    if device.type == "cuda" and weight_dtype == torch.float16:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def latent_store(cfg: TrainConfig) -> LatentStore | None:
    """Where latents are kept between runs (`latents/` in the user cache folder), or None with --no-latent-cache."""
    return LatentStore(default_cache_root() / "latents") if cfg.latent_cache else None
