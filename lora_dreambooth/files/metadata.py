"""Adapter file names, metadata keys and header reading: what every reader and writer of adapter files shares.

Our own `lora_dreambooth` JSON sits in the safetensors header beside diffusers' `lora_adapter_metadata`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError

ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"


METADATA_KEY = "lora_dreambooth"


DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


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


def adapter_summary(cfg: Any, *, steps: int, num_instance_images: int, subjects: list[dict[str, Any]],
                    version: str, base: dict[str, str] | None = None) -> dict[str, Any]:
    """Our metadata block (`lora_dreambooth` in the header): what a user (or the app) needs to know about an adapter
    trained with `cfg` (a TrainConfig), including the full config. `base` names the base model (`base_model`, and
    for a single-file checkpoint `base_file` and `base_sha256`); by default just `cfg.base`."""
    return {
        "token": cfg.token, "class_noun": cfg.class_noun, "instance_prompt": cfg.effective_instance_prompt,
        "class_prompt": cfg.effective_class_prompt, **(base or {"base_model": cfg.base}), "variant": cfg.variant,
        "rank": cfg.rank, "alpha": cfg.alpha, "steps": steps, "resolution": cfg.resolution,
        "train_text_encoder": cfg.train_text_encoder, "num_instance_images": num_instance_images,
        "subjects": subjects, "package": "lora-dreambooth", "version": version, "config": cfg.to_dict(),
    }
