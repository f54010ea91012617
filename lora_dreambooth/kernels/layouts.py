"""Memory layouts kept end to end: a channels-last UNet's blocks hand each other NHWC tensors without copies."""
from __future__ import annotations

import types

import torch


def keep_transformer_outputs_channels_last(model: torch.nn.Module) -> int:
    """Let every diffusers `Transformer2DModel` of `model` with a 1x1-convolution output projection (SD v1.x) give
    `proj_out` its tokens in the NHWC layout they already have; returns how many blocks changed.

    diffusers makes the tokens NCHW-contiguous first (`.permute(0, 3, 1, 2).contiguous()`): on a channels-last
    UNet that is a copy to NCHW, a copy back inside the channels-last convolution, a strided residual add, and the
    same again for the gradients. The maths is unchanged: the same convolution on the same values.
    """
    changed = 0
    for module in model.modules():
        if (hasattr(module, "_get_output_for_continuous_inputs") and module.use_linear_projection is False
                and isinstance(getattr(module, "proj_out", None), torch.nn.Module)):
            module._get_output_for_continuous_inputs = types.MethodType(_output_in_token_layout, module)
            changed += 1
    return changed


def _output_in_token_layout(self, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int,
                            height: int, width: int, inner_dim: int) -> torch.Tensor:
    tokens = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)  # NHWC memory
    return self.proj_out(tokens) + residual
