"""Reading a base's UNet weights onto the device in a background thread, while the libraries that build the model are
still importing.

The UNet is most of an SD v1 base (3.4 of its 4.3 GB in fp32), and on a GPU host the imports before it can be read
take 7 s. diffusers reads the file only once they are done: through a memory map, casting each tensor on the CPU
before copying it over. Here a thread copies the file's bytes to the device in large chunks. It spends its time in
file reads and copies, which release the GIL, so the imports go on beside it. Once the model class is importable,
:meth:`WeightPrefetch.state_dict` gives the tensors as views of those bytes, cast on the device.

Only torch and the standard library are imported here: the point is to run before diffusers is imported.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
# per read and copy: each chunk hands the GIL to the importing thread and back (up to 5 ms); the pinned chunk stays in
# torch's pinned-memory cache for the rest of the run
CHUNK_BYTES = 64 << 20
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def unet_weights_file(location: str) -> Path | None:
    """The UNet's weights file in a local diffusers folder, or None where diffusers' own loader must resolve it (a
    hub id, a single-file checkpoint, sharded or variant weights, pickle files)."""
    file = Path(location).expanduser() / UNET_WEIGHTS
    return file if file.is_file() else None


class WeightPrefetch:
    """One safetensors file being read onto `device` by a thread of its own (:meth:`start`)."""

    def __init__(self, file: Path, device: torch.device):
        self.file, self.device = Path(file), _with_index(device)  # the thread's current GPU is not the caller's
        self.seconds = 0.0  # the read's wall time
        self._header: dict | None = None
        self._raw: torch.Tensor | None = None  # the file's data section, as bytes on the device
        self._error: Exception | None = None
        self._cancelled = threading.Event()
        # not a daemon, so that the interpreter never tears CUDA down under a copy; the read stops at its next chunk
        # once cancelled or once the main thread has ended (a run that failed before loading exits at once)
        self._thread = threading.Thread(target=self._read, name=f"read {self.file.name}")

    @classmethod
    def start(cls, file: Path, device: torch.device | str) -> WeightPrefetch:
        """Begin reading `file` onto `device`; nothing waits for it until :meth:`state_dict`."""
        prefetch = cls(file, torch.device(device))
        prefetch._thread.start()
        return prefetch

    @property
    def nbytes(self) -> int:
        return self.file.stat().st_size

    def reads_onto(self, device: torch.device | str) -> bool:
        """Whether the read goes to `device` ("cuda" meaning the caller's current GPU)."""
        return _with_index(device) == self.device

    def state_dict(self, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """Wait for the read, then the file's tensors on the device: floating ones cast to `dtype`, the rest copied.
        None when the file could not be read this way (the caller loads it with the library instead, which says
        what is wrong with it)."""
        self._thread.join()
        raw, header, self._raw = self._raw, self._header, None
        if raw is None:
            if not self._cancelled.is_set():
                log.info("the early read of %s failed (%s): diffusers reads it", self.file, self._error)
            return None
        try:
            return {name: self._tensor(raw, entry, dtype) for name, entry in header.items() if name != "__metadata__"}
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:  # out of memory included
            log.info("the early read of %s is not usable (%s): diffusers reads it", self.file, str(exc)[:200])
            return None
        finally:
            del raw
            self._release_cache()

    def cancel(self) -> None:
        """Stop the read (within one chunk) and give its memory back."""
        self._cancelled.set()
        self._thread.join()
        self._raw = None
        self._release_cache()

    def _read(self) -> None:
        started = time.perf_counter()
        try:
            with open(self.file, "rb", buffering=0) as stream:
                header_bytes = int.from_bytes(_read_exactly(stream, 8), "little")
                self._header = json.loads(_read_exactly(stream, header_bytes))
                data_bytes = os.fstat(stream.fileno()).st_size - 8 - header_bytes
                raw = torch.empty(data_bytes, dtype=torch.uint8, device=self.device)
                _read_into(stream, raw, self._stopped)
            self._raw = raw
        except Exception as exc:  # noqa: BLE001 - any failure means the library reads the file as it always did
            self._error = exc
        self.seconds = time.perf_counter() - started

    @staticmethod
    def _tensor(raw: torch.Tensor, entry: dict, dtype: torch.dtype) -> torch.Tensor:
        begin, end = entry["data_offsets"]
        tensor = raw[begin:end].view(SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])
        # always a copy: a view would keep the whole file's buffer alive for as long as one weight lives
        return tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()

    def _stopped(self) -> bool:
        return self._cancelled.is_set() or not threading.main_thread().is_alive()

    def _release_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the file's buffer goes back to the GPU, not to torch's cache


def _with_index(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise EOFError(f"{size} bytes expected, {len(data)} read")
    return data


def _read_into(stream, raw: torch.Tensor, stopped: Callable[[], bool]) -> None:
    """Fill `raw` from `stream`: straight into it on the CPU, through one pinned chunk onto a GPU; raise if
    `stopped()` says so between chunks."""
    staging = raw if raw.device.type == "cpu" else torch.empty(min(CHUNK_BYTES, raw.numel()), dtype=torch.uint8,
                                                                   pin_memory=True)
    view, done = memoryview(staging.numpy()), 0
    while done < raw.numel():
        if stopped():
            raise InterruptedError("cancelled")
        size = min(CHUNK_BYTES, raw.numel() - done)
        window = view[done:done + size] if staging is raw else view[:size]
        got = 0
        while got < size:
            count = stream.readinto(window[got:])
            if not count:
                raise EOFError(f"the file ends {raw.numel() - done - got} bytes early")
            got += count
        if staging is not raw:
            raw[done:done + size].copy_(staging[:size])  # from pinned memory: the copy waits for the device
        done += size
