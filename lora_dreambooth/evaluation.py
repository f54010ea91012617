"""DreamBench-style evaluation: generate the benchmark prompts, score DINO / CLIP-I / CLIP-T, write a report.

The metrics follow Ruiz et al., "DreamBooth", CVPR 2023 (Sec. 4.1, Table 1):

- DINO: mean cosine similarity between the ViT-S/16 DINO [CLS] embeddings of every (generated, real) pair;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity between each generated image and the CLIP embedding of its prompt.

The paper does not spell out the CLIP-T text; like the common reproductions we drop the rare token, so
"a sks dog in the jungle" is scored against "a dog in the jungle" (the token means nothing to CLIP).
The paper's "real images" row is reproduced by ``real_baseline``: the same similarities between distinct
real photos (i != j; a photo against itself would add a trivial 1.0).

Everything here is independent of how adapters are loaded: :func:`evaluate` takes a diffusers
``StableDiffusionPipeline`` that already holds the adapter and, for ``compare_base``, switches it off with
``pipe.disable_lora()`` / ``pipe.enable_lora()``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, Union

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
KINDS = ("object", "live")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAME = "images.json"
METRICS = ("dino", "clip_i", "clip_t")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
PAPER_REFERENCE = {
    "source": "Ruiz et al., DreamBooth, CVPR 2023, Table 1 (30 subjects x 25 prompts x 4 images)",
    "dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "real_images": {"dino": 0.774, "clip_i": 0.885},
}
_DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")


# ----------------------------------------------------------------------------------------------- prompts
class EvalPrompt(NamedTuple):
    """One evaluation prompt: what the pipeline is asked to draw and what CLIP-T compares the image with."""

    prompt: str
    clip_text: str


def _collapse_spaces(text: str) -> str:
    return " ".join(text.split())


def load_prompt_templates(kind: str) -> list[str]:
    """The 25 bundled DreamBench templates for ``kind`` ('object' or 'live'), with ``{unique_token}`` and
    ``{class_token}`` placeholders."""
    if kind not in KINDS:
        raise UserInputError(f"unknown subject kind '{kind}': use one of {', '.join(KINDS)}")
    data = json.loads(resources.files("lora_dreambooth").joinpath("data/dreambench/prompts.json").read_text("utf-8"))
    return list(data[kind])


def fill_template(template: str, token: str, class_noun: str) -> EvalPrompt:
    """Fill one template. Lines without placeholders are taken as written; CLIP-T text drops the token."""
    if "{unique_token}" in template or "{class_token}" in template:
        prompt = template.replace("{unique_token}", token).replace("{class_token}", class_noun)
        clip_text = template.replace("{unique_token}", "").replace("{class_token}", class_noun)
        return EvalPrompt(_collapse_spaces(prompt), _collapse_spaces(clip_text))
    prompt = _collapse_spaces(template)
    return EvalPrompt(prompt, remove_token(prompt, token))


def remove_token(text: str, token: str) -> str:
    """``text`` with every whole-word occurrence of ``token`` removed ("a sks dog" -> "a dog")."""
    if not token.strip():
        return _collapse_spaces(text)
    return _collapse_spaces(re.sub(rf"(?<!\w){re.escape(token.strip())}(?!\w)", " ", text))


def dreambench_prompts(kind: str, token: str, class_noun: str) -> list[EvalPrompt]:
    """The 25 DreamBench prompts for a subject: ``("a sks dog in the jungle", "a dog in the jungle")``, ..."""
    if not class_noun.strip():
        raise UserInputError("the class noun is empty: DreamBench prompts need one (e.g. 'dog')")
    return [fill_template(t, token.strip(), class_noun.strip()) for t in load_prompt_templates(kind)]


def read_prompt_file(path: str | Path, token: str, class_noun: str) -> list[EvalPrompt]:
    """Prompts from a text file, one per line ('#' comments and blank lines skipped).

    Lines may use ``{unique_token}`` / ``{class_token}`` like the bundled DreamBench lists, or be plain
    prompts that already contain the token.
    """
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read prompt file '{file}': {_first_line(exc)}") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise UserInputError(f"prompt file '{file}' has no prompts (one per line)")
    return [fill_template(t, token.strip(), class_noun.strip()) for t in templates]


# ------------------------------------------------------------------------------------ metrics on embeddings
def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32)."""
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` cosine similarities between the rows of ``a`` and of ``b``."""
    return l2_normalize(a) @ l2_normalize(b).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all ``len(a) * len(b)`` pairs: the paper's DINO / CLIP-I (a = generated, b = real)."""
    return float(cosine_matrix(a, b).mean())


def mean_distinct_pair_cosine(a: torch.Tensor) -> float:
    """Mean cosine over pairs of distinct rows (i != j) of one set: the paper's "real images" reference."""
    n = a.shape[0]
    if n < 2:
        raise ValueError("need at least two embeddings for distinct pairs")
    sims = cosine_matrix(a, a)
    return float((sims.sum() - sims.diagonal().sum()) / (n * n - n))


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``a`` with row i of ``b`` (CLIP-T: image i against its own prompt)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_cosine needs equal row counts, got {a.shape[0]} and {b.shape[0]}")
    return (l2_normalize(a) * l2_normalize(b)).sum(dim=-1)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


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


# ------------------------------------------------------------------------------------------ image input
@dataclass(frozen=True)
class GeneratedImage:
    """One image written by :func:`generate_for_evaluation`."""

    path: Path
    prompt: str
    clip_text: str
    prompt_index: int
    image_index: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "prompt": self.prompt, "clip_text": self.clip_text,
                "prompt_index": self.prompt_index, "image_index": self.image_index, "seed": self.seed}


ImageItem = Union[str, Path, Image.Image, GeneratedImage]
ImageSource = Union[str, Path, Sequence[ImageItem]]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; a clear error when there are none."""
    directory = Path(folder)
    if not directory.is_dir():
        raise UserInputError(f"image folder '{directory}' does not exist or is not a folder")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{directory}'")
    return files


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image file, apply its EXIF rotation, return RGB; a clear error naming a bad file."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserInputError(f"cannot read image '{path}': {_first_line(exc)}") from None


def load_images(source: ImageSource) -> tuple[list[Image.Image], list[str | None]]:
    """Images from a folder or a list of paths / PIL images / :class:`GeneratedImage`; returns (images, file
    names or None for in-memory images)."""
    items: Sequence[ImageItem] = list_images(source) if isinstance(source, (str, Path)) else source
    images: list[Image.Image] = []
    files: list[str | None] = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert("RGB"))
            files.append(None)
            continue
        path = item.path if isinstance(item, GeneratedImage) else Path(item)
        images.append(open_rgb(path))
        files.append(str(path))
    if not images:
        raise UserInputError("no images to score")
    return images, files


def _as_eval_prompt(item: str | EvalPrompt) -> EvalPrompt:
    return item if isinstance(item, EvalPrompt) else EvalPrompt(str(item), str(item))


def _generated_with_prompts(
    generated: ImageSource, prompts_per_image: Sequence[str | EvalPrompt] | None
) -> tuple[list[Image.Image], list[str | None], list[EvalPrompt] | None]:
    """Decode generated images and pair them with prompts (given, from GeneratedImage, or a folder manifest)."""
    if prompts_per_image is None and isinstance(generated, (str, Path)) and (Path(generated) / MANIFEST_NAME).is_file():
        generated = read_manifest(generated)
    if prompts_per_image is None and not isinstance(generated, (str, Path)):
        if generated and all(isinstance(item, GeneratedImage) for item in generated):
            prompts_per_image = [EvalPrompt(g.prompt, g.clip_text) for g in generated]  # type: ignore[union-attr]
    images, files = load_images(generated)
    if prompts_per_image is None:
        return images, files, None
    prompts = [_as_eval_prompt(p) for p in prompts_per_image]
    if len(prompts) != len(images):
        raise UserInputError(f"{len(images)} generated images but {len(prompts)} prompts: give one prompt per image")
    return images, files, prompts


# -------------------------------------------------------------------------------------------- scoring
def _resolve_models(clip: ClipEmbedder | str | None, dino: DinoEmbedder | str | None) -> MetricModels:
    models = load_metric_models(clip if isinstance(clip, str) else None, dino if isinstance(dino, str) else None)
    return MetricModels(
        clip=models.clip if isinstance(clip, str) else clip,
        dino=models.dino if isinstance(dino, str) else dino,
    )


def _per_prompt(per_image: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-image rows grouped by prompt (first-seen order), metrics averaged."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in per_image:
        groups.setdefault((row["prompt"], row["clip_text"]), []).append(row)
    table = []
    for (prompt, clip_text), rows in groups.items():
        entry: dict[str, Any] = {"prompt": prompt, "clip_text": clip_text, "n_images": len(rows)}
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            entry[metric] = sum(values) / len(values) if values else None
        table.append(entry)
    return table


def score_images(
    generated: ImageSource,
    real: ImageSource,
    prompts_per_image: Sequence[str | EvalPrompt] | None = None,
    *,
    clip: ClipEmbedder | str | None = None,
    dino: DinoEmbedder | str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """DINO, CLIP-I and CLIP-T of generated images against real photos of the subject.

    ``generated`` / ``real``: a folder or a list of paths / PIL images / GeneratedImage. ``prompts_per_image``:
    one CLIP-T text (or EvalPrompt) per generated image; None uses a folder's ``images.json`` manifest or the
    GeneratedImage records, and otherwise skips CLIP-T. ``clip`` / ``dino``: loaded embedders or model names
    (None skips that model's metrics). Returns a JSON-ready dict: ``dino``, ``clip_i``, ``clip_t``,
    ``real_baseline``, counts, ``per_image`` and ``per_prompt``.
    """
    models = _resolve_models(clip, dino)
    if models.clip is None and models.dino is None:
        raise UserInputError("score_images needs a CLIP model, a DINO model or both")
    gen_images, gen_files, prompts = _generated_with_prompts(generated, prompts_per_image)
    real_images, real_files = load_images(real)
    per_image: list[dict[str, Any]] = [
        {"file": f, "prompt": p.prompt if p else None, "clip_text": p.clip_text if p else None}
        for f, p in zip(gen_files, prompts or [None] * len(gen_images))
    ]
    result: dict[str, Any] = {metric: None for metric in METRICS}
    baseline: dict[str, float | None] = {"dino": None, "clip_i": None}
    embedders = (("dino", models.dino), ("clip_i", models.clip))
    for metric, embedder in embedders:
        if embedder is None:
            continue
        gen_emb = embedder.embed_images(gen_images, batch_size)
        real_emb = embedder.embed_images(real_images, batch_size)
        rows = cosine_matrix(gen_emb, real_emb).mean(dim=1)
        result[metric] = float(rows.mean())
        if len(real_images) > 1:
            baseline[metric] = mean_distinct_pair_cosine(real_emb)
        for row, value in zip(per_image, rows.tolist()):
            row[metric] = value
        if metric == "clip_i" and prompts is not None:
            text_emb = embedder.embed_texts([p.clip_text for p in prompts])  # type: ignore[union-attr]
            text_rows = paired_cosine(gen_emb, text_emb)
            result["clip_t"] = float(text_rows.mean())
            for row, value in zip(per_image, text_rows.tolist()):
                row["clip_t"] = value
    result.update(
        real_baseline=baseline,
        n_generated=len(gen_images),
        n_real=len(real_images),
        real_files=real_files,
        models={"clip": models.clip.name if models.clip else None, "dino": models.dino.name if models.dino else None},
        per_image=per_image,
        per_prompt=_per_prompt(per_image) if prompts is not None else [],
    )
    return result


# ----------------------------------------------------------------------------------------- generation
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _atomic_write_bytes(path, buffer.getvalue())


def read_manifest(folder: str | Path) -> list[GeneratedImage]:
    """The :class:`GeneratedImage` records that :func:`generate_for_evaluation` wrote into ``folder``."""
    directory = Path(folder)
    try:
        entries = json.loads((directory / MANIFEST_NAME).read_text("utf-8"))["images"]
        return [GeneratedImage(path=directory / e["file"], prompt=e["prompt"], clip_text=e["clip_text"],
                               prompt_index=e["prompt_index"], image_index=e["image_index"], seed=e["seed"])
                for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"cannot read '{directory / MANIFEST_NAME}': {_first_line(exc)}") from None


def generate_for_evaluation(
    pipe: Any,
    prompts: Sequence[str | EvalPrompt],
    out_dir: str | Path,
    images_per_prompt: int = 4,
    seed: int = 0,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[GeneratedImage]:
    """Run ``pipe`` (a diffusers text-to-image pipeline, adapter already loaded) over ``prompts``.

    Image k (k = prompt_index * images_per_prompt + image_index) starts from a CPU generator seeded with
    ``seed + k``, so a rerun, another device or the base model (``compare_base``) gets the same noise.
    Files are ``out_dir/PP_II.png`` plus an ``images.json`` manifest; ``progress(done, total)`` is called
    after each batch.
    """
    if images_per_prompt < 1:
        raise UserInputError(f"images per prompt must be at least 1, got {images_per_prompt}")
    eval_prompts = [_as_eval_prompt(p) for p in prompts]
    if not eval_prompts:
        raise UserInputError("no prompts to generate")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    total = len(eval_prompts) * images_per_prompt
    records: list[GeneratedImage] = []
    for prompt_index, item in enumerate(eval_prompts):
        for start in range(0, images_per_prompt, max(1, batch_size)):
            indices = list(range(start, min(images_per_prompt, start + max(1, batch_size))))
            seeds = [seed + prompt_index * images_per_prompt + i for i in indices]
            output = pipe(
                prompt=item.prompt,
                negative_prompt=negative_prompt,
                num_images_per_prompt=len(indices),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                output_type="pil",
            )
            for image_index, image_seed, image in zip(indices, seeds, output.images):
                path = directory / f"{prompt_index:02d}_{image_index:02d}.png"
                _save_png(image, path)
                records.append(GeneratedImage(path, item.prompt, item.clip_text, prompt_index, image_index, image_seed))
            if progress is not None:
                progress(len(records), total)
    manifest = {"images": [r.to_dict() for r in records]}
    _atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    return records


@contextmanager
def adapters_disabled(pipe: Any) -> Iterator[None]:
    """Inside the block the pipeline's LoRA layers are off (``disable_lora``); they are re-enabled after."""
    adapters = pipe.get_list_adapters() if hasattr(pipe, "get_list_adapters") else None
    if adapters is not None and not any(adapters.values()):
        logger.warning("the pipeline has no LoRA adapter loaded: the base run will match the adapter run")
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


# --------------------------------------------------------------------------------------------- report
@dataclass
class EvaluationReport:
    """What :func:`write_report` wrote: ``report`` is the content of ``scores.json``."""

    report: dict[str, Any]
    scores_json: Path
    per_prompt_csv: Path
    contact_sheet: Path


def _summary(scores: dict[str, Any]) -> dict[str, float | None]:
    return {metric: scores.get(metric) for metric in METRICS}


def _relative(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def build_report(
    scores: dict[str, Any], base_scores: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
    out_dir: str | Path = ".",
) -> dict[str, Any]:
    """The ``scores.json`` content: summaries, gain over the base, real-image baseline, paper reference,
    settings and per-image rows (file paths relative to ``out_dir`` where they lie inside it)."""
    root = Path(out_dir)

    def rows(s: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**row, "file": _relative(row.get("file"), root)} for row in s.get("per_image", [])]

    report: dict[str, Any] = {
        "scores": _summary(scores),
        "real_baseline": scores.get("real_baseline"),
        "counts": {"generated": scores.get("n_generated"), "real": scores.get("n_real"),
                   "prompts": len(scores.get("per_prompt", []))},
        "models": scores.get("models"),
        "paper_reference": PAPER_REFERENCE,
        "settings": settings or {},
    }
    if base_scores is not None:
        report["base_scores"] = _summary(base_scores)
        report["gain"] = {
            m: (scores[m] - base_scores[m]) if scores.get(m) is not None and base_scores.get(m) is not None else None
            for m in METRICS
        }
    report["real_files"] = [_relative(f, root) for f in scores.get("real_files", [])]
    report["per_image"] = rows(scores)
    if base_scores is not None:
        report["base_per_image"] = rows(base_scores)
    return report


def _per_prompt_table(scores: dict[str, Any], base_scores: dict[str, Any] | None) -> list[dict[str, Any]]:
    base_rows = {(r["prompt"], r["clip_text"]): r for r in (base_scores or {}).get("per_prompt", [])}
    table = []
    for index, row in enumerate(scores.get("per_prompt", [])):
        out = {"prompt_index": index, **row}
        base = base_rows.get((row["prompt"], row["clip_text"]))
        if base_scores is not None:
            for m in METRICS:
                out[f"base_{m}"] = base.get(m) if base else None
                out[f"gain_{m}"] = row[m] - base[m] if base and row[m] is not None and base[m] is not None else None
        table.append(out)
    return table


def _format_cell(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else ("" if value is None else value)


def _write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    columns = ["prompt_index", "prompt", "clip_text", "n_images", *METRICS]
    if table and "base_dino" in table[0]:
        columns += [f"base_{m}" for m in METRICS] + [f"gain_{m}" for m in METRICS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: _format_cell(row.get(k)) for k in columns})
    _atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def _thumbnail(file: str | None, size: int) -> Image.Image:
    if file is None or not Path(file).is_file():
        return Image.new("RGB", (size, size), (200, 200, 200))
    return ImageOps.fit(open_rgb(file), (size, size), Image.Resampling.LANCZOS)


def _metric_line(name: str, row: dict[str, Any] | None) -> str:
    values = "  ".join(f"{METRIC_LABELS[m]} {row[m]:.3f}" for m in METRICS if row and row.get(m) is not None)
    return f"{name}{values}"


def _wrap(text: str, font: Any, max_width: float) -> str:
    """Greedy word wrap measured in pixels of ``font``."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


def _files_by_prompt(scores: dict[str, Any] | None) -> dict[str | None, list[str | None]]:
    grouped: dict[str | None, list[str | None]] = {}
    for row in (scores or {}).get("per_image", []):
        grouped.setdefault(row["prompt"], []).append(row.get("file"))
    return grouped


def render_contact_sheet(
    scores: dict[str, Any], base_scores: dict[str, Any] | None = None, thumb: int = 128, label_width: int = 280
) -> Image.Image:
    """A grid: the real photos on top, then one row per prompt with its images (and the base model's)."""
    font = ImageFont.load_default(size=12)
    pad, header, step = 6, 22, thumb + 6
    adapter_files, base_files = _files_by_prompt(scores), _files_by_prompt(base_scores)
    base_prompt_rows = {row["prompt"]: row for row in (base_scores or {}).get("per_prompt", [])}
    adapter_cols = max((len(v) for v in adapter_files.values()), default=0)
    base_cols = max((len(v) for v in base_files.values()), default=0)
    real_files = list(scores.get("real_files", []))
    columns = max(adapter_cols + (base_cols + 1 if base_cols else 0), len(real_files), 1)
    prompt_rows = []
    for row in scores.get("per_prompt", []):
        label = [row["prompt"], _metric_line("adapter " if base_scores else "", row)]
        if base_scores is not None:
            label.append(_metric_line("base ", base_prompt_rows.get(row["prompt"])))
        prompt_rows.append(("\n".join(label), adapter_files.get(row["prompt"], []), base_files.get(row["prompt"], [])))
    size = (label_width + columns * step + pad, header + (len(prompt_rows) + 1) * step + pad)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    rows = [("real photos", real_files, [])] + prompt_rows
    for r, (label, files, base) in enumerate(rows):
        top = pad + r * step + (header if r else 0)
        wrapped = "\n".join(_wrap(part, font, label_width - 2 * pad) for part in label.split("\n"))
        draw.multiline_text((pad, top + 4), wrapped, fill="black", font=font)
        # base images start after the adapter columns and one empty gap column
        cells = list(enumerate(files)) + [(adapter_cols + 1 + j, f) for j, f in enumerate(base)]
        for column, file in cells:
            sheet.paste(_thumbnail(file, thumb), (label_width + column * step, top))
    header_top = pad + step + 2
    draw.text((label_width, header_top), "with adapter" if base_cols else "generated", fill="black", font=font)
    if base_cols:
        base_left = label_width + (adapter_cols + 1) * step
        draw.text((base_left, header_top), "base model (adapter off)", fill="black", font=font)
    return sheet


def write_report(
    out_dir: str | Path,
    scores: dict[str, Any],
    base_scores: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    *,
    thumb: int = 128,
) -> EvaluationReport:
    """Write ``scores.json``, ``per_prompt.csv`` and ``contact_sheet.png`` into ``out_dir`` (atomically)."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(scores, base_scores, settings, directory)
    scores_json = directory / "scores.json"
    _atomic_write_bytes(scores_json, (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    per_prompt_csv = directory / "per_prompt.csv"
    _write_csv(per_prompt_csv, _per_prompt_table(scores, base_scores))
    contact_sheet = directory / "contact_sheet.png"
    _save_png(render_contact_sheet(scores, base_scores, thumb=thumb), contact_sheet)
    return EvaluationReport(report, scores_json, per_prompt_csv, contact_sheet)


def format_summary(report: dict[str, Any]) -> str:
    """A few human-readable lines of a ``scores.json`` report, for the CLI."""

    def line(name: str, values: dict[str, Any] | None, signed: bool = False) -> str:
        cells = [f"{METRIC_LABELS[m]} {values[m]:+.3f}" if signed else f"{METRIC_LABELS[m]} {values[m]:.3f}"
                 for m in METRICS if values and values.get(m) is not None]
        return f"{name:<28}" + "  ".join(cells)

    lines = [line("with adapter:", report["scores"])]
    if "base_scores" in report:
        lines += [line("base model:", report["base_scores"]), line("gain:", report["gain"], signed=True)]
    lines.append(line("real photos (i != j):", report.get("real_baseline")))
    paper = PAPER_REFERENCE["dreambooth_stable_diffusion"]
    lines.append(line("paper, DreamBooth SD:", paper))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ orchestration
def evaluate(
    pipe: Any,
    prompts: Sequence[EvalPrompt],
    real: ImageSource,
    out_dir: str | Path,
    metric_models: MetricModels,
    *,
    images_per_prompt: int = 4,
    seed: int = 0,
    compare_base: bool = False,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    settings: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvaluationReport:
    """Generate ``prompts`` with the adapter (and, with ``compare_base``, without it), score, write the report.

    Images go to ``out_dir/images/adapter`` and ``out_dir/images/base``; the real photos are decoded first,
    so a bad folder fails before any generation. ``progress(run_name, done, total)`` reports generation.
    """
    real_images, real_files = load_images(real)
    real_input: Sequence[ImageItem] = [Path(f) if f else im for f, im in zip(real_files, real_images)]
    directory = Path(out_dir)
    generation = dict(images_per_prompt=images_per_prompt, seed=seed, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, height=height, width=width, batch_size=batch_size)

    def run(name: str) -> dict[str, Any]:
        report_progress = (lambda done, total: progress(name, done, total)) if progress else None
        images = generate_for_evaluation(pipe, prompts, directory / "images" / name, progress=report_progress,
                                         **generation)
        return score_images(images, real_input, clip=metric_models.clip, dino=metric_models.dino)

    scores = run("adapter")
    base_scores = None
    if compare_base:
        with adapters_disabled(pipe):
            base_scores = run("base")
    all_settings = {**generation, "compare_base": compare_base, "n_prompts": len(prompts), **(settings or {})}
    return write_report(directory, scores, base_scores, all_settings)


# -------------------------------------------------------------------------- tiny random scoring models
def save_tiny_metric_models(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> tuple[Path, Path]:
    """Random tiny CLIP and ViT (DINO-shaped) models with processors, saved as ``out_dir/clip`` and
    ``out_dir/dino`` folders that :func:`load_metric_models` loads offline. For tests and demos only: their
    scores mean nothing."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from .tiny import build_tiny_tokenizer

    root = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **tower),
        vision_config=dict(image_size=image_size, patch_size=8, **tower),
        projection_dim=16,
    )
    clip_dir, dino_dir = root / "clip", root / "dino"
    CLIPModel(clip_config).save_pretrained(clip_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    ViTModel(ViTConfig(image_size=image_size, patch_size=8, **tower), add_pooling_layer=False).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


# ------------------------------------------------------------------------------------------ CLI orchestration
def evaluate_adapter(*, base: str, adapter: str, real_dir: str, kind: str, out_dir: str, images_per_prompt: int = 4,
                     prompts_file: str | None = None, clip: str | None = DEFAULT_CLIP_MODEL,
                     dino: str | None = DEFAULT_DINO_MODEL, seed: int = 0, steps: int = 50, guidance: float = 7.5,
                     size: int | None = None, compare_base: bool = False, token: str | None = None,
                     class_noun: str | None = None, device: str | None = None) -> str:
    """What `lora-dreambooth evaluate` does: metric models first (fail fast), then base + adapter, generate, score.

    Returns the human-readable summary; the files land in `out_dir`.
    """
    from .formats import read_summary, resolve_adapter_file
    from .inference import ResidentPipeline, default_device, load_adapter

    if kind not in KINDS:
        raise UserInputError(f"--kind must be one of {', '.join(KINDS)}; got '{kind}'")
    file = resolve_adapter_file(adapter)
    summary = read_summary(file)
    token = token or summary.get("token")
    class_noun = class_noun or summary.get("class_noun")
    if not token or not class_noun:
        raise UserInputError(f"adapter '{file}' has no token/class metadata: pass --token and --class-noun")
    device = device or default_device()
    metric_models = load_metric_models(clip, dino, device=device)
    prompts = (read_prompt_file(prompts_file, token, class_noun) if prompts_file
               else dreambench_prompts(kind, token, class_noun))
    pipe = ResidentPipeline.from_base(base, device=device).pipe
    load_adapter(pipe, file)
    size = size or int(summary.get("resolution") or 512)
    result = evaluate(pipe, prompts, real_dir, out_dir, metric_models, images_per_prompt=images_per_prompt, seed=seed,
                      compare_base=compare_base, num_inference_steps=steps, guidance_scale=guidance, height=size,
                      width=size, settings={"base": base, "adapter": str(file), "kind": kind, "clip": clip,
                                            "dino": dino, "token": token, "class_noun": class_noun})
    return format_summary(result.report) + f"\nwrote {result.scores_json}, {result.per_prompt_csv}, {result.contact_sheet}"
