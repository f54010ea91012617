"""Converting whole adapter folders and files between layouts: kohya/LyCORIS export and import, and finishing
an adapter folder after training (model card, requested exports)."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.atomic import atomic_path
from lora_dreambooth.files.embeddings import bundle_tensors
from lora_dreambooth.files.kohya import _DTYPE_NAMES, kohya_metadata, payload_to_kohya
from lora_dreambooth.files.loading import read_payload
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, SAVE_DTYPES
from lora_dreambooth.files.model_card import kohya_filename, write_model_card
from lora_dreambooth.files.payload import AdapterPayload, write_diffusers_file

log = logging.getLogger(__name__)


def export_kohya(adapter: str | Path, out_file: str | Path, *, save_dtype: str | None = None) -> Path:
    """Write `adapter` (a folder or file of ours) as a kohya/A1111/ComfyUI `.safetensors`, atomically.

    Tensors keep the adapter file's precision unless `save_dtype` (fp16|bf16|fp32) says otherwise; `alpha`
    scalars are always fp32 (an fp16 alpha would shift rsLoRA's alpha * sqrt(r) scale).
    """
    from safetensors.torch import save_file

    from lora_dreambooth.files.metadata import resolve_adapter_file

    source = resolve_adapter_file(adapter)
    out = Path(out_file)
    if out.suffix.lower() != ".safetensors":
        raise UserInputError(f"--out '{out}' must end in .safetensors")
    if out.resolve() == source.resolve():
        raise UserInputError(f"--out '{out}' is the adapter file itself; choose another name")
    payload = _read_or_fail(source)
    tensors = payload_to_kohya(payload)
    dtype = SAVE_DTYPES[save_dtype or _common_dtype(payload)]
    tensors = {k: (v.float() if k.endswith(".alpha") else v.to(dtype)).detach().cpu().contiguous()
               for k, v in tensors.items()}
    tensors.update(bundle_tensors(source, payload.summary))  # --pivotal: the embedding travels inside, as kohya does
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=kohya_metadata(payload, tensors))
    return out


def import_adapter(file: str | Path, out_dir: str | Path, *, save_dtype: str | None = None,
                   overwrite: bool = False) -> Path:
    """Convert any adapter file we can read (kohya/LyCORIS included) into our layout in `out_dir`, with a card."""
    from lora_dreambooth.files.metadata import resolve_adapter_file
    from lora_dreambooth.files.model_card import write_model_card

    source = resolve_adapter_file(file)
    target = Path(out_dir) / ADAPTER_FILENAME
    if target.exists() and not overwrite:
        raise UserInputError(f"'{target}' already exists; pass --overwrite to replace it")
    payload = _read_or_fail(source)
    payload.summary = {**payload.summary, "imported_from": str(source),
                       "variant": payload.summary.get("variant", payload.variant.name)}
    written = write_diffusers_file(target, payload, save_dtype=save_dtype or _common_dtype(payload))
    write_model_card(Path(out_dir), payload.summary, variant=payload.variant)
    return written


def _read_or_fail(file: Path) -> AdapterPayload:
    try:
        return read_payload(file)
    except UserInputError:
        raise
    except Exception as exc:  # safetensors / peft raise their own error types
        raise UserInputError(f"adapter '{file}' cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from None


def _common_dtype(payload: AdapterPayload) -> str:
    counts = Counter(t.dtype for s in payload.components.values() for t in s.state_dict.values())
    return _DTYPE_NAMES.get(counts.most_common(1)[0][0], "fp32") if counts else "fp32"


def finish_adapter_folder(adapter_file: str | Path, summary: dict[str, Any], *,
                          export: tuple[str, ...] = ()) -> dict[str, Path]:
    """After the adapter is saved: the requested exports (`kohya`) beside it, then the model card listing them."""
    from lora_dreambooth.files.export import export_kohya

    adapter_file = Path(adapter_file)
    written: dict[str, Path] = {}
    if "kohya" in export:
        written["kohya"] = export_kohya(adapter_file, adapter_file.parent / kohya_filename(summary))
    written["card"] = write_model_card(adapter_file.parent, summary,
                                       kohya_file=written["kohya"].name if "kohya" in written else None)
    return written
