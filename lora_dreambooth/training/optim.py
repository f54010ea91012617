"""Optimizers and learning-rate schedules for adapter parameters."""
from __future__ import annotations

import logging
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError

log = logging.getLogger(__name__)


def build_optimizer(name: str, groups: list[dict[str, Any]], *, weight_decay: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    """`adamw` (fused on CUDA), `adamw8bit` (bitsandbytes; falls back to AdamW with a warning) or `prodigy`."""
    if name == "prodigy":
        return build_prodigy(groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
        except Exception as exc:  # missing package, or a broken native library
            log.warning("bitsandbytes cannot load (%s); using torch AdamW instead of adamw8bit",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused)


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_processes: int = 1):
    """diffusers' schedule by name. accelerate steps a prepared scheduler once per process, hence the scaling."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes)


def build_prodigy(groups: list[dict[str, Any]], *, weight_decay: float) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, package `prodigyopt`): Adam whose step size d is estimated on the fly.

    lr multiplies that estimate, so lr 1.0 is the intended setting (kohya, OneTrainer and diffusers' advanced
    script recommend it); prodigyopt requires one lr for every group (config validation enforces it). Bias
    correction and the warm-up safeguard are on, as those scripts set them for DreamBooth LoRA; weight decay is
    decoupled (AdamW-style).
    """
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserInputError("--optimizer prodigy needs the prodigyopt package: pip install "
                             "'lora-dreambooth[prodigy]' (or: pip install prodigyopt)") from None
    if groups and groups[0]["lr"] < 0.1:
        log.warning("--optimizer prodigy with --lr %g: prodigy's lr scales its own step-size estimate, and 1.0 is "
                    "the intended value (a DreamBooth lr like 1e-4 makes it barely move)", groups[0]["lr"])
    return Prodigy(groups, weight_decay=weight_decay, decouple=True, use_bias_correction=True,
                   safeguard_warmup=True)


def parameter_groups(cfg: Any, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                     lr_factor: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups: the UNet adapter (`lr`), the text-encoder adapter (`text_encoder_lr`) and, with --pivotal,
    the identifier's embedding row (`embedding_lr`, no weight decay: decay would pull it towards zero, not towards
    its initial word)."""
    from lora_dreambooth.adapters import trainable_parameters
    from lora_dreambooth.adapters.embeddings import ROW_MODULE

    groups = [{"params": trainable_parameters(unet), "lr": cfg.lr * lr_factor}]
    if text_encoder is None:
        return groups
    named = [(n, p) for n, p in text_encoder.named_parameters() if p.requires_grad]
    adapter = [p for n, p in named if ROW_MODULE not in n]
    row = [p for n, p in named if ROW_MODULE in n]
    if adapter:
        groups.append({"params": adapter, "lr": (cfg.text_encoder_lr or cfg.lr) * lr_factor})
    if row:
        lr = cfg.embedding_lr or cfg.text_encoder_lr or cfg.lr
        groups.append({"params": row, "lr": lr * lr_factor, "weight_decay": 0.0})
    return groups
