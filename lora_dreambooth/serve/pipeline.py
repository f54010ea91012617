"""One base pipeline with every library adapter resident: switch, mix, fuse, generate under one lock."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.load_adapter import (LORA_COMPONENTS, _pipeline_base_name, adapter_display_name,
                                                default_adapter_name, load_adapter, unique_adapter_name)
from lora_dreambooth.files.metadata import PICKLE_SUFFIXES, read_summary, resolve_adapter_file
from lora_dreambooth.serve.generation import GenerationLimits, GenerationRequest, GenerationResult
from lora_dreambooth.serve.library import AdapterLibrary, check_subject_name

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# One base pipeline, many resident adapters
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ResidentAdapter:
    """An adapter loaded into the resident pipeline."""

    name: str  # library / user-facing name
    adapter_name: str  # the peft adapter name inside the pipeline
    file: Path
    stamp: tuple[int, int] | None
    summary: dict[str, Any]


@dataclass
class SyncReport:
    """What :meth:`ResidentPipeline.sync` loaded, reloaded, dropped or could not load."""

    loaded: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ResidentPipeline:
    """One base pipeline with several adapters loaded once; requests pick and mix them by name.

    Switching subjects is ``set_adapters`` on weights already in memory: :attr:`adapter_disk_loads` and
    :attr:`base_loads` count the only two ways this class reads model files, so callers can verify that.
    With ``fuse=True`` the active mix is fused into the base weights while it stays the same (faster steps);
    note that unfusing is not bit-exact (~1e-6 per cycle), so keep it off when exact reproducibility matters.
    """

    def __init__(self, pipe: Any, *, base: str = "", fuse: bool = False,
                 limits: GenerationLimits = GenerationLimits(), allow_pickle: bool = False):
        self.pipe = pipe
        self.base = base or _pipeline_base_name(pipe)
        self.fuse = fuse
        self.limits = limits
        self.allow_pickle = allow_pickle
        self.base_loads = 0
        self.adapter_disk_loads = 0
        self.generations = 0
        self._adapters: dict[str, ResidentAdapter] = {}
        self._active: tuple[tuple[str, float], ...] | None = None
        self._fused: tuple[tuple[str, float], ...] | None = None
        self._restore_wrappers: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_base(cls, base: str, *, device: str | None = None, dtype: str | None = None,
                  allow_pickle: bool = False, **kwargs: Any) -> "ResidentPipeline":
        """Load an SD v1.x base (local folder or hub id) once, with a DPM-Solver++ scheduler."""
        from lora_dreambooth.models import load_base, prefer_flash_attention

        device = device or default_device()
        prefer_flash_attention(device)  # the first picture waits for no cuDNN attention plans
        torch_dtype = _DTYPES[dtype] if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
        model = load_base(base, allow_pickle=allow_pickle, device=device, dtype=torch_dtype)  # read straight to it
        pipe = model.pipeline()
        pipe.register_to_config(_name_or_path=str(base))
        pipe.to(device, torch_dtype)
        resident = cls(pipe, base=str(base), allow_pickle=allow_pickle, **kwargs)
        resident.base_loads += 1
        return resident

    # -- adapters ---------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._adapters)

    def adapter(self, name: str) -> ResidentAdapter:
        check_subject_name(name)
        try:
            return self._adapters[name]
        except KeyError:
            raise UserInputError(f"unknown subject '{name}' (available: {', '.join(self.names) or 'none'})") from None

    def add(self, path: str | Path, name: str | None = None, *, stamp: tuple[int, int] | None = None) -> str:
        """Read an adapter from disk into the pipeline (counted in :attr:`adapter_disk_loads`); return its name."""
        with self._lock:
            file = resolve_adapter_file(path, allow_pickle=self.allow_pickle)
            if name is None:
                stem = adapter_display_name(file)
                name, n = stem, 1
                while name in self._adapters:
                    n += 1
                    name = f"{stem}_{n}"
            if name in self._adapters:
                raise UserInputError(f"a subject named '{name}' is already loaded")
            self._unfuse()
            adapter_name = unique_adapter_name(self.pipe, default_adapter_name(Path(f"{name}.safetensors")))
            self.adapter_disk_loads += 1
            load_adapter(self.pipe, file, adapter_name, allow_pickle=self.allow_pickle)
            summary = {} if file.suffix.lower() in PICKLE_SUFFIXES else read_summary(file)
            self._adapters[name] = ResidentAdapter(name, adapter_name, file, stamp, summary)
            self._active = None  # loading activates the new adapter: state must be re-applied
            return name

    def remove(self, name: str) -> None:
        """Delete an adapter from the pipeline."""
        with self._lock:
            entry = self.adapter(name)
            self._unfuse()
            self.pipe.delete_adapters(entry.adapter_name)
            del self._adapters[name]
            self._active = None

    def sync(self, library: AdapterLibrary) -> SyncReport:
        """Make the resident set equal the library: load new and replaced files, drop removed ones."""
        report = SyncReport()
        with self._lock:
            for name in [n for n in self._adapters if n not in library]:
                self.remove(name)
                report.removed.append(name)
            for entry in library:
                current = self._adapters.get(entry.name)
                if current is not None and current.stamp == entry.stamp and current.file == entry.file:
                    continue
                if current is not None:
                    self.remove(entry.name)
                try:
                    self.add(entry.file, entry.name, stamp=entry.stamp)
                except UserInputError as exc:
                    log.warning("subject '%s' not loaded: %s", entry.name, exc)
                    report.failed[entry.name] = str(exc)
                    continue
                (report.reloaded if current is not None else report.loaded).append(entry.name)
        return report

    # -- generation -------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters (base loads, adapter disk loads, generations), resident subjects, the active mix, fused or not."""
        return {"base_loads": self.base_loads, "adapter_disk_loads": self.adapter_disk_loads,
                "generations": self.generations, "resident": self.names,
                "active": [list(a) for a in self._active] if self._active else [], "fused": self._fused is not None}

    def native_size(self) -> int:
        """The base model's default image side (512 for SD v1.x)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def activate(self, adapters: Sequence[tuple[str, float]]) -> None:
        """Make exactly ``adapters`` (name, weight) active; empty means the base model alone."""
        mix = tuple((name, float(weight)) for name, weight in adapters)
        with self._lock:
            entries = [self.adapter(name) for name, _ in mix]
            if mix == self._active:
                return
            self._unfuse()
            if not mix:
                self.pipe.disable_lora()
            else:
                self.pipe.enable_lora()
                self.pipe.set_adapters([e.adapter_name for e in entries], adapter_weights=[w for _, w in mix])
                if self.fuse:
                    from lora_dreambooth.adapters.fusing import bypass_merged_adapters

                    self.pipe.fuse_lora(components=list(LORA_COMPONENTS),
                                        adapter_names=[e.adapter_name for e in entries])
                    # merged peft wrappers still cost a Python call per layer: take them out of the forward path
                    self._restore_wrappers = [bypass_merged_adapters(getattr(self.pipe, c))
                                              for c in LORA_COMPONENTS if getattr(self.pipe, c, None) is not None]
                    self._fused = mix
            self._active = mix

    def _unfuse(self) -> None:
        if self._fused is not None:
            for restore in self._restore_wrappers:
                restore()
            self._restore_wrappers = []
            self.pipe.unfuse_lora(components=list(LORA_COMPONENTS))
            self._fused = None
            self._active = None

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Validate ``request``, apply its adapter mix and generate (one request at a time)."""
        request = request.validated(self.limits)
        size = self.native_size()
        request = replace(request, height=request.height or size, width=request.width or size)
        generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]
        with self._lock:
            self.activate(request.adapters)
            started = time.perf_counter()
            images = self.pipe(
                prompt=[request.prompt] * request.num_images,
                negative_prompt=[request.negative_prompt] * request.num_images if request.negative_prompt else None,
                num_inference_steps=request.steps, guidance_scale=request.guidance, height=request.height,
                width=request.width, generator=generators,
            ).images
            self.generations += 1
        return GenerationResult(images=images, request=request, base=self.base,
                                seconds=time.perf_counter() - started)


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); a suffix that is not a number stays part of the path."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0

