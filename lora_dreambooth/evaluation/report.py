"""The evaluation report: scores.json, per_prompt.csv, contact_sheet.png and the printed summary."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from lora_dreambooth.evaluation.images import _atomic_write_bytes, _save_png, open_rgb

METRICS = ("dino", "clip_i", "clip_t")
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
PAPER_REFERENCE = {
    "source": "Ruiz et al., DreamBooth, CVPR 2023, Table 1 (30 subjects x 25 prompts x 4 images)",
    "dreambooth_stable_diffusion": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "real_images": {"dino": 0.774, "clip_i": 0.885},
}


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


