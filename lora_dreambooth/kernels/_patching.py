"""Switching layers to a kernel only after its trial run on their GPU has passed (shared by the Triton kernels)."""
from __future__ import annotations

import functools
import logging
import types
from typing import Callable

import torch

log = logging.getLogger("lora_dreambooth.kernels")


def install_forward(layers: list[torch.nn.Module], forward: Callable, failure: str | None, fallback: str) -> int:
    """Give each of `layers` `forward` (called with `previous=` the layer's forward until now) unless `failure`
    (why the kernel's trial run failed) is set, in which case log once that `fallback` runs instead and change
    nothing. Returns how many layers changed."""
    if failure:
        log.warning("%s: the kernel failed its trial run (%s)", fallback, failure)
        return 0
    for layer in layers:
        layer.forward = types.MethodType(functools.partial(forward, previous=layer.forward), layer)
    return len(layers)


def error_line(error: Exception) -> str:
    """`Type: first line of the message`: a compiler's or driver's error, short enough for one log line."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
