"""The DreamBooth objective: denoising loss on instance images plus weighted prior-preservation loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict under the base's own `prediction_type` (epsilon or v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type '{kind}' in the base model's scheduler")


def snr_table(scheduler, device: torch.device | str | None = None) -> torch.Tensor:
    """SNR(t) = alphā_t / (1 - alphā_t) for every training timestep, as a float32 tensor on `device`.

    Computed once, so the training step only indexes it (nothing is copied to the device inside a CUDA graph).
    """
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) of samples whose SNR is `snr`, as diffusers' training
    scripts compute them: min(SNR, gamma) / SNR for an epsilon target, min(SNR, gamma) / (SNR + 1) for a
    v-prediction target, so the many easy low-noise timesteps stop dominating the loss."""
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unsupported prediction_type '{prediction_type}' for min-SNR weighting")


def add_noise_offset(noise: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """Noise offset (Guttenberg 2023): `noise + strength * offset`, with `offset` one N(0, 1) value per sample and
    channel (shape (batch, channels, 1, 1)), so the model also learns to shift an image's mean brightness."""
    return noise + strength * offset


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float, *,
                    weights: torch.Tensor | None = None, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, instance, prior) MSE losses; the first `num_instance` rows are instance images, the rest class images.

    Computed in fp32 whatever the autocast dtype, as in the DreamBooth paper's formulation. `mask` (batch, 1, h, w)
    in [0, 1] turns each sample's mean into a mask-weighted mean (a photo counts where its mask is white);
    `weights` (batch,) then scales each sample's loss (min-SNR).
    """
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if mask is None:
        per_sample = error.mean(dim=(1, 2, 3))
    else:
        mask = mask.float().expand_as(error)
        per_sample = (error * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-6)
    if weights is not None:
        per_sample = per_sample * weights.float()
    instance = per_sample[:num_instance].mean()
    if per_sample.shape[0] == num_instance:
        return instance, instance, torch.zeros_like(instance)
    prior = per_sample[num_instance:].mean()
    return instance + prior_weight * prior, instance, prior
