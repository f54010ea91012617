"""CLIP and DINO embedders and their loading from local folders or the hub, with one-line errors offline."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.errors import first_line as _first_line
from lora_dreambooth.evaluation.metrics import l2_normalize

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
_DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")


# -------------------------------------------------------------------------------------------- embedders
def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_*_features``; 4.x returns the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + max(1, size)]


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


class ClipEmbedder:
    """CLIP image and text embeddings (unit length, float32 on CPU) from a transformers ``CLIPModel``."""

    def __init__(self, model: Any, processor: Any, name: str = "clip"):
        self.model = model.eval()
        self.processor = processor
        self.name = name

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """One row per image."""
        device, dtype = _model_device_dtype(self.model)
        rows = []
        for batch in _batches(list(images), batch_size):
            pixels = self.processor.image_processor(images=list(batch), return_tensors="pt")["pixel_values"]
            rows.append(_pooled(self.model.get_image_features(pixel_values=pixels.to(device, dtype))).float().cpu())
        return l2_normalize(torch.cat(rows))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """One row per text; texts longer than the model's context are truncated."""
        device, _ = _model_device_dtype(self.model)
        tokenizer = self.processor.tokenizer
        max_length = min(tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        rows = []
        for batch in _batches(list(texts), batch_size):
            tokens = tokenizer(list(batch), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            rows.append(_pooled(self.model.get_text_features(**tokens)).float().cpu())
        return l2_normalize(torch.cat(rows))


class DinoEmbedder:
    """[CLS] embeddings of a ViT / DINOv2 backbone (the final layer-normed token, as in DINO's own eval)."""

    def __init__(self, model: Any, image_processor: Any, name: str = "dino"):
        self.model = model.eval()
        self.image_processor = image_processor
        self.name = name

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """One row per image."""
        device, dtype = _model_device_dtype(self.model)
        rows = []
        for batch in _batches(list(images), batch_size):
            pixels = self.image_processor(images=list(batch), return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels.to(device, dtype)).last_hidden_state
            rows.append(hidden[:, 0].float().cpu())
        return l2_normalize(torch.cat(rows))


@dataclass
class MetricModels:
    """The two scoring models; either may be None to skip its metrics."""

    clip: ClipEmbedder | None
    dino: DinoEmbedder | None


# ---------------------------------------------------------------------------------------- model loading
_Loaded = TypeVar("_Loaded")


def _hub_offline() -> bool:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(getattr(constants, "ENDPOINT", "https://huggingface.co"))


def hub_reachable(timeout: float = 5.0) -> bool:
    """True when the model hub answers at all (any HTTP status); False on connection errors/timeouts.

    Asked before an online load so that a machine without network fails in seconds instead of sitting
    through huggingface_hub's retries (~25 s per file).
    """
    try:
        urllib.request.urlopen(urllib.request.Request(_hub_endpoint(), method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists()


def load_pretrained(label: str, name: str, load: Callable[..., _Loaded]) -> _Loaded:
    """Call ``load(source, local_files_only=...)`` for a local folder or hub id, failing in one clear line.

    Order: a local folder; the Hugging Face cache; the hub, only when not offline (HF_HUB_OFFLINE) and it
    answers. Every failure becomes ``UserInputError("cannot load <label> model '<name>': <why>")``.
    """
    prefix = f"cannot load {label} model '{name}'"
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return load(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{prefix}: {_first_line(exc)}") from None
    if _looks_like_path(name):
        why = "it is a file, not a model folder" if folder.exists() else "no such folder"
        raise UserInputError(f"{prefix}: {why}")
    try:
        return load(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    if _hub_offline():
        raise UserInputError(f"{prefix}: not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    if not hub_reachable():
        raise UserInputError(
            f"{prefix}: not a local folder and the model hub is unreachable ({_hub_endpoint()}); "
            "pass a local model folder"
        )
    try:
        return load(name, local_files_only=False)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{prefix}: {_first_line(exc)}") from None


def _load_clip(name: str, device: str | torch.device) -> ClipEmbedder:
    from transformers import AutoConfig, CLIPModel, CLIPProcessor

    def load(source: str, local_files_only: bool) -> ClipEmbedder:
        model_type = AutoConfig.from_pretrained(source, local_files_only=local_files_only).model_type
        if model_type != "clip":
            raise UserInputError(
                f"cannot load CLIP model '{name}': its config is model type '{model_type}', not 'clip'"
            )
        model = CLIPModel.from_pretrained(source, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local_files_only)
        return ClipEmbedder(model.to(device), processor, name)

    return load_pretrained("CLIP", name, load)


def _load_dino(name: str, device: str | torch.device) -> DinoEmbedder:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, ViTModel

    def load(source: str, local_files_only: bool) -> DinoEmbedder:
        model_type = AutoConfig.from_pretrained(source, local_files_only=local_files_only).model_type
        if model_type not in _DINO_MODEL_TYPES:
            raise UserInputError(
                f"cannot load DINO model '{name}': its config is model type '{model_type}', "
                f"expected one of {', '.join(_DINO_MODEL_TYPES)}"
            )
        if model_type == "vit":  # DINO checkpoints carry no pooler: do not build a random one
            model = ViTModel.from_pretrained(source, add_pooling_layer=False, local_files_only=local_files_only)
        else:
            model = AutoModel.from_pretrained(source, local_files_only=local_files_only)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
        return DinoEmbedder(model.to(device), processor, name)

    return load_pretrained("DINO", name, load)


def load_metric_models(
    clip: str | None = DEFAULT_CLIP_MODEL,
    dino: str | None = DEFAULT_DINO_MODEL,
    *,
    device: str | torch.device = "cpu",
) -> MetricModels:
    """Load the CLIP and DINO scoring models from local folders or hub ids (None skips one).

    Raises :class:`UserInputError` with one line naming the model when it cannot be loaded.
    """
    return MetricModels(
        clip=_load_clip(clip, device) if clip else None,
        dino=_load_dino(dino, device) if dino else None,
    )


