"""Start-up speed: choose the execution plan before any weight is read, so the base loads once, straight to where it
runs; size the latent-encoding batches to the memory the plan leaves free.

Nothing here knows the recipe: each function takes the values it needs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lora_dreambooth.config import TrainConfig
from lora_dreambooth.data.latent_store import LatentStore
from lora_dreambooth.single_file import config_folder_for, is_single_file
from lora_dreambooth.training.lowmem import ExecutionPlan, plan_for_base
from lora_dreambooth.training.priors import default_cache_root

log = logging.getLogger(__name__)
# Peak bytes of encoding one 512 px image with the fp32 VAE (measured: a batch of 8 peaks at 6.3 GiB)
ENCODE_BYTES_PER_IMAGE = 0.8 * (1 << 30)
MAX_ENCODE_BATCH = 32


def plan_before_loading(cfg: TrainConfig, location: str, *, device: torch.device, num_processes: int
                        ) -> ExecutionPlan:
    """The plan for this base, from its configs alone: the UNet and text encoder are built on the meta device
    (shapes, no storage), which is all the planner counts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if is_single_file(location) and Path(location).is_file():  # the configs the single-file loader builds it from
        location = str(config_folder_for(Path(location)))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(location, subfolder="unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(location, subfolder="text_encoder"))
    shapes = SimpleNamespace(unet=unet, text_encoder=text_encoder)
    return plan_for_base(cfg, shapes, device=device, num_processes=num_processes)


def base_placement(plan: ExecutionPlan, device: torch.device, weight_dtype: torch.dtype) -> dict[str, Any]:
    """`load_base` arguments: on a GPU the UNet and text encoder load once, straight to it in the compute dtype.

    Not for the low-memory profile, whose rule is that the full-precision model never lands on the GPU (NF4
    quantizes from the CPU copy, layer by layer), and not on a CPU (the recipe casts there, as it always did).
    """
    if device.type != "cuda" or plan.quantize:
        return {}
    return {"device": device, "dtype": weight_dtype}


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


def latent_store(cfg: TrainConfig) -> LatentStore | None:
    """Where latents are kept between runs (`latents/` in the user cache folder), or None with --no-latent-cache."""
    return LatentStore(default_cache_root() / "latents") if cfg.latent_cache else None
