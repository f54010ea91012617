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


def dreambooth_loss(prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_weight: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, instance, prior) MSE losses; the first `num_instance` rows are instance images, the rest class images.

    Computed in fp32 whatever the autocast dtype, as in the DreamBooth paper's formulation.
    """
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    instance = per_sample[:num_instance].mean()
    if per_sample.shape[0] == num_instance:
        return instance, instance, torch.zeros_like(instance)
    prior = per_sample[num_instance:].mean()
    return instance + prior_weight * prior, instance, prior
