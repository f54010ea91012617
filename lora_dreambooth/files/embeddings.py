"""The pivotal-tuning embedding file: ``embeddings.safetensors`` beside the adapter, in A1111's textual-inversion
layout (one tensor ``emb_params`` of shape ``[1, dim]``), which diffusers' ``load_textual_inversion`` reads too:

    pipe.load_textual_inversion("OUT/embeddings.safetensors", token="sks")
    pipe.load_lora_weights("OUT")

Kohya-layout exports bundle it as ``bundle_emb.<token>.emb_params`` (as kohya's own tools and A1111 do).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.atomic import atomic_path

log = logging.getLogger(__name__)

EMBEDDINGS_FILENAME = "embeddings.safetensors"
A1111_KEY = "emb_params"
BUNDLE_PREFIX = "bundle_emb"
METADATA_KEY = "lora_dreambooth_embedding"


def write_embedding(path: str | Path, token: str, vector: torch.Tensor, *, init_token: str) -> Path:
    """Write one token's trained embedding (fp32) atomically, with the token recorded in the header."""
    from safetensors.torch import save_file

    out = Path(path)
    tensor = vector.detach().float().cpu().reshape(1, -1).contiguous()
    metadata = {METADATA_KEY: json.dumps({"token": token, "init_token": init_token, "vectors": 1})}
    with atomic_path(out) as tmp:
        save_file({A1111_KEY: tensor}, str(tmp), metadata=metadata)
    return out


def read_embedding(path: str | Path) -> tuple[str | None, torch.Tensor]:
    """(token recorded in the header or None, tensor [n, dim]) of an embedding file we wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            info = json.loads((fh.metadata() or {}).get(METADATA_KEY, "{}"))
            return info.get("token"), fh.get_tensor(A1111_KEY)
    except Exception as exc:
        raise UserInputError(f"embedding file '{path}' is unreadable: {type(exc).__name__}: {exc}") from None


def embedding_beside(adapter_file: Path) -> Path | None:
    """``embeddings.safetensors`` in the adapter's folder, if it is there."""
    candidate = adapter_file.parent / EMBEDDINGS_FILENAME
    return candidate if candidate.is_file() else None


def bundled_embeddings(adapter_file: Path) -> dict[str, torch.Tensor]:
    """{token: tensor [n, dim]} of the ``bundle_emb.<token>.emb_params`` tensors in a kohya-layout file."""
    from safetensors import safe_open

    found = {}
    with safe_open(str(adapter_file), framework="pt") as fh:
        for key in fh.keys():
            parts = key.split(".")
            if parts[0] == BUNDLE_PREFIX and len(parts) == 3 and parts[2] == A1111_KEY:
                found[parts[1]] = fh.get_tensor(key)
    return found


def load_embedding_into(pipe: Any, adapter_file: Path, summary: dict) -> str | None:
    """Load an adapter's pivotal embedding into ``pipe`` with diffusers' ``load_textual_inversion``: the one bundled
    in a kohya-layout file, else ``embeddings.safetensors`` beside the adapter. Returns its token (None: the adapter
    has none). A token already loaded (by an earlier adapter using the same token) is replaced."""
    pivotal = summary.get("pivotal") or {}
    bundled = bundled_embeddings(adapter_file)
    if bundled:
        token, tensor = next(iter(bundled.items()))
        source: Any = {A1111_KEY: tensor}
    else:
        file = embedding_beside(adapter_file)
        if file is None:
            if pivotal:
                log.warning("adapter '%s' was trained with --pivotal but '%s' is missing beside it: its token '%s' "
                            "keeps the base's meaning", adapter_file, adapter_file.parent / EMBEDDINGS_FILENAME,
                            pivotal.get("token"))
            return None
        recorded, _ = read_embedding(file)
        token, source = pivotal.get("token") or recorded or summary.get("token"), str(file)
        if not token:
            raise UserInputError(f"embedding file '{file}' names no token")
    if token in getattr(pipe.tokenizer, "added_tokens_encoder", {}):  # an earlier (or replaced) adapter's embedding
        log.warning("token '%s' already has a loaded embedding; replacing it with '%s''s (one embedding per token)",
                    token, adapter_file)
        pipe.unload_textual_inversion(token)
    pipe.load_textual_inversion(source, token=token)
    return token


def bundle_tensors(adapter_file: Path, summary: dict) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.<token>.emb_params`` tensors a kohya-layout export carries (empty without an embedding)."""
    file = embedding_beside(adapter_file)
    if file is None:
        return {}
    recorded, tensor = read_embedding(file)
    token = (summary.get("pivotal") or {}).get("token") or recorded or summary.get("token")
    return {f"{BUNDLE_PREFIX}.{token}.{A1111_KEY}": tensor.float()}


def pivotal_summary(cfg: Any) -> dict[str, Any]:
    """The ``pivotal`` block of our metadata (empty without --pivotal): which token the embedding file names."""
    if not getattr(cfg, "pivotal", False):
        return {}
    return {"pivotal": {"token": cfg.token, "init_token": cfg.effective_init_token, "file": EMBEDDINGS_FILENAME,
                        "layout": "a1111-textual-inversion"}}
