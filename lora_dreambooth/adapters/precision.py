"""How an adapted model computes under mixed precision: its adapter layers and its frozen base's norm layers."""
from __future__ import annotations

import contextlib
import types
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from lora_dreambooth.kernels import LOW_PRECISION


@contextlib.contextmanager
def adapters_compute_in_autocast(models: Iterable[torch.nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Within a forward that runs under autocast (accelerate's fp16/bf16), let peft's layers hand their input to
    the adapter as it is, instead of first copying it to the fp32 adapter weights' dtype.

    Autocast casts that input back to the compute dtype before the matmul anyway, so the results are bit-identical;
    what goes is two activation-sized copies per adapted layer in the forward pass and two in the backward pass
    (about 1,400 kernels per SD training step). peft's own `disable_input_dtype_casting` does the switching. Never
    enable it without autocast: an fp32 adapter would then see 16-bit inputs. Fused layers (`fused_lora.py`) also
    cast their adapter weights to the compute dtype all at once (`cast_adapters_once`), not layer by layer.
    """
    models = list(models)
    with contextlib.ExitStack() as stack:
        if enabled:
            from peft.helpers import disable_input_dtype_casting

            from lora_dreambooth.adapters.fused_lora import cast_adapters_once

            for model in models:
                if model is not None:
                    stack.enter_context(disable_input_dtype_casting(model))
            stack.enter_context(cast_adapters_once(models))
        yield


def norms_compute_in_weight_dtype(model: torch.nn.Module) -> int:
    """Let the GroupNorm and LayerNorm layers of a frozen 16-bit model compute in their own (16-bit) dtype even
    under autocast, which would otherwise run every norm in fp32; returns how many layers changed.

    Autocast's fp32 rule for norms costs an SD training step about 1,200 copy kernels (the norm's input, weight and
    bias up to fp32, its output back down at the next matmul, and the same in the backward pass) and runs the
    SiLU after each GroupNorm in fp32. Torch's CUDA and CPU norm kernels accumulate 16-bit inputs in fp32
    (`acc_type`), and the next layer rounds the output to 16 bits anyway, so what changes is where the rounding
    happens, not the statistics. Layers whose weights are fp32 (and subclasses, whose forward may differ) are
    left as they are.
    """
    changed = 0
    for module in model.modules():
        kind = type(module)
        if kind not in (torch.nn.GroupNorm, torch.nn.LayerNorm) or module.weight is None:
            continue
        if module.weight.dtype not in LOW_PRECISION:
            continue
        module.forward = types.MethodType(_group_norm if kind is torch.nn.GroupNorm else _layer_norm, module)
        changed += 1
    return changed


def _group_norm(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x.to(self.weight.dtype), self.num_groups, self.weight, self.bias, self.eps)


def _layer_norm(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps)
