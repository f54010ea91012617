"""The synthetic world: simple shapes in named colours, sizes and positions, with captions.

Everything is drawn with PIL at 4x and downsampled (anti-aliased edges), on a fixed light background, so the
detectors in :mod:`lora_dreambooth.synthetic.detectors` can read a picture back without any learned model.

* the *class world* — solid circles, squares and triangles in six named colours, of varied sizes, left / centre /
  right (colour and shape are named in captions, size and position are not);
* the *subject* — one distinctive triangle the class world never contains: two colours (teal over pink; every
  class-world shape is one solid colour) and a black dot, photographed a few times with small variations.

Some class-world shapes have an unnamed random colour (their captions name only the shape), so the base learns to
draw any colour, as a real base can; the named palette is what prompts can ask for.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND: tuple[int, int, int] = (245, 245, 240)

#: The named colours of the class world (each word is one token of the tiny tokenizer).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (130, 50, 180),
}
#: Colours of the subject, never named in a caption.
SUBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "teal": (0, 170, 170), "pink": (250, 110, 190), "black": (25, 25, 25),
}
#: The subject's two bands, top to bottom; never together in one class-world shape.
SUBJECT_STRIPES: tuple[str, str] = ("teal", "pink")
SUBJECT_DESCRIPTION = "a two-colour triangle (teal over pink) with a black dot"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Horizontal slots of the class world (never named in captions).
POSITIONS: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}

#: Every word a prompt of this world uses, for :func:`lora_dreambooth.tiny.build_tiny_tokenizer` (each becomes one
#: token; a test checks it). The order fixes the token ids, hence the pretrained base: keep it.
#: Rare identifiers (DreamBooth's token is one of them); see ``PretrainConfig.rare_tag_share``.
RARE_TAGS: tuple[str, ...] = ("sks", "zwx")
VOCABULARY: tuple[str, ...] = ("green", "a", "photo", "of", "in", *(c for c in COLORS if c != "green"), *SHAPES,
                               *RARE_TAGS)


@dataclass(frozen=True)
class ShapeSpec:
    """One object on the background. Sizes and centres are fractions of the image side."""

    shape: str
    color: tuple[int, int, int]
    size: float = 0.4
    cx: float = 0.5
    cy: float = 0.5
    stripes: tuple[tuple[int, int, int], ...] = ()  # colours of horizontal stripes, cycled; empty = solid
    stripe_count: int = 5
    dot: tuple[int, int, int] | None = None  # a dot at the centroid
    color_name: str | None = None
    position_name: str = "center"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")


def shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` centred at (cx, cy) with half-side ``half`` in pixels (None for a circle).

    The triangle is upright and isosceles, filling its bounding square's full width and height.
    """
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    return None


def shape_mask(shape: str, size_px: int, box: tuple[float, float, float, float], supersample: int = 4) -> np.ndarray:
    """A float mask in [0, 1] of ``shape`` inscribed in ``box`` = (x0, y0, x1, y1) on a ``size_px`` square canvas."""
    s = supersample
    canvas = Image.new("L", (size_px * s, size_px * s), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * s for v in box)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    small = canvas.resize((size_px, size_px), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(spec: ShapeSpec, resolution: int = 32, supersample: int = 4) -> Image.Image:
    """Draw ``spec`` on the background as an RGB image of ``resolution`` pixels."""
    big = resolution * supersample
    half = spec.size * big / 2
    cx, cy = spec.cx * big, spec.cy * big
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = Image.new("RGB", (big, big), spec.color)
    if spec.stripes:
        draw = ImageDraw.Draw(fill)
        band = 2 * half / spec.stripe_count
        for i in range(spec.stripe_count):
            top = box[1] + i * band
            draw.rectangle([0, top, big, top + band], fill=spec.stripes[i % len(spec.stripes)])
    mask = Image.new("L", (big, big), 0)
    mask_draw = ImageDraw.Draw(mask)
    polygon = shape_polygon(spec.shape, cx, cy, half)
    if polygon is None:
        mask_draw.ellipse(box, fill=255)
    else:
        mask_draw.polygon(polygon, fill=255)
    image = Image.new("RGB", (big, big), BACKGROUND)
    image.paste(fill, (0, 0), mask)
    if spec.dot is not None:
        # Centroid of the shape's area (a triangle's sits a third of the way up from its base).
        dot_y = cy + half / 3 if spec.shape == "triangle" else cy
        r = max(half * 0.22, supersample * 1.2)
        ImageDraw.Draw(image).ellipse([cx - r, dot_y - r, cx + r, dot_y + r], fill=spec.dot)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def random_class_spec(rng: random.Random, *, shape: str | None = None, color: str | None = None,
                      position: str | None = None) -> ShapeSpec:
    """A random solid shape of the class world; any of shape / colour name / position name may be fixed."""
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(list(COLORS))
    position = position or rng.choice(list(POSITIONS))
    size = rng.uniform(0.34, 0.46)
    cx = POSITIONS[position] + rng.uniform(-0.04, 0.04)
    cy = 0.5 + rng.uniform(-0.1, 0.1)
    return ShapeSpec(shape=shape, color=COLORS[color], size=size, cx=cx, cy=cy, color_name=color,
                     position_name=position)


def random_unnamed_spec(rng: random.Random, *, shape: str | None = None, position: str | None = None) -> ShapeSpec:
    """A class-world shape of a random RGB colour that no caption names (``color_name`` is None)."""
    named = random_class_spec(rng, shape=shape, position=position)
    color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    return replace(named, color=color, color_name=None)


def caption_for(spec: ShapeSpec, rng: random.Random) -> str:
    """One of several captions that describe ``spec`` truthfully (the colour is sometimes left out).

    Positions and sizes vary but are never named: a UNet this small, without positional embeddings, did not learn
    "on the left" within a CPU budget (measured at chance level after 1,500 steps), so the world does not ask it to.
    """
    color, shape = spec.color_name, spec.shape
    templates = [f"a photo of a {shape}"]
    if color is not None:
        templates += [f"a photo of a {color} {shape}"] * 2 + [f"a photo of a {shape} in {color}"]
    return rng.choice(templates)


def subject_spec(rng: random.Random | None = None, *, position: str = "center", size: float = 0.55) -> ShapeSpec:
    """The subject (:data:`SUBJECT_DESCRIPTION`), upright; ``rng`` adds small variations of size and place."""
    first, second = (SUBJECT_COLORS[c] for c in SUBJECT_STRIPES)
    base = ShapeSpec(shape="triangle", color=first, size=size, cx=POSITIONS[position], cy=0.5,
                     stripes=(first, second), stripe_count=2, dot=SUBJECT_COLORS["black"], position_name=position)
    if rng is None:
        return base
    return replace(base, size=size + rng.uniform(-0.04, 0.04), cx=base.cx + rng.uniform(-0.04, 0.04),
                   cy=0.5 + rng.uniform(-0.05, 0.05))


def random_generic_spec(rng: random.Random) -> ShapeSpec:
    """Anything drawable (random RGB colours, stripes, dots): data for the autoencoder, which must represent
    colours and patterns the captioned world never shows (so the subject can be learnt later)."""
    def rgb() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    stripes = (rgb(), rgb()) if rng.random() < 0.35 else ()
    return ShapeSpec(shape=rng.choice(SHAPES), color=rgb(), size=rng.uniform(0.25, 0.6), cx=rng.uniform(0.2, 0.8),
                     cy=rng.uniform(0.25, 0.75), stripes=stripes, stripe_count=rng.randint(3, 6),
                     dot=rgb() if rng.random() < 0.3 else None)


@dataclass
class ClassDataset:
    """Pre-rendered class-world images (uint8, N x H x W x 3) with their specs; captions are drawn per use."""

    images: np.ndarray
    specs: list[ShapeSpec] = field(default_factory=list)

    def captions(self, rng: random.Random) -> list[str]:
        """A fresh caption for every image (templates vary from call to call)."""
        return [caption_for(s, rng) for s in self.specs]


def make_class_dataset(count: int, resolution: int = 32, seed: int = 0, unnamed_share: float = 0.0) -> ClassDataset:
    """``count`` random class-world renders, balanced over shape x colour x position; a share ``unnamed_share`` of
    them get a random unnamed colour instead of their palette colour."""
    rng = random.Random(seed)
    combos = [(s, c, p) for s in SHAPES for c in COLORS for p in POSITIONS]
    specs = [random_unnamed_spec(rng, shape=s, position=p) if rng.random() < unnamed_share
             else random_class_spec(rng, shape=s, color=c, position=p)
             for i in range(count) for s, c, p in [combos[i % len(combos)]]]
    rng.shuffle(specs)
    images = np.stack([np.asarray(render(s, resolution)) for s in specs])
    return ClassDataset(images=images, specs=specs)


def write_subject_photos(out_dir: str | Path, count: int = 5, resolution: int = 32, seed: int = 0,
                         size: float = 0.55) -> list[Path]:
    """Write ``count`` photos of the subject (PNG) to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = out / f"subject_{i:02d}.png"
        render(subject_spec(rng, size=size), resolution).save(path)
        paths.append(path)
    return paths


def to_tensor(images: np.ndarray):
    """uint8 N x H x W x 3 -> float tensor N x 3 x H x W in [-1, 1] (the VAE's input range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
