"""Optimizers and learning-rate schedules for adapter parameters."""
from __future__ import annotations

import logging
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError

log = logging.getLogger(__name__)


def build_optimizer(name: str, groups: list[dict[str, Any]], *, weight_decay: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    """`adamw` (fused), `adamw8bit` (bitsandbytes; falls back to AdamW with a warning) or `prodigy`."""
    if name == "prodigy":
        return build_prodigy(groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
        except Exception as exc:  # missing package, or a broken native library
            log.warning("bitsandbytes cannot load (%s); using torch AdamW instead of adamw8bit",
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    # Fused on a CPU too: one kernel for all adapter tensors instead of a Python loop over them (on the demo's
    # 128 tensors 1.1-1.6 ms a step instead of 11-12, about a tenth of its CPU step).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused)


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_processes: int = 1):
    """diffusers' schedule by name. accelerate steps a prepared scheduler once per process, hence the scaling."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=total_steps * num_processes)


def skip_steps_on_overflow(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor,
                           grad_scale: torch.Tensor | None = None) -> None:
    """Let a fused torch Adam/AdamW skip its update on the device where `found_inf` is non-zero (and divide the
    gradients by `grad_scale` when given): the attributes `torch.amp.GradScaler.step` sets for one step, here set
    for good, so a captured step reads the current values of these tensors."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not all(group.get("fused") for group in inner.param_groups):
        raise TypeError("device-side overflow skipping needs a fused Adam/AdamW")
    inner.found_inf = found_inf
    inner.grad_scale = grad_scale


class SkippedSteps:
    """Counts, on the device, the optimizer steps `torch.amp.GradScaler` skipped in the eager path: its scale drops
    exactly then (backoff < 1). accelerate's `optimizer_step_was_skipped` misses a fused AdamW's skip: GradScaler
    calls that optimizer with `found_inf` and its kernel skips, so accelerate sees a step taken."""

    def __init__(self, grad_scaler: "torch.amp.GradScaler | None"):
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.skipped: torch.Tensor | None = None

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.step()`, counting a skip when the scale backs off."""
        scale = self.grad_scaler._get_scale_async() if self.grad_scaler is not None else None
        before = scale.clone() if scale is not None else None
        optimizer.step()
        if before is not None:
            dropped = (self.grad_scaler._get_scale_async() < before).to(torch.float32)
            self.skipped = dropped if self.skipped is None else self.skipped + dropped

    def count(self) -> int:
        """Steps skipped so far (a device read: call it when reporting)."""
        return int(self.skipped.item()) if self.skipped is not None else 0


def adapter_param_groups(cfg: Any, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *,
                         num_processes: int, with_prior: bool, log_it: bool = True) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the UNet's adapter weights at --lr, the text encoder's (when trained) at
    --text-encoder-lr, the --pivotal identifier row at --embedding-lr (see `parameter_groups`); with --scale-lr
    all times the effective batch, which is logged either way."""
    effective_batch = num_processes * cfg.batch_size * cfg.gradient_accumulation
    lr_factor = effective_batch if cfg.scale_lr else 1
    if log_it:
        log.info("effective batch: %d process(es) x %d image(s) x %d accumulation = %d instance images per step%s; "
                 "lr %g%s", num_processes, cfg.batch_size, cfg.gradient_accumulation, effective_batch,
                 " (+ as many class images)" if with_prior else "", cfg.lr * lr_factor,
                 f" (= {cfg.lr:g} x {effective_batch}, --scale-lr)" if cfg.scale_lr else " (not scaled; --scale-lr)")
    return parameter_groups(cfg, unet, text_encoder, lr_factor)


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
