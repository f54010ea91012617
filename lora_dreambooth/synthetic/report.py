"""The benchmark's table (Markdown) and picture grid (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image, ImageDraw, ImageFont

from lora_dreambooth.synthetic.world import SUBJECT_DESCRIPTION

if TYPE_CHECKING:
    from lora_dreambooth.synthetic.config import BenchConfig, BenchResult

CELL = 64  # pixels per picture in the grid (32 px pictures shown at 2x)
LABEL_WIDTH = 132
HEADER_HEIGHT = 30


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value: float, places: int = 2) -> str:
    return f"{value:.{places}f}"


def _pooled(stats: dict, attribute: str) -> float:
    """``attribute`` over the class's and the other classes' colour prompts together (every world prompt)."""
    parts = [stats["class_color"], stats["other_classes"]]
    return sum(getattr(p, attribute) * p.count for p in parts) / sum(p.count for p in parts)


def table_rows(result: "BenchResult", cfg: "BenchConfig") -> list[tuple[str, str, str, list[str]]]:
    """(group, measure, prompt, [base, adapter, adapter without prior]) for every row of the table."""
    from lora_dreambooth.synthetic.measure import MODELS

    s = result.stats
    t, noun = cfg.token, cfg.class_noun
    edit = f"a photo of {t} {noun} in {{{', '.join(cfg.edit_colors)}}}"
    colors = f"a photo of a {{colour}} {noun}"
    others = "a photo of a {colour} {" + ", ".join(x for x in ("circle", "square", "triangle") if x != noun) + "}"
    spec = [
        ("subject fidelity", "subject drawn", cfg.instance_prompt, lambda m: _pct(s[m]["subject"].subject_rate)),
        ("subject fidelity", "colour similarity to the photos", cfg.instance_prompt,
         lambda m: _num(s[m]["subject"].subject_similarity)),
        ("prompt fidelity", "asked colour drawn", edit, lambda m: _pct(s[m]["edit"].color_accuracy)),
        ("prompt fidelity", f"{noun} drawn", edit, lambda m: _pct(s[m]["edit"].shape_accuracy)),
        ("language drift", f"{noun} drawn (class accuracy)", cfg.class_prompt,
         lambda m: _pct(s[m]["class"].shape_accuracy)),
        ("language drift", "subject drawn instead (PRES, lower is better)", cfg.class_prompt,
         lambda m: _pct(s[m]["class"].subject_rate)),
        ("language drift", "colour similarity to the subject (PRES)", cfg.class_prompt,
         lambda m: _num(s[m]["class"].subject_similarity)),
        ("language drift", "diversity (DIV, mean pixel distance)", cfg.class_prompt,
         lambda m: _num(s[m]["class"].diversity, 3)),
        ("language drift", "colour entropy (bits, max 2.58)", cfg.class_prompt,
         lambda m: _num(s[m]["class"].color_entropy)),
        ("language drift", "asked colour drawn", colors, lambda m: _pct(s[m]["class_color"].color_accuracy)),
        ("other classes", "asked shape drawn", others, lambda m: _pct(s[m]["other_classes"].shape_accuracy)),
        ("other classes", "asked colour drawn", others, lambda m: _pct(s[m]["other_classes"].color_accuracy)),
        ("whole world", "asked shape drawn", "a photo of a {colour} {shape}",
         lambda m: _pct(_pooled(s[m], "shape_accuracy"))),
        ("whole world", "asked colour drawn", "a photo of a {colour} {shape}",
         lambda m: _pct(_pooled(s[m], "color_accuracy"))),
    ]
    return [(group, what, prompt, [cell(m) for m in MODELS]) for group, what, prompt, cell in spec]


def markdown_table(result: "BenchResult", cfg: "BenchConfig") -> str:
    """The results as one Markdown table (model columns: base, adapter with prior, adapter without prior)."""
    from lora_dreambooth.synthetic.measure import MODEL_TITLES, MODELS

    lines = ["| | measure | prompt | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " |",
             "|---|---|---|" + "---:|" * len(MODELS)]
    for group, what, prompt, cells in table_rows(result, cfg):
        lines.append(f"| {group} | {what} | `{prompt}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(result: "BenchResult", cfg: "BenchConfig", path: Path) -> Path:
    """Table, headline effects and timings as a small Markdown report."""
    from lora_dreambooth.synthetic.measure import effects

    eff = effects(result.stats)
    sec = result.seconds
    n = cfg.samples
    text = [
        "# Synthetic DreamBench",
        "",
        f"Base: tiny SD v1 layout pretrained from scratch on the shape world "
        f"({cfg.pretrain.unet_steps} denoiser steps, key `{cfg.pretrain.key()}`). Subject: "
        f"{cfg.subject_photos} photos of {SUBJECT_DESCRIPTION}. Adapters: LoRA rank {cfg.rank} on the UNet's "
        f"{', '.join(cfg.unet_targets or ('attention projections',))}, {cfg.steps} steps, lr {cfg.lr:g}, text encoder "
        + (f"trained (lr {cfg.text_encoder_lr or cfg.lr:g})" if cfg.train_text_encoder else "frozen") + ", "
        f"seed {cfg.seed}; with prior preservation ({cfg.num_class_images} class images, through the CLI) and "
        f"without (through the Python API). {n} pictures per prompt family, {cfg.sampler.inference_steps} "
        f"sampler steps, guidance {cfg.sampler.guidance_scale:g}, same seeds for every model.",
        "",
        markdown_table(result, cfg),
        "",
        f"- subject fidelity: colour similarity to the photos {eff['subject_similarity_gain']}x the base's; "
        f"subject drawn {eff['subject_rate_gain']}x as often (base floor: one picture of {n}).",
        f"- prior preservation, on `{cfg.class_prompt}`: similarity to the subject "
        f"{eff['drift_similarity_no_prior_minus_prior']:+.2f} without it, class accuracy "
        f"{100 * eff['class_accuracy_prior_minus_no_prior']:+.0f} points with it; every `a photo of a {{colour}} "
        f"{{shape}}` prompt: colour accuracy {100 * eff['world_color_accuracy_prior_minus_no_prior']:+.0f} points "
        "with it.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in sec.items()),
        "",
    ]
    path.write_text("\n".join(text))
    return path


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has a single bitmap size
        return ImageFont.load_default()


def write_grid(photos: Sequence[Image.Image], pictures: dict[str, dict[str, list[Image.Image]]],
               cfg: "BenchConfig", path: Path, per_family: dict[str, int] | None = None) -> Path:
    """Rows: the subject photos, then base / adapter / adapter without prior; columns: pictures of the subject
    prompt, the colour edits and the plain class prompt (the same seeds in every row)."""
    from lora_dreambooth.synthetic.measure import MODEL_TITLES, MODELS

    per_family = per_family or {"subject": 4, "edit": 3, "class": 5}
    columns = sum(per_family.values())
    width, height = LABEL_WIDTH + columns * CELL, HEADER_HEIGHT + (1 + len(MODELS)) * CELL
    grid = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(grid), _font()
    headers = {"subject": f"{cfg.token} {cfg.class_noun}", "edit": f"{cfg.token} {cfg.class_noun} in ...",
               "class": f"a {cfg.class_noun}"}
    x = LABEL_WIDTH
    for family, count in per_family.items():
        draw.text((x + 4, 4), f'"a photo of {headers[family]}"', fill="black", font=font)
        x += count * CELL
        draw.line([(x - 1, 0), (x - 1, height)], fill=(200, 200, 200))

    def paste_row(row: int, label: str, images: Sequence[Image.Image]) -> None:
        y = HEADER_HEIGHT + row * CELL
        draw.text((6, y + CELL // 2 - 6), label, fill="black", font=font)
        for i, image in enumerate(images):
            grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (LABEL_WIDTH + i * CELL, y))

    paste_row(0, "subject photos", list(photos)[:columns])
    for row, model in enumerate(MODELS, start=1):
        images = [im for family, count in per_family.items() for im in pictures[model][family][:count]]
        paste_row(row, MODEL_TITLES[model], images)
    grid.save(path, optimize=True)
    return path
