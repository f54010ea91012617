"""diffusers' `ResnetBlock2D` with each GroupNorm and its SiLU as one kernel, and no division by a scale of 1.

In SD v1's 22 resnet blocks, `norm -> SiLU` is two passes over the activations forward and two backward, and the
block's output is divided by `output_scale_factor` (1.0): one more kernel each way for an exact no-op. With the NHWC
GroupNorm kernel (`kernels/group_norm.py`, whose `SILU` flag applies the activation before the single rounding),
:func:`fuse_resnet_norm_activations` makes those blocks compute the same maths in fewer kernels. A norm whose input
the kernel does not take (a CPU or NCHW tensor) runs torch's norm and SiLU as before, inside the same forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_dreambooth.kernels import LOW_PRECISION
from lora_dreambooth.kernels._patching import install_forward
from lora_dreambooth.kernels.group_norm import norm_layer_nhwc, supports, trial_failure


def fuse_resnet_norm_activations(model: torch.nn.Module) -> int:
    """Give every plain SD-style `ResnetBlock2D` of `model` (SiLU, additive time embedding, no resampling, output
    scale 1, frozen 16-bit norms) the fused forward; returns how many changed: none when the GroupNorm kernel fails
    its trial run on their GPU (logged once)."""
    blocks = [m for m in model.modules() if _plain_resnet(m)]
    weight = blocks[0].norm1.weight if blocks else None
    failure = weight is not None and weight.is_cuda and trial_failure(weight.device, weight.dtype)
    return install_forward(blocks, _fused_forward, failure, "ResnetBlock2D runs its norms and SiLU apart")


def _plain_resnet(module: torch.nn.Module) -> bool:
    if type(module).__name__ != "ResnetBlock2D" or "forward" in vars(module):
        return False
    norms = [getattr(module, "norm1", None), getattr(module, "norm2", None)]
    return (module.time_embedding_norm == "default" and module.upsample is None and module.downsample is None
            and module.output_scale_factor == 1.0 and isinstance(module.nonlinearity, torch.nn.SiLU)
            and not module.skip_time_act and module.time_emb_proj is not None
            and all(type(n) is torch.nn.GroupNorm and n.weight is not None and n.weight.dtype in LOW_PRECISION
                    and not any(p.requires_grad for p in n.parameters()) for n in norms))


def _fused_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, previous,
                   **kwargs) -> torch.Tensor:
    if args or kwargs or temb is None:
        return previous(input_tensor, temb, *args, **kwargs)
    hidden = self.conv1(_norm_silu(self.norm1, input_tensor))
    hidden = hidden + self.time_emb_proj(F.silu(temb))[:, :, None, None]
    hidden = self.conv2(self.dropout(_norm_silu(self.norm2, hidden)))
    shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return shortcut + hidden  # diffusers divides by output_scale_factor, which is 1 here


def _norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`F.silu(norm(x))`, as one NHWC kernel where it takes `x`."""
    return norm_layer_nhwc(norm, x, silu=True) if supports(x, norm.weight, norm.bias) else F.silu(norm(x))
