"""The DreamBooth objective of one micro-batch: instance loss + prior_weight x prior loss.

The prior's target is the noise (or velocity) of the class images, or, with --prior-mode model, the frozen base's
own prediction for the instance latents under the class prompt. Loss masks (--masked-loss) and min-SNR weights
(--snr-gamma) apply to the per-pixel errors.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from lora_dreambooth.training.losses import denoising_target, dreambooth_loss, min_snr_weights, snr_table


class DreamBoothObjective:
    """`objective(prediction, latents, noise, noisy, timesteps, rows, mask)` -> the scalar loss.

    `unet` is the (unwrapped) adapted UNet whose adapters --prior-mode model switches off for the target; `base_text` holds the adapter-free text states of every prompt row (needed for --prior-mode model only);
    `autocast` is the precision context the frozen base runs under.
    """

    def __init__(self, scheduler, unet: torch.nn.Module, *, batch_size: int, prior_weight: float, snr_gamma: float | None,
                 model_prior: bool, base_text: torch.Tensor | None, weight_dtype: torch.dtype,
                 device: torch.device | str, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.scheduler, self.unet, self.batch_size, self.prior_weight = scheduler, unet, batch_size, prior_weight
        self.snr_gamma, self.model_prior, self.base_text = snr_gamma, model_prior, base_text
        self.weight_dtype, self.autocast = weight_dtype, autocast or contextlib.nullcontext
        self.snr = snr_table(scheduler, device) if snr_gamma else None

    def __call__(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                 noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        n = self.batch_size
        target = denoising_target(self.scheduler, latents, noise, timesteps)
        if self.model_prior:
            prior_target = self.base_prediction(noisy[n:], timesteps[n:], rows[n:])
            target = torch.cat([target[:n], prior_target.to(target.dtype)])
        weights = None
        if self.snr is not None:
            weights = min_snr_weights(self.snr[timesteps], self.snr_gamma, self.scheduler.config.prediction_type)
        loss, _, _ = dreambooth_loss(prediction, target, n, self.prior_weight, weights=weights, mask=mask)
        return loss

    @torch.no_grad()
    def base_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The frozen base's prediction (adapters off, adapter-free text states) on the prior rows."""
        self.unet.disable_adapters()
        try:
            with self.autocast():
                return self.unet(noisy.to(self.weight_dtype), timesteps, self.base_text[rows]).sample
        finally:
            self.unet.enable_adapters()  # also restores requires_grad on the adapter weights
