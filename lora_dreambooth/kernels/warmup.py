"""The Triton kernels compiled in a second process: on a machine's first run, compiling the NHWC GroupNorm and GEGLU
kernels (eight variants) takes seconds, which then overlap the library imports, loading the base and generating
class images instead of delaying the first step. The process runs the kernels' trials, which compile them into
Triton's cache folder; the training process's own trials then load them from there in milliseconds. A process, not
a thread: compiling holds the interpreter lock for much of its time, which would slow the loading it overlaps."""
from __future__ import annotations

import subprocess
import sys
import time

import torch

_PENDING: dict[tuple, subprocess.Popen] = {}  # (device index, dtype, norms, geglu) -> the compiling process
WAIT_SECONDS = 120.0  # a compile that takes longer is stopped: the training process compiles what it needs itself


def compile_in_background(device: torch.device, dtype: torch.dtype, *, norms: bool, geglu: bool) -> None:
    """Start compiling the kernels asked for on a CUDA `device`, in another process (nothing happens elsewhere),
    unless a compile still pending already covers them; :func:`wait_for_compiles` waits for it. A failure there
    changes nothing: the trials here compile or fail as they would have."""
    if device.type != "cuda" or not (norms or geglu):
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if any(i == index and d == dtype and n >= norms and g >= geglu for i, d, n, g in _PENDING):
        return
    command = [sys.executable, "-m", __name__, str(index), str(dtype).removeprefix("torch.")]
    command += ["norms"] * norms + ["geglu"] * geglu
    try:
        _PENDING[(index, dtype, norms, geglu)] = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        pass


def wait_for_compiles() -> float:
    """Wait until the compiles started by :func:`compile_in_background` are done (at once if there are none);
    returns the seconds waited."""
    started = time.perf_counter()
    while _PENDING:
        _, process = _PENDING.popitem()
        try:
            process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    """`python -m lora_dreambooth.kernels.warmup DEVICE_INDEX DTYPE [norms] [geglu]`: run those kernels' trials."""
    from lora_dreambooth.kernels import geglu, group_norm

    device, dtype = torch.device("cuda", int(argv[0])), getattr(torch, argv[1])
    failures = [trial(device, dtype) for name, trial in (("norms", group_norm.trial_failure),
                                                         ("geglu", geglu.trial_failure)) if name in argv[2:]]
    return int(any(failures))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
