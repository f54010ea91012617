"""Sampling a pipeline on prompt sets and turning the detectors' readings into the benchmark's numbers."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from lora_dreambooth.synthetic.detectors import analyze, color_entropy, diversity
from lora_dreambooth.synthetic.world import COLORS, SHAPES


@dataclass(frozen=True)
class SamplerConfig:
    """How pictures are drawn for measurement (the pipeline's own scheduler, few steps, CFG)."""

    inference_steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int = 48
    seed: int = 1234


@dataclass(frozen=True)
class Expectation:
    """A prompt and what a faithful picture of it shows (``color`` None: any colour is fine)."""

    prompt: str
    shape: str
    color: str | None = None


def sample(pipe, prompts: Sequence[str], sampler: SamplerConfig, seed_offset: int = 0) -> list[Image.Image]:
    """One picture per prompt, drawn in batches with seeds fixed by index (the same seeds for every model)."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), sampler.batch_size):
        chunk = list(prompts[start:start + sampler.batch_size])
        generator = torch.Generator(device="cpu").manual_seed(sampler.seed + seed_offset + start)
        out = pipe(chunk, num_inference_steps=sampler.inference_steps, guidance_scale=sampler.guidance_scale,
                   generator=generator, output_type="pil")
        images.extend(out.images)
    return images


@dataclass
class PromptStats:
    """The detectors' summary of the pictures drawn for one prompt (or one family of prompts)."""

    prompt: str
    count: int
    shape_accuracy: float  # share whose shape is the expected one
    color_accuracy: float | None  # share whose class colour is the expected one (None: no colour asked)
    subject_rate: float  # share detected as the subject
    subject_similarity: float  # mean colour-histogram intersection with the subject photos
    diversity: float  # mean pairwise pixel distance (DIV)
    color_entropy: float  # bits

    def as_dict(self) -> dict:
        """Plain-JSON form with floats rounded to 3 places."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure(pipe, label: str, expectations: Sequence[Expectation], sampler: SamplerConfig,
            subject_histogram: dict[str, float], seed_offset: int = 0) -> tuple[PromptStats, list[Image.Image]]:
    """Draw one picture per expectation and compare what the detectors read with what the prompt asked for."""
    images = sample(pipe, [e.prompt for e in expectations], sampler, seed_offset)
    found = [analyze(im, subject_histogram) for im in images]
    colored = [(d, e) for d, e in zip(found, expectations) if e.color is not None]
    stats = PromptStats(
        prompt=label, count=len(images),
        shape_accuracy=float(np.mean([d.shape == e.shape for d, e in zip(found, expectations)])),
        color_accuracy=float(np.mean([d.color == e.color for d, e in colored])) if colored else None,
        subject_rate=float(np.mean([d.is_subject for d in found])),
        subject_similarity=float(np.mean([d.subject_similarity for d in found])),
        diversity=diversity(images),
        color_entropy=color_entropy(d.color for d in found),
    )
    return stats, images


def world_expectations(repeats: int = 2, shapes: Sequence[str] = SHAPES) -> list[Expectation]:
    """Every "a photo of a {colour} {shape}" prompt of the world, ``repeats`` times."""
    return [Expectation(f"a photo of a {c} {s}", s, c) for s in shapes for c in COLORS] * repeats


MODELS = ("base", "adapter", "adapter_no_prior")


MODEL_TITLES = {"base": "base", "adapter": "adapter (prior)", "adapter_no_prior": "adapter (no prior)"}


def effects(stats: dict[str, dict[str, PromptStats]]) -> dict[str, float]:
    """The headline comparisons: gains (> 1) and differences (> 0) when DreamBooth and prior preservation work."""
    base, prior, free = stats["base"], stats["adapter"], stats["adapter_no_prior"]
    floor = 1.0 / max(base["subject"].count, 1)  # one picture's worth: keeps the ratio finite when the base scores 0

    def world_colors(model: dict[str, PromptStats]) -> float:
        parts = [model["class_color"], model["other_classes"]]
        return sum(p.color_accuracy * p.count for p in parts) / sum(p.count for p in parts)

    return {
        "subject_similarity_gain": round(prior["subject"].subject_similarity
                                         / max(base["subject"].subject_similarity, 1e-3), 2),
        "subject_rate_gain": round(prior["subject"].subject_rate / max(base["subject"].subject_rate, floor), 2),
        "drift_similarity_no_prior_minus_prior": round(free["class"].subject_similarity
                                                       - prior["class"].subject_similarity, 3),
        "drift_leak_no_prior_minus_prior": round(free["class"].subject_rate - prior["class"].subject_rate, 3),
        "class_accuracy_prior_minus_no_prior": round(prior["class"].shape_accuracy - free["class"].shape_accuracy, 3),
        "world_color_accuracy_prior_minus_no_prior": round(world_colors(prior) - world_colors(free), 3),
    }
