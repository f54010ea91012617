"""Which scaled-dot-product attention kernel a UNet's attention runs at its highest latent resolutions.

At 512 px an SD v1 UNet's first down block and last up block attend over 64x64 = 4,096 tokens with head size 40.
Flash attention has no kernel for 40 and runs its 64 one; in one R2 training step on an H200 its backward there
was 4.4 of 7.6 ms of attention (BENCHMARKS.md, eleventh pass). cuDNN's kernels take 40 as it is, but cuDNN plans
every new shape on first use (about 1 s each), which is why `models.prefer_flash_attention` leaves it out
process-wide. Routing only these layers to it plans one shape forward and one backward.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": None,  # torch's own choice (flash attention on a recent GPU)
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}


def route_attention(unet: torch.nn.Module, backend: str, levels: int = 1, cross: bool = False) -> int:
    """Let the self-attention layers (and with `cross` the cross-attention ones) of `unet`'s `levels`
    highest-resolution levels (level 1: the first down block and the last up block, at the full latent resolution)
    prefer `backend` (a key of :data:`BACKENDS`), falling back in the listed order where it cannot run; returns how
    many layers changed. Layers with diffusers' default `AttnProcessor2_0` get a :func:`preferred_backend_processor`;
    one that already runs a subclass of it (e.g. the fused projections of `adapters/fused_projections.py`) keeps
    its processor, which takes the order."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    order = BACKENDS[backend]
    if order is None:
        return 0
    from diffusers.models.attention_processor import AttnProcessor2_0

    down, up = list(getattr(unet, "down_blocks", [])), list(getattr(unet, "up_blocks", []))[::-1]
    blocks = down[:levels] + up[:levels]
    changed = 0
    for module in (m for block in blocks for m in block.modules()):
        if getattr(module, "is_cross_attention", None) not in ((False, True) if cross else (False,)):
            continue
        processor = getattr(module, "processor", None)
        if isinstance(processor, preferred_backend_processor()):
            processor.order = order
        elif type(processor) is AttnProcessor2_0:
            module.set_processor(preferred_backend_processor()(order))
        else:
            continue
        changed += 1
    return changed


@functools.cache
def preferred_backend_processor() -> type:
    """diffusers' `AttnProcessor2_0` run inside `sdpa_kernel` with a backend order, where one is set (diffusers is
    imported on use). Subclasses that compute the attention themselves enter :meth:`backend` around it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    class PreferredBackendProcessor(AttnProcessor2_0):
        def __init__(self, order: list[SDPBackend] | None = None):
            super().__init__()
            self.order = order

        def backend(self) -> contextlib.AbstractContextManager:
            """Where scaled-dot-product attention runs in this layer: the preferred order, or torch's choice."""
            return sdpa_kernel(self.order, set_priority=True) if self.order else contextlib.nullcontext()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            with self.backend():
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        *args, **kwargs)

    return PreferredBackendProcessor
