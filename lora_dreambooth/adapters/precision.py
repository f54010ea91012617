"""How adapter layers compute under mixed precision."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


@contextlib.contextmanager
def adapters_compute_in_autocast(models: Iterable[torch.nn.Module | None], enabled: bool = True) -> Iterator[None]:
    """Within a forward that runs under autocast (accelerate's fp16/bf16), let peft's layers hand their input to
    the adapter as it is, instead of first copying it to the fp32 adapter weights' dtype.

    Autocast casts that input back to the compute dtype before the matmul anyway, so the results are bit-identical;
    what goes is two activation-sized copies per adapted layer in the forward pass and two in the backward pass
    (about 1,400 kernels per SD training step). peft's own `disable_input_dtype_casting` does the switching. Never
    enable it without autocast: an fp32 adapter would then see 16-bit inputs.
    """
    with contextlib.ExitStack() as stack:
        if enabled:
            from peft.helpers import disable_input_dtype_casting

            for model in models:
                if model is not None:
                    stack.enter_context(disable_input_dtype_casting(model))
        yield
