"""Adapter files: writing diffusers-layout `.safetensors` with metadata, reading them back, inspecting.

The file is exactly what diffusers' `save_lora_weights` writes (keys `unet.*` / `text_encoder.*`, a
`lora_adapter_metadata` JSON so loaders use the right alpha), plus our own `lora_dreambooth` JSON in the same
header: token, class noun, prompts, base, variant, rank, alpha, steps, resolution, version and the full config.
Every file appears atomically (temp file in the same folder + rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UserInputError

ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_dreambooth"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`, on failure removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; finished files get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def adapter_state_dicts(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> tuple[dict, dict | None]:
    """Diffusers-layout state dicts of the trained adapters (peft extracts, the variant converts).

    Each holds one key style (see `AdapterVariant.to_file_layout`), so `pipe.load_lora_weights` of
    ``{"unet.<key>": ..., "text_encoder.<key>": ...}`` loads every adapted layer.
    """
    from .adapters.payload import payload_from_models

    payload = payload_from_models(unet, text_encoder, summary={})
    layouts = {c: payload.variant.to_file_layout(s.state_dict, c) for c, s in payload.components.items()}
    return layouts["unet"], layouts.get("text_encoder")


def save_adapter(out_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *,
                 summary: dict[str, Any], save_dtype: str = "fp16", filename: str = ADAPTER_FILENAME) -> Path:
    """Write `out_dir/filename` through diffusers' `save_lora_weights`, with both metadata blocks, atomically.

    The adapter's variant strategy decides the tensors (PiSSA/OLoRA become a plain delta on the untouched base,
    LoHa/LoKr keep peft's names) and how its config is recorded in `lora_adapter_metadata`.
    """
    from .adapters.payload import payload_from_models, write_diffusers_file

    payload = payload_from_models(unet, text_encoder, summary=summary)
    return write_diffusers_file(Path(out_dir) / filename, payload, save_dtype=save_dtype)


def resolve_adapter_file(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """The adapter file for `path` (a file, or a folder holding pytorch_lora_weights.safetensors); clear errors."""
    p = Path(path).expanduser()
    if p.is_dir():
        candidate = p / ADAPTER_FILENAME
        if not candidate.is_file():
            raise UserInputError(f"adapter folder '{p}' has no {ADAPTER_FILENAME}")
        p = candidate
    if not p.exists():
        raise UserInputError(f"adapter '{p}' does not exist")
    if p.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UserInputError(f"adapter '{p}' is a pickle file, which can run code when loaded; "
                             f"convert it to .safetensors or pass --allow-pickle if you trust it")
    if p.suffix.lower() not in PICKLE_SUFFIXES:
        _check_safetensors(p)
    return p


def _check_safetensors(p: Path) -> None:
    """Validate the safetensors header and size without reading tensors."""
    size = p.stat().st_size
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            header_len = int.from_bytes(head, "little")
            if header_len <= 0 or header_len > min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(fh.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"truncated: {size} bytes, header promises {8 + header_len + end}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"adapter '{p}' is not a valid .safetensors file ({exc})") from None


def read_file_metadata(path: str | Path) -> dict[str, str]:
    """The raw `__metadata__` of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def read_summary(path: str | Path) -> dict[str, Any]:
    """Our `lora_dreambooth` metadata block ({} for files written by other tools)."""
    raw = read_file_metadata(path).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def inspect_adapter(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Metadata and tensor statistics of an adapter file (what `lora-dreambooth inspect` prints)."""
    from safetensors import safe_open

    file = resolve_adapter_file(path, allow_pickle=allow_pickle)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise UserInputError(f"adapter '{file}': inspect reads .safetensors files only")
    metadata = read_file_metadata(file)
    stats: dict[str, Any] = {"keys": 0, "params": 0, "bytes": 0, "dtypes": {}, "components": {}}
    with safe_open(str(file), framework="pt") as fh:
        for key in fh.keys():
            sl = fh.get_slice(key)
            shape = sl.get_shape()
            numel = 1
            for d in shape:
                numel *= d
            dtype = sl.get_dtype()
            stats["keys"] += 1
            stats["params"] += numel
            stats["bytes"] += numel * _DTYPE_BYTES.get(dtype, 4)
            stats["dtypes"][dtype] = stats["dtypes"].get(dtype, 0) + 1
            component = key.split(".", 1)[0]
            if component.startswith(("lora_unet_", "lora_te_")):  # kohya layout: one prefix per module
                component = "lora_unet" if component.startswith("lora_unet_") else "lora_te"
            stats["components"][component] = stats["components"].get(component, 0) + 1
    diffusers_meta = metadata.get(DIFFUSERS_METADATA_KEY)
    return {
        "file": str(file),
        "file_bytes": file.stat().st_size,
        "summary": read_summary(file),
        "has_diffusers_metadata": bool(diffusers_meta),
        "tensors": stats,
        **_consumer_info(file),
    }


def _consumer_info(file: Path) -> dict[str, Any]:
    """Layout, variant and which consumers load the file natively (see `AdapterVariant.native_consumers`)."""
    from .adapters.loading import read_payload_for

    try:
        payload = read_payload_for(file)
    except UserInputError as exc:
        return {"layout": "unknown", "variant": None, "native_consumers": {}, "unreadable": str(exc)}
    return {"layout": payload.layout, "variant": payload.variant.name,
            "native_consumers": payload.native_consumers()}


_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1}
