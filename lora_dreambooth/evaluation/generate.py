"""Generating the benchmark images with and without the adapter."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lora_dreambooth.errors import UserInputError
from lora_dreambooth.evaluation.images import GeneratedImage, _as_eval_prompt, _atomic_write_bytes, _save_png
from lora_dreambooth.evaluation.prompts import EvalPrompt

logger = logging.getLogger(__name__)
MANIFEST_NAME = "images.json"


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


