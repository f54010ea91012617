"""The Triton kernels compiled in the background: on a machine's first run, compiling the NHWC GroupNorm and GEGLU
kernels (nine variants) takes seconds, which can overlap loading the base instead of delaying class images and the
first step. Triton keeps them in its cache folder, so later runs load them in milliseconds."""
from __future__ import annotations

import threading

import torch

_PENDING: list[threading.Thread] = []


def compile_in_background(device: torch.device, dtype: torch.dtype, *, norms: bool, geglu: bool) -> None:
    """Run the trials of the kernels asked for on a CUDA `device` in a daemon thread; a trial compiles its kernels
    and caches its answer, so patching the layers later (after :func:`wait_for_compiles`) finds them ready. A
    failure stays inside the trial's answer, as when it runs in the foreground."""
    if device.type != "cuda" or not (norms or geglu):
        return
    from lora_dreambooth.kernels import geglu as geglu_kernels
    from lora_dreambooth.kernels import group_norm

    if device.index is None:  # the trials' answers are cached per device, as the layers' weights name it
        device = torch.device("cuda", torch.cuda.current_device())
    trials = [group_norm.trial_failure] * norms + [geglu_kernels.trial_failure] * geglu

    def compile_all() -> None:
        with torch.cuda.device(device):
            for trial in trials:
                trial(device, dtype)

    thread = threading.Thread(target=compile_all, name="lora-dreambooth-kernel-compile", daemon=True)
    thread.start()
    _PENDING.append(thread)


def wait_for_compiles() -> None:
    """Wait until the kernels started by :func:`compile_in_background` are compiled (at once if none are)."""
    while _PENDING:
        _PENDING.pop().join()
