"""Transparent detectors for the synthetic world: no learned model, only masks, colours and geometry.

For one picture :func:`analyze` finds the object (pixels far from the background colour, largest connected
blob), then reads

* its **shape** — the template (circle / square / triangle) drawn in the blob's bounding box that overlaps the
  blob best (intersection over union);
* its **colour** — each object pixel votes for the nearest named colour (if any is within reach); the class
  colour is the palette colour with most votes;
* its **position** — left / center / right from the blob's centroid;
* its **subject similarity** — histogram intersection between the object's colour votes and the subject photos'
  (1.0 = the same colour make-up), and whether it *is* the subject: a triangle whose pixels are at least 15 %
  of each of the subject's two stripe colours (every class-world shape is a single colour).

Over a set of pictures, :func:`diversity` is the mean pairwise pixel distance (the paper's DIV with LPIPS
replaced by plain pixels) and :func:`color_entropy` the entropy of the class colours in bits.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from lora_dreambooth.synthetic.world import COLORS, POSITIONS, SHAPES, SUBJECT_COLORS, SUBJECT_STRIPES, shape_mask

#: Every colour a pixel can vote for: the palette plus the subject's own colours.
NAMED_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **SUBJECT_COLORS}
_NAMES = list(NAMED_COLORS)
_RGB = np.array([NAMED_COLORS[n] for n in _NAMES], dtype=np.float32)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
SUBJECT_MIN_FRACTION = 0.15
NAMING_DISTANCE = 90.0  # RGB distance within which a pixel counts as a named colour


@dataclass(frozen=True)
class Detection:
    """What :func:`analyze` reads from one picture (``shape``/``color``/``position`` are None when empty)."""

    shape: str | None
    shape_iou: float
    color: str | None
    color_fraction: float  # share of object pixels voting for ``color``
    position: str | None
    area: float  # object pixels / image pixels
    histogram: dict[str, float]  # share of object pixels per named colour
    subject_similarity: float
    is_subject: bool


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)


def foreground_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Boolean mask of pixels far from the background (estimated as the median colour of the border)."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of ``mask`` (a tiny flood fill; images here are at most 64 x 64)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_size else np.zeros_like(mask)


def classify_shape(blob: np.ndarray) -> tuple[str | None, float]:
    """The template shape that best covers ``blob`` inside its bounding box, and that intersection over union."""
    ys, xs = np.nonzero(blob)
    if len(ys) < 4:
        return None, 0.0
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, blob.shape[0], box) > 0.5
        union = np.logical_or(template, blob).sum()
        scores[shape] = float(np.logical_and(template, blob).sum() / union) if union else 0.0
    best = max(scores, key=scores.get)
    return best, scores[best]


def color_histogram(image: Image.Image | np.ndarray, blob: np.ndarray) -> dict[str, float]:
    """Share of ``blob``'s pixels nearest to each named colour.

    Pixels far from every named colour (anti-aliased edges blending into the background) vote for none, so the
    shares may sum to less than 1.
    """
    pixels = _as_array(image)[blob]
    if len(pixels) == 0:
        return {n: 0.0 for n in _NAMES}
    distances = np.sqrt(((pixels[:, None, :] - _RGB[None]) ** 2).sum(-1))
    nearest = np.argmin(distances, axis=1)[distances.min(axis=1) <= NAMING_DISTANCE]
    counts = np.bincount(nearest, minlength=len(_NAMES)) / len(pixels)
    return {n: float(c) for n, c in zip(_NAMES, counts)}


def histogram_intersection(a: dict[str, float], b: dict[str, float]) -> float:
    """Sum of per-colour minima: 1.0 for identical colour make-ups, 0.0 for disjoint ones."""
    return float(sum(min(a[k], b.get(k, 0.0)) for k in a))


def position_of(blob: np.ndarray) -> str | None:
    """left / center / right from the blob's centroid (thresholds halfway between the world's slots)."""
    ys, xs = np.nonzero(blob)
    if len(xs) == 0:
        return None
    x = (xs.mean() + 0.5) / blob.shape[1]
    left, center, right = POSITIONS["left"], POSITIONS["center"], POSITIONS["right"]
    return "left" if x < (left + center) / 2 else "right" if x > (center + right) / 2 else "center"


def analyze(image: Image.Image | np.ndarray, subject_histogram: dict[str, float] | None = None) -> Detection:
    """Read shape, colour, position and subject likeness of the main object in ``image``."""
    blob = largest_component(foreground_mask(image))
    shape, iou = classify_shape(blob)
    histogram = color_histogram(image, blob)
    palette_votes = {c: histogram[c] for c in COLORS}
    color = max(palette_votes, key=palette_votes.get)
    color = color if palette_votes[color] > 0 else None
    similarity = histogram_intersection(histogram, subject_histogram) if subject_histogram else 0.0
    is_subject = shape == "triangle" and all(histogram[c] >= SUBJECT_MIN_FRACTION for c in SUBJECT_STRIPES)
    return Detection(shape=shape, shape_iou=iou, color=color,
                     color_fraction=palette_votes[color] if color else 0.0,
                     position=position_of(blob), area=float(blob.mean()), histogram=histogram,
                     subject_similarity=similarity, is_subject=is_subject)


def reference_histogram(images: Iterable[Image.Image | np.ndarray]) -> dict[str, float]:
    """Mean colour histogram of the subject photos: the reference for :attr:`Detection.subject_similarity`."""
    histograms = [color_histogram(im, largest_component(foreground_mask(im))) for im in images]
    return {n: float(np.mean([h[n] for h in histograms])) for n in _NAMES}


def diversity(images: Sequence[Image.Image | np.ndarray]) -> float:
    """Mean pairwise mean-absolute pixel difference in [0, 1] (0 = all pictures identical)."""
    arrays = np.stack([_as_array(im) / 255.0 for im in images]).reshape(len(images), -1)
    if len(arrays) < 2:
        return 0.0
    total, pairs = 0.0, 0
    for i in range(len(arrays)):
        total += float(np.abs(arrays[i + 1:] - arrays[i]).mean(axis=1).sum())
        pairs += len(arrays) - i - 1
    return total / pairs


def color_entropy(colors: Iterable[str | None]) -> float:
    """Entropy in bits of the colour names (log2 6 = 2.58 for six equally likely colours)."""
    counts = Counter(c for c in colors if c is not None)
    n = sum(counts.values())
    return max(0.0, -sum(k / n * math.log2(k / n) for k in counts.values())) if n else 0.0
