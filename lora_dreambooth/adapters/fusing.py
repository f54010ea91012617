"""Fused adapters at base speed: once peft has merged an adapter into the base weights, its wrappers can be
taken out of the forward path (and put back before unfusing)."""
from __future__ import annotations

from typing import Callable

import torch


def bypass_merged_adapters(model: torch.nn.Module) -> Callable[[], None]:
    """Put each peft LoRA wrapper whose adapter is merged into its base weight (`fuse_lora`) out of the forward
    path by swapping in its base layer; returns a function that puts the wrappers back (before `unfuse_lora`).

    A merged wrapper computes nothing extra but still costs a Python call per layer, which shows in host-bound
    generation; bypassed, a fused pipeline runs at the base model's speed and can still be unfused.
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if getattr(child, "merged", False) and isinstance(getattr(child, "base_layer", None), torch.nn.Module):
                setattr(parent, name, child.base_layer)
                swapped.append((parent, name, child))

    def restore() -> None:
        for parent, name, wrapper in reversed(swapped):
            setattr(parent, name, wrapper)
        swapped.clear()

    return restore


@torch.no_grad()
def adapter_weight_deltas(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Module name -> the change adapter `adapter_name` makes to that layer's weight, as peft's own merge computes
    it (each layer is merged, read and unmerged again: the model is left as it was). What third-party loaders of an
    exported adapter must reproduce."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in module.active_adapters:
            weight = module.get_base_layer().weight
            before = weight.detach().clone()
            module.merge(adapter_names=[adapter_name])
            deltas[name] = weight.detach() - before
            module.unmerge()
    return deltas
