"""Generation with trained subjects: load adapters into diffusers pipelines, keep a library resident, swap and mix.

- :func:`load_adapter` is the one call for any diffusers code: ``pipe.load_lora_weights`` plus checks (pickle
  refusal, broken files, LoRAs of another architecture, base-model mismatch, missing metadata) and a dispatch by
  adapter variant (:func:`register_adapter_loader`).
- :class:`AdapterLibrary` finds adapters in a folder and reads their metadata without loading weights.
- :class:`ResidentPipeline` holds one base pipeline with every library adapter loaded once; switching subjects
  is ``set_adapters`` (no disk read, no base reload), "none" is ``disable_lora``, mixes are weighted
  ``set_adapters``. A lock serialises switching + generation, so concurrent requests never see each other's
  adapter state. It counts base loads and adapter disk loads so callers (and tests) can check that.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .adapters.loading import load_into_pipeline, needs_exact_loader
from .errors import UserInputError
from .formats import ADAPTER_FILENAME, PICKLE_SUFFIXES, atomic_path, read_summary, resolve_adapter_file
from .sampling import image_grid

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("unet", "text_encoder")
PREVIEW_NAMES = ("preview.png", "samples.png", "preview.jpg", "samples.jpg")
BASE_ONLY = "(base model)"  # the subject choice that means "no adapter"


# ---------------------------------------------------------------------------------------------------------------
# Loading one adapter into any diffusers pipeline
# ---------------------------------------------------------------------------------------------------------------
AdapterLoader = Callable[[Any, Path, str, dict], None]
_LOADERS: dict[str, AdapterLoader] = {}


def register_adapter_loader(variant: str, loader: AdapterLoader) -> None:
    """Use ``loader(pipe, file, adapter_name, summary)`` for adapters whose metadata names ``variant``.

    Variants that diffusers' ``load_lora_weights`` reads natively (lora, dora, rslora) need no loader.
    """
    _LOADERS[variant] = loader


def _load_with_diffusers(pipe: Any, file: Path, name: str, summary: dict) -> None:
    with warnings.catch_warnings():
        # peft warns on every second adapter of a model; several resident adapters are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name,
                               use_safetensors=file.suffix.lower() not in PICKLE_SUFFIXES)


def _load_exactly(pipe: Any, file: Path, name: str, summary: dict) -> None:
    load_into_pipeline(pipe, file, name)


def load_adapter(pipe: Any, path: str | Path, name: str | None = None, *, allow_pickle: bool = False) -> str:
    """Load a lora-dreambooth adapter (or any diffusers-loadable LoRA) into ``pipe``; return its adapter name.

    ``path`` is an adapter folder (holding ``pytorch_lora_weights.safetensors``) or a file. The adapter becomes
    the pipeline's only active one, at strength 1 (``pipe.set_adapters`` changes that). Pickle files are refused
    unless ``allow_pickle``; broken files and LoRAs made for another architecture raise a one-line
    :class:`UserInputError`; a different base model or missing lora-dreambooth metadata only warn.
    """
    file = resolve_adapter_file(path, allow_pickle=allow_pickle)
    is_pickle = file.suffix.lower() in PICKLE_SUFFIXES
    summary = {} if is_pickle else _read_summary_or_fail(file)
    if not summary:
        log.warning("adapter '%s' has no lora-dreambooth metadata (made by another tool?): token, class and base "
                    "are unknown", file)
    _warn_on_base_mismatch(pipe, file, summary)
    name = name or unique_adapter_name(pipe, default_adapter_name(file))
    if name in _all_adapter_names(pipe):
        raise UserInputError(f"adapter name '{name}' is already loaded in this pipeline; pick another name")
    if not is_pickle:
        _check_fits_pipeline(pipe, file)
    loader = _LOADERS.get(str(summary.get("variant", "lora")), _load_with_diffusers)
    if not is_pickle and needs_exact_loader(file):  # DoRA text encoder, LoHa, LoKr: diffusers is inexact or refuses
        loader = _load_exactly
    try:
        loader(pipe, file, name, summary)
        _check_loaded_shapes(pipe, file, name)
    except Exception as exc:
        _discard_adapter(pipe, name)
        if isinstance(exc, UserInputError):
            raise
        raise UserInputError(f"adapter '{file}' cannot be loaded into this pipeline: {_one_line(exc)}") from None
    if name not in _all_adapter_names(pipe):
        raise UserInputError(f"adapter '{file}' holds no LoRA weights for this pipeline's UNet or text encoder")
    return name


def _read_summary_or_fail(file: Path) -> dict:
    try:
        return read_summary(file)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise UserInputError(f"adapter '{file}' is unreadable: {_one_line(exc)}") from None


def adapter_display_name(file: Path) -> str:
    """The folder name for ``.../NAME/pytorch_lora_weights.safetensors``, else the file's stem."""
    return file.parent.name if file.name == ADAPTER_FILENAME else file.stem


def default_adapter_name(file: Path) -> str:
    """A peft-safe adapter name from the folder (or file) name: letters, digits and underscores only."""
    stem = adapter_display_name(file)
    cleaned = re.sub(r"\W+", "_", stem).strip("_") or "adapter"
    # peft stores adapters as attributes of ModuleDicts: a name like "keys" or "0" would clash
    return f"ld_{cleaned}"


def unique_adapter_name(pipe: Any, wanted: str) -> str:
    """``wanted``, or ``wanted_2``, ``wanted_3``... if the pipeline already holds an adapter of that name."""
    taken = _all_adapter_names(pipe)
    name, n = wanted, 1
    while name in taken:
        n += 1
        name = f"{wanted}_{n}"
    return name


def _all_adapter_names(pipe: Any) -> set[str]:
    try:
        return {n for names in pipe.get_list_adapters().values() for n in names}
    except Exception:  # pipelines without peft state
        return set()


def _discard_adapter(pipe: Any, name: str) -> None:
    """Remove a half-loaded adapter (e.g. UNet loaded, text encoder failed)."""
    if name in _all_adapter_names(pipe):
        try:
            pipe.delete_adapters(name)
        except Exception as exc:  # pragma: no cover - best effort cleanup
            log.debug("could not remove half-loaded adapter %s: %s", name, exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _pipeline_base_name(pipe: Any) -> str:
    return str(getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", "") or "")


def same_base(trained_on: str, current: str) -> bool:
    """Whether two base-model references plausibly name the same model (paths resolved, hub ids by name)."""
    if not trained_on or not current:
        return True
    a, b = Path(trained_on).expanduser(), Path(current).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return trained_on.rstrip("/") == current.rstrip("/") or a.name == b.name


def _warn_on_base_mismatch(pipe: Any, file: Path, summary: dict) -> None:
    trained_on, current = str(summary.get("base_model") or ""), _pipeline_base_name(pipe)
    if not same_base(trained_on, current):
        log.warning("adapter '%s' was trained on base '%s' but the pipeline is '%s': the subject may look off",
                    file, trained_on, current)


# Where the module path ends in the keys of diffusers-layout LoRA files (old and peft styles).
_LORA_KEY = re.compile(r"^(?P<component>[a-z_0-9]+)\.(?P<module>.+?)\."
                       r"(?:lora\.(?P<old>down|up)|lora_linear_layer\.(?P<te>down|up)|(?P<peft>lora_A|lora_B)"
                       r"|lora_magnitude_vector)(?:\.weight|\.default_0\.weight|$)")


def _check_fits_pipeline(pipe: Any, file: Path) -> None:
    """Compare the file's diffusers-layout keys and shapes with the pipeline's layers (reads the header only).

    With diffusers 0.42.1 + peft 0.21.2, keys naming layers the model lacks load with only a peft warning (those
    layers are silently missing from the subject), and wrong shapes fail with a page of size-mismatch lines;
    this check names the first culprit in one line instead. Files in other layouts (kohya ``lora_unet_*``) are
    left to diffusers' converter and to the shape check after loading.
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        keys = list(fh.keys())
        if not keys or not all(k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") for k in keys):
            return
        for key in keys:
            match = _LORA_KEY.match(key)
            if not match:
                continue
            component = match["component"]
            model = getattr(pipe, component, None) if component in LORA_COMPONENTS else None
            if model is None:
                raise UserInputError(f"adapter '{file}' has weights for '{component}', which this pipeline lacks "
                                     f"(a LoRA for another architecture, e.g. SDXL?)")
            layer = _base_layer(model, match["module"])
            if layer is None:
                raise UserInputError(f"adapter '{file}' does not fit this pipeline: no layer '{match['module']}' in "
                                     f"its {component} (a LoRA for another architecture?)")
            direction = match["old"] or match["te"] or {"lora_A": "down", "lora_B": "up"}.get(match["peft"] or "")
            _check_shape(file, key, fh.get_slice(key).get_shape(), layer, direction)


def _base_layer(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    # diffusers' text-encoder keys drop transformers' `text_model.` prefix
    for candidate in (path, f"text_model.{path}"):
        try:
            layer = model.get_submodule(candidate)
        except AttributeError:
            continue
        return getattr(layer, "base_layer", layer)
    return None


def _check_shape(file: Path, key: str, shape: Sequence[int], layer: torch.nn.Module, direction: str | None) -> None:
    weight = getattr(layer, "weight", None)
    if weight is None or direction is None or len(shape) < 2:
        return
    if direction == "down" and shape[1] != weight.shape[1]:
        raise UserInputError(f"adapter '{file}' does not fit this pipeline: '{key}' takes {shape[1]} inputs, the "
                             f"layer has {weight.shape[1]} (a LoRA for another architecture or model size?)")
    if direction == "up" and shape[0] != weight.shape[0]:
        raise UserInputError(f"adapter '{file}' does not fit this pipeline: '{key}' gives {shape[0]} outputs, the "
                             f"layer has {weight.shape[0]} (a LoRA for another architecture or model size?)")


def _check_loaded_shapes(pipe: Any, file: Path, name: str) -> None:
    """After loading: every LoRA layer of ``name`` must match its base layer (catches converted formats too)."""
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_name, module in model.named_modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            base = getattr(module, "base_layer", None)
            if base is None or lora_a is None or name not in lora_a or getattr(base, "weight", None) is None:
                continue
            a, b = lora_a[name].weight, lora_b[name].weight
            if a.shape[1] != base.weight.shape[1] or b.shape[0] != base.weight.shape[0]:
                raise UserInputError(f"adapter '{file}' does not fit this pipeline: {component}.{module_name} has "
                                     f"shape {tuple(base.weight.shape[:2])}, the adapter expects "
                                     f"({b.shape[0]}, {a.shape[1]})")


# ---------------------------------------------------------------------------------------------------------------
# A folder of adapters
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterEntry:
    """One adapter of a library: where it is and what its metadata says (no weights loaded)."""

    name: str
    file: Path
    summary: dict[str, Any]
    preview: Path | None
    stamp: tuple[int, int]  # (mtime_ns, size): a change means the file was replaced

    @property
    def token(self) -> str | None:
        return self.summary.get("token")

    @property
    def class_noun(self) -> str | None:
        return self.summary.get("class_noun")

    @property
    def instance_prompt(self) -> str:
        """The subject's instance prompt (the app offers it as the prompt), or a generic one."""
        prompt = self.summary.get("instance_prompt")
        if prompt:
            return str(prompt)
        if self.token and self.class_noun:
            return f"a photo of {self.token} {self.class_noun}"
        return "a photo"

    @property
    def base_model(self) -> str | None:
        return self.summary.get("base_model")

    @property
    def variant(self) -> str:
        return str(self.summary.get("variant", "lora"))

    @property
    def label(self) -> str:
        """Dropdown label: token and class, then the library name (``sks dog · my-dog``)."""
        subjects = [s for s in self.summary.get("subjects") or [] if isinstance(s, dict)]
        if subjects:
            what = " + ".join(f"{s.get('token', '?')} {s.get('class_noun', '?')}" for s in subjects)
        elif self.token:
            what = f"{self.token} {self.class_noun or ''}".strip()
        else:
            return f"{self.name} (no metadata)"
        return f"{what} · {self.name}"


@dataclass
class LibraryChanges:
    """What a :meth:`AdapterLibrary.refresh` found."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


class AdapterLibrary:
    """The adapters in one folder: each sub-folder holding ``pytorch_lora_weights.safetensors``, and loose
    ``.safetensors`` files. Names are the sub-folder names (or file stems); they are keys, never paths.

    Metadata is read from the safetensors header only. Broken files are skipped with a warning and listed in
    :attr:`problems`. Pickle files are never picked up.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise UserInputError(f"adapter library '{self.folder}' is not a folder")
        self._entries: dict[str, AdapterEntry] = {}
        self.problems: dict[str, str] = {}
        self.refresh()

    def refresh(self) -> LibraryChanges:
        """Rescan the folder; re-read metadata of new or replaced files only."""
        found: dict[str, tuple[Path, tuple[int, int]]] = {}
        for name, file in self._candidates():
            try:
                stat = file.stat()
            except OSError:
                continue
            found[name] = (file, (stat.st_mtime_ns, stat.st_size))
        changes = LibraryChanges(removed=sorted(set(self._entries) - set(found)))
        for name in changes.removed:
            del self._entries[name]
        problems: dict[str, str] = {}
        for name, (file, stamp) in sorted(found.items()):
            old = self._entries.get(name)
            if old is not None and old.stamp == stamp and old.file == file:
                continue
            if name in self.problems and self.problems[name].startswith(f"{stamp}"):
                problems[name] = self.problems[name]  # same broken file: do not warn again
                continue
            try:
                entry = self._read_entry(name, file, stamp)
            except UserInputError as exc:
                log.warning("skipping adapter '%s': %s", name, exc)
                problems[name] = f"{stamp} {exc}"
                self._entries.pop(name, None)
                continue
            (changes.changed if old is not None else changes.added).append(name)
            self._entries[name] = entry
        self.problems = problems
        return changes

    def _candidates(self) -> Iterator[tuple[str, Path]]:
        """(name, file) pairs; a loose file whose stem clashes with a sub-folder keeps its suffix in the name."""
        children = sorted(p for p in self.folder.iterdir() if not p.name.startswith("."))
        folders = {p.name for p in children if p.is_dir() and (p / ADAPTER_FILENAME).is_file()}
        for child in children:
            if child.name == BASE_ONLY:
                continue
            if child.name in folders:
                yield child.name, child / ADAPTER_FILENAME
            elif child.is_file() and child.suffix.lower() == ".safetensors":
                yield (child.name if child.stem in folders else child.stem), child
            elif child.is_file() and child.suffix.lower() in PICKLE_SUFFIXES:
                log.debug("library: ignoring pickle file '%s'", child)

    def _read_entry(self, name: str, file: Path, stamp: tuple[int, int]) -> AdapterEntry:
        resolve_adapter_file(file)  # validates the header and size without reading tensors
        summary = _read_summary_or_fail(file)
        return AdapterEntry(name=name, file=file, summary=summary, preview=self._preview_for(file), stamp=stamp)

    @staticmethod
    def _preview_for(file: Path) -> Path | None:
        if file.name == ADAPTER_FILENAME:
            candidates = [file.parent / n for n in PREVIEW_NAMES]
        else:
            candidates = [file.with_suffix(".png"), file.with_suffix(".jpg"), file.parent / f"{file.stem}.preview.png"]
        return next((c for c in candidates if c.is_file()), None)

    # -- lookup -----------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return [self._entries[n] for n in self.names]

    def get(self, name: str) -> AdapterEntry:
        """The entry called ``name``; a path, a traversal attempt or an unknown name is a one-line error."""
        check_subject_name(name)
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names) or "none"
            raise UserInputError(f"unknown subject '{name}' (library '{self.folder}' has: {known})") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[AdapterEntry]:
        return iter(self.entries())


def check_subject_name(name: Any) -> str:
    """Subjects are chosen by library name only: refuse paths, traversal and control characters."""
    if not isinstance(name, str) or not name.strip():
        raise UserInputError("choose a subject")
    if len(name) > 200 or any(c in name for c in "/\\\0") or name.startswith(("~", ".")) or ".." in name \
            or re.match(r"^[A-Za-z]:", name) or any(ord(c) < 32 for c in name):
        raise UserInputError(f"subject {name[:80]!r} is not a library name (paths are not accepted)")
    return name


# ---------------------------------------------------------------------------------------------------------------
# Generation requests and results
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationLimits:
    """What a request may ask for (the app and the CLI refuse anything else with a readable message)."""

    max_steps: int = 150
    max_images: int = 8
    min_side: int = 8
    max_side: int = 2048
    max_guidance: float = 30.0
    max_weight: float = 2.0
    max_prompt_chars: int = 2000
    max_adapters: int = 4


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompt, settings, and the adapters to apply as ``(name, weight)`` (empty: base model)."""

    prompt: str
    negative_prompt: str = ""
    adapters: tuple[tuple[str, float], ...] = ()
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    num_images: int = 1
    height: int | None = None  # None: the model's native size
    width: int | None = None

    def validated(self, limits: GenerationLimits = GenerationLimits()) -> "GenerationRequest":
        """This request with types normalised; raises :class:`UserInputError` naming the bad setting."""
        prompt = str(self.prompt or "").strip()
        _require(bool(prompt), "the prompt is empty")
        _require(len(prompt) <= limits.max_prompt_chars,
                 f"the prompt is longer than {limits.max_prompt_chars} characters")
        _require(len(str(self.negative_prompt or "")) <= limits.max_prompt_chars,
                 f"the negative prompt is longer than {limits.max_prompt_chars} characters")
        steps, num_images, seed = _as_int(self.steps, "steps"), _as_int(self.num_images, "number of images"), \
            _as_int(self.seed, "seed")
        _require(1 <= steps <= limits.max_steps, f"steps must be between 1 and {limits.max_steps} (got {steps})")
        _require(1 <= num_images <= limits.max_images,
                 f"number of images must be between 1 and {limits.max_images} (got {num_images})")
        _require(0 <= seed < 2**63, f"seed must be between 0 and 2^63-1 (got {seed})")
        guidance = _as_float(self.guidance, "guidance")
        _require(0 <= guidance <= limits.max_guidance, f"guidance must be between 0 and {limits.max_guidance}")
        sides = []
        for label, value in (("height", self.height), ("width", self.width)):
            side = None if value in (None, "", 0) else _as_int(value, label)
            _require(side is None or (limits.min_side <= side <= limits.max_side and side % 8 == 0),
                     f"{label} must be a multiple of 8 between {limits.min_side} and {limits.max_side} (got {side})")
            sides.append(side)
        adapters = tuple(self.adapters)
        _require(len(adapters) <= limits.max_adapters, f"at most {limits.max_adapters} subjects can be mixed")
        cleaned = []
        for name, weight in adapters:
            weight = _as_float(weight, f"strength of '{name}'")
            _require(abs(weight) <= limits.max_weight,
                     f"strength of '{name}' must be between -{limits.max_weight} and {limits.max_weight}")
            cleaned.append((check_subject_name(name), weight))
        _require(len({n for n, _ in cleaned}) == len(cleaned), "the same subject is chosen twice")
        return replace(self, prompt=prompt, negative_prompt=str(self.negative_prompt or "").strip(),
                       adapters=tuple(cleaned), steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                       height=sides[0], width=sides[1])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


def _as_int(value: Any, label: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{label} must be a whole number (got {value!r})") from None
    if number != number or number in (float("inf"), float("-inf")) or number != int(number):
        raise UserInputError(f"{label} must be a whole number (got {value!r})")
    return int(number)


def _as_float(value: Any, label: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{label} must be a number (got {value!r})") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UserInputError(f"{label} must be a finite number (got {value!r})")
    return number


@dataclass
class GenerationResult:
    """Images of one request (seeds ``seed``, ``seed+1``, ...) and what made them."""

    images: list[Image.Image]
    request: GenerationRequest
    base: str
    seconds: float

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + i for i in range(len(self.images))]

    def settings(self, index: int = 0) -> dict[str, Any]:
        """Everything needed to reproduce image ``index`` (stored in its PNG text)."""
        from . import __version__

        req = self.request
        return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
                "guidance": req.guidance, "seed": self.seeds[index], "height": self.images[index].height,
                "width": self.images[index].width, "adapters": [{"name": n, "weight": w} for n, w in req.adapters],
                "base": self.base, "generator": f"lora-dreambooth {__version__}"}


def png_info(settings: dict[str, Any]) -> PngInfo:
    """PNG text chunks: ``prompt``, ``negative_prompt``, a JSON ``lora_dreambooth`` block and an A1111-style
    ``parameters`` line (which many image tools display)."""
    info = PngInfo()
    info.add_text("prompt", settings["prompt"])
    info.add_text("negative_prompt", settings["negative_prompt"])
    info.add_text("lora_dreambooth", json.dumps(settings, sort_keys=True))
    loras = "".join(f" <lora:{a['name']}:{a['weight']:g}>" for a in settings["adapters"])
    info.add_text("parameters", f"{settings['prompt']}{loras}\nNegative prompt: {settings['negative_prompt']}\n"
                                f"Steps: {settings['steps']}, CFG scale: {settings['guidance']:g}, "
                                f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
                                f"Model: {settings['base']}")
    return info


def save_generation(result: GenerationResult, out_dir: str | Path, *, grid: bool = True) -> list[Path]:
    """Write ``image-NN-seedS.png`` files with their settings as PNG text, and ``grid.png``; atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        settings = result.settings(i)
        path = out / f"image-{i:02d}-seed{settings['seed']}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=png_info(settings))
        paths.append(path)
    if grid:
        with atomic_path(out / "grid.png") as tmp:
            image_grid(result.images).save(tmp, format="PNG", pnginfo=png_info(result.settings(0)))
        paths.append(out / "grid.png")
    return paths


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
        from .models import load_base

        device = device or default_device()
        torch_dtype = _DTYPES[dtype] if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
        model = load_base(base, allow_pickle=allow_pickle)
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
                    from .fast import bypass_merged_adapters

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

