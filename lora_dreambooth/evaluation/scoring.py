"""DINO / CLIP-I / CLIP-T scores of generated images against real photos (Ruiz et al., CVPR 2023, Sec. 4.1)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.evaluation.embedders import ClipEmbedder, DinoEmbedder, MetricModels, load_metric_models
from lora_dreambooth.evaluation.images import ImageSource, _generated_with_prompts, load_images
from lora_dreambooth.evaluation.metrics import cosine_matrix, mean_distinct_pair_cosine, paired_cosine
from lora_dreambooth.evaluation.prompts import EvalPrompt

METRICS = ("dino", "clip_i", "clip_t")


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


