"""Optimizers and learning-rate schedules for adapter parameters."""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def build_optimizer(name: str, groups: list[dict[str, Any]], *, weight_decay: float, device: torch.device
                    ) -> torch.optim.Optimizer:
    """`adamw` (fused on CUDA) or `adamw8bit` (bitsandbytes; falls back to AdamW with a warning)."""
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
    --text-encoder-lr; with --scale-lr both times the effective batch, which is logged either way."""
    from lora_dreambooth.adapters import trainable_parameters

    effective_batch = num_processes * cfg.batch_size * cfg.gradient_accumulation
    lr_factor = effective_batch if cfg.scale_lr else 1
    if log_it:
        log.info("effective batch: %d process(es) x %d image(s) x %d accumulation = %d instance images per step%s; "
                 "lr %g%s", num_processes, cfg.batch_size, cfg.gradient_accumulation, effective_batch,
                 " (+ as many class images)" if with_prior else "", cfg.lr * lr_factor,
                 f" (= {cfg.lr:g} x {effective_batch}, --scale-lr)" if cfg.scale_lr else " (not scaled; --scale-lr)")
    groups = [{"params": trainable_parameters(unet), "lr": cfg.lr * lr_factor}]
    if text_encoder is not None:
        groups.append({"params": trainable_parameters(text_encoder), "lr": (cfg.text_encoder_lr or cfg.lr) * lr_factor})
    return groups
