"""Adapter files: writing diffusers-layout `.safetensors` with metadata, reading them back, inspecting.

The file is exactly what diffusers' `save_lora_weights` writes (keys `unet.*` / `text_encoder.*`, a
`lora_adapter_metadata` JSON so loaders use the right alpha), plus our own `lora_dreambooth` JSON in the same
header: token, class noun, prompts, base, variant, rank, alpha, steps, resolution, version and the full config.
Every file appears atomically (temp file in the same folder + rename).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import (ADAPTER_FILENAME, DIFFUSERS_METADATA_KEY, PICKLE_SUFFIXES,
                                            read_file_metadata, read_summary, resolve_adapter_file)


def adapter_state_dicts(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> tuple[dict, dict | None]:
    """Diffusers-layout state dicts of the trained adapters (peft extracts, the variant converts).

    Each holds one key style (see `AdapterVariant.to_file_layout`), so `pipe.load_lora_weights` of
    ``{"unet.<key>": ..., "text_encoder.<key>": ...}`` loads every adapted layer.
    """
    from lora_dreambooth.files.payload import payload_from_models

    payload = payload_from_models(unet, text_encoder, summary={})
    layouts = {c: payload.variant.to_file_layout(s.state_dict, c) for c, s in payload.components.items()}
    return layouts["unet"], layouts.get("text_encoder")


def save_adapter(out_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, *,
                 summary: dict[str, Any], save_dtype: str = "fp16", filename: str = ADAPTER_FILENAME) -> Path:
    """Write `out_dir/filename` through diffusers' `save_lora_weights`, with both metadata blocks, atomically.

    The adapter's variant strategy decides the tensors (PiSSA/OLoRA become a plain delta on the untouched base,
    LoHa/LoKr keep peft's names) and how its config is recorded in `lora_adapter_metadata`.
    """
    from lora_dreambooth.files.payload import payload_from_models, write_diffusers_file

    payload = payload_from_models(unet, text_encoder, summary=summary)
    return write_diffusers_file(Path(out_dir) / filename, payload, save_dtype=save_dtype)










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
    from lora_dreambooth.files.loading import read_payload_for

    try:
        payload = read_payload_for(file)
    except UserInputError as exc:
        return {"layout": "unknown", "variant": None, "native_consumers": {}, "unreadable": str(exc)}
    return {"layout": payload.layout, "variant": payload.variant.name,
            "native_consumers": payload.native_consumers()}


_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1}
