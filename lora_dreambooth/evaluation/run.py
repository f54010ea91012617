"""DreamBench-style evaluation end to end: generate the prompts, score, write the report."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.evaluation.embedders import (DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, MetricModels,
                                                  load_metric_models)
from lora_dreambooth.evaluation.generate import adapters_disabled, generate_for_evaluation
from lora_dreambooth.evaluation.images import ImageItem, ImageSource, load_images
from lora_dreambooth.evaluation.prompts import KINDS, EvalPrompt, dreambench_prompts, read_prompt_file
from lora_dreambooth.evaluation.report import EvaluationReport, format_summary, write_report
from lora_dreambooth.evaluation.scoring import score_images


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


# ------------------------------------------------------------------------------------------ CLI orchestration
def evaluate_adapter(*, base: str, adapter: str, real_dir: str, kind: str, out_dir: str, images_per_prompt: int = 4,
                     prompts_file: str | None = None, clip: str | None = DEFAULT_CLIP_MODEL,
                     dino: str | None = DEFAULT_DINO_MODEL, seed: int = 0, steps: int = 50, guidance: float = 7.5,
                     size: int | None = None, compare_base: bool = False, token: str | None = None,
                     class_noun: str | None = None, device: str | None = None, allow_pickle: bool = False) -> str:
    """What `lora-dreambooth evaluate` does: metric models first (fail fast), then base + adapter, generate, score.

    Returns the human-readable summary; the files land in `out_dir`.
    """
    from lora_dreambooth.files.load_adapter import load_adapter
    from lora_dreambooth.files.metadata import read_summary, resolve_adapter_file
    from lora_dreambooth.serve.pipeline import ResidentPipeline, default_device

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
    pipe = ResidentPipeline.from_base(base, device=device, allow_pickle=allow_pickle).pipe  # allow: a .ckpt base
    load_adapter(pipe, file)
    size = size or int(summary.get("resolution") or 512)
    result = evaluate(pipe, prompts, real_dir, out_dir, metric_models, images_per_prompt=images_per_prompt, seed=seed,
                      compare_base=compare_base, num_inference_steps=steps, guidance_scale=guidance, height=size,
                      width=size, settings={"base": base, "adapter": str(file), "kind": kind, "clip": clip,
                                            "dino": dino, "token": token, "class_noun": class_noun})
    return format_summary(result.report) + f"\nwrote {result.scores_json}, {result.per_prompt_csv}, {result.contact_sheet}"
