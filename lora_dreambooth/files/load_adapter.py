"""load_adapter: diffusers' loading plus checks (pickle refusal, broken files, LoRAs of another architecture, base mismatch, missing metadata) and a dispatch by variant."""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.embeddings import bundled_embeddings, load_embedding_into
from lora_dreambooth.files.loading import load_into_pipeline, needs_exact_loader
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, PICKLE_SUFFIXES, read_summary, resolve_adapter_file

log = logging.getLogger(__name__)
LORA_COMPONENTS = ("unet", "text_encoder")


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
    bundled = not is_pickle and bool(bundled_embeddings(file))
    if not is_pickle and (needs_exact_loader(file) or bundled):  # DoRA text encoder, LoHa, LoKr, bundled embeddings:
        loader = _load_exactly  # diffusers is inexact or refuses
    try:
        if not is_pickle:
            load_embedding_into(pipe, file, summary)  # --pivotal: the identifier's trained embedding
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


