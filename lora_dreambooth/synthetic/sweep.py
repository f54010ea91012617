"""The Synthetic DreamBench over seeds: several training configurations side by side, mean and spread per measure.

For every seed: write that seed's subject photos, measure the base once, then train one adapter per configuration
(prior preservation on, through ``lora_dreambooth.train``; everything else as in :func:`.bench.train_config`,
plus the configuration's own options) and measure it the way users load it (``load_textual_inversion`` for a
``--pivotal`` embedding, then ``load_lora_weights``). Results are written as JSON after every run, so an
interrupted sweep keeps what it measured.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lora_dreambooth.synthetic.config import BenchConfig
from lora_dreambooth.synthetic.world import COLORS


def world_class_prompts(noun_template: str = "{class}") -> tuple[str, ...]:
    """The shape world's own caption variants for the class: the plain one and "... in {colour}" for every named
    colour (the edits users ask for), as the prior's class prompts."""
    return (f"a photo of a {noun_template}", *(f"a photo of a {noun_template} in {c}" for c in COLORS))


@dataclass(frozen=True)
class SweepConfig:
    """One configuration of the sweep: a name and the TrainConfig options it changes."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    description: str = ""


#: The compared configurations. "default" is today's recipe (the single-adapter "adapter (prior)" column).
CONFIGURATIONS: dict[str, SweepConfig] = {c.name: c for c in (
    SweepConfig("default", {}, "today's default: one class prompt, AdamW"),
    SweepConfig("pivotal", {"pivotal": True}, "--pivotal (identifier embedding from the class noun)"),
    SweepConfig("class-prompts", {"class_prompt": world_class_prompts()},
                "7 class prompts: the world's caption variants ('a photo of a {class} in {colour}')"),
    SweepConfig("prodigy", {"optimizer": "prodigy", "lr": 1.0}, "--optimizer prodigy --lr 1.0"),
    SweepConfig("pivotal+class-prompts", {"pivotal": True, "class_prompt": world_class_prompts()},
                "--pivotal with the 7 class prompts"),
    # follow-ups, not in the default sweep (CPU budget): --configs names them
    SweepConfig("pivotal-fast", {"pivotal": True, "embedding_lr": 1e-2}, "--pivotal --embedding-lr 1e-2 (5x lr)"),
    SweepConfig("pivotal-fast+class-prompts", {"pivotal": True, "embedding_lr": 1e-2,
                                               "class_prompt": world_class_prompts()},
                "--pivotal --embedding-lr 1e-2 with the 7 class prompts"),
    SweepConfig("pivotal-row-only+class-prompts", {"pivotal": True, "embedding_lr": 1e-2, "train_text_encoder": False,
                                                   "class_prompt": world_class_prompts()},
                "--pivotal --embedding-lr 1e-2 --no-train-text-encoder, 7 class prompts"),
    SweepConfig("pivotal+class-prompts+prior0.5", {"pivotal": True, "class_prompt": world_class_prompts(),
                                                   "prior_weight": 0.5},
                "--pivotal with the 7 class prompts, --prior-weight 0.5"),
    SweepConfig("pivotal+class-prompts+prodigy", {"pivotal": True, "class_prompt": world_class_prompts(),
                                                  "optimizer": "prodigy", "lr": 1.0},
                "--pivotal, 7 class prompts, prodigy"),
)}

#: What ``--seeds`` compares unless ``--configs`` says otherwise (5 x 3 seeds fit a CPU afternoon: ~4 min a run).
DEFAULT_SWEEP: tuple[str, ...] = ("default", "pivotal", "class-prompts", "prodigy", "pivotal+class-prompts")

#: (key, label, family, attribute, higher is better) of the summarised measures.
MEASURES: tuple[tuple[str, str, str, str, bool], ...] = (
    ("subject", "subject drawn", "subject", "subject_rate", True),  # a photo of sks triangle
    ("similarity", "similarity to the photos", "subject", "subject_similarity", True),
    ("edit_color", "edit: colour kept", "edit", "color_accuracy", True),  # a photo of sks triangle in {colour}
    ("edit_shape", "edit: triangle", "edit", "shape_accuracy", True),
    ("leak", "leak (PRES)", "class", "subject_rate", False),  # a photo of a triangle
    ("class_accuracy", "class accuracy", "class", "shape_accuracy", True),
    ("world_color", "world colour", "world", "color_accuracy", True),  # a photo of a {colour} {shape}
)


def summarise(stats: dict) -> dict[str, float]:
    """The measures of one model (its PromptStats by family) as plain numbers."""
    world = [stats["class_color"], stats["other_classes"]]
    out = {}
    for key, _, family, attribute, _ in MEASURES:
        if family == "world":
            out[key] = sum(getattr(p, attribute) * p.count for p in world) / sum(p.count for p in world)
        else:
            out[key] = float(getattr(stats[family], attribute))
    return out


def aggregate(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max of every measure over seeds."""
    out = {}
    for key, *_ in MEASURES:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values), "n": len(values)}
    return out


def meets_targets(summary: dict[str, dict[str, float]], default: dict[str, dict[str, float]]) -> bool:
    """The issue's targets: subject drawn >= the default's, asked colour >= 70 %, leak <= 5 % (means)."""
    return (summary["subject"]["mean"] >= default["subject"]["mean"] and summary["edit_color"]["mean"] >= 0.70
            and summary["leak"]["mean"] <= 0.05)


def train_one(cfg: BenchConfig, base: Path, subject_dir: Path, out: Path, class_dir: Path, sweep: SweepConfig) -> float:
    """Train one adapter of ``sweep`` (prior preservation on); return the seconds it took."""
    from lora_dreambooth.synthetic.bench import train_config, train_with_api

    config = train_config(cfg, base, subject_dir, out, prior=True, prior_weight=cfg.prior_weight,
                          class_dir=str(class_dir), num_class_images=cfg.num_class_images,
                          class_prompt="a photo of a {class}", class_inference_steps=cfg.class_inference_steps)
    started = time.perf_counter()
    train_with_api(config.replace(**sweep.changes))
    return time.perf_counter() - started


def load_for_measure(base: Path, adapter_dir: Path | None, device: str = "cpu"):
    """The base with an adapter as plain diffusers users load it (embedding first when there is one)."""
    from lora_dreambooth.files.embeddings import EMBEDDINGS_FILENAME, read_embedding
    from lora_dreambooth.synthetic.bench import load_pipeline

    pipe = load_pipeline(base, None, device)
    if adapter_dir is not None:
        embedding = adapter_dir / EMBEDDINGS_FILENAME
        if embedding.is_file():
            token, _ = read_embedding(embedding)
            pipe.load_textual_inversion(str(embedding), token=token)
        pipe.load_lora_weights(adapter_dir)
    return pipe


def run_sweep(cfg: BenchConfig, work_dir: str | Path, seeds: Sequence[int], configs: Sequence[str], *,
              cache_root: str | Path | None = None, log: Callable[[str], None] = print,
              device: str = "cpu") -> dict[str, Any]:
    """Every configuration at every seed; returns (and writes to ``sweep.json``) per-run and aggregated numbers."""
    from dataclasses import replace

    from PIL import Image

    from lora_dreambooth.synthetic.bench import measure_model
    from lora_dreambooth.synthetic.detectors import reference_histogram
    from lora_dreambooth.synthetic.pretrain import pretrained_base
    from lora_dreambooth.synthetic.world import write_subject_photos

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base = pretrained_base(cfg.pretrain, cache_root, log, device)
    result: dict[str, Any] = {"config": asdict(cfg), "seeds": list(seeds), "configs": list(configs),
                              "descriptions": {n: CONFIGURATIONS[n].description for n in configs},
                              "runs": {n: {} for n in ["base", *configs]}, "seconds": {n: [] for n in configs}}
    done = _earlier_runs(work, result)
    for seed in seeds:
        run_cfg = replace(cfg, seed=seed)
        seed_dir = work / f"seed-{seed}"
        photos = [Image.open(p).convert("RGB") for p in write_subject_photos(
            seed_dir / "subject", run_cfg.subject_photos, run_cfg.pretrain.resolution, seed=seed,
            size=run_cfg.subject_size)]
        histogram = reference_histogram(photos)
        if str(seed) not in result["runs"]["base"]:
            stats, _ = measure_model(load_for_measure(base, None, device), run_cfg, histogram)
            result["runs"]["base"][str(seed)] = summarise(stats)
        for name in configs:
            if (name, str(seed)) in done:
                continue
            sweep = CONFIGURATIONS[name]
            prompts_key = "multi" if "class_prompt" in sweep.changes else "one"
            out = seed_dir / name
            try:
                seconds = train_one(run_cfg, base, seed_dir / "subject", out,
                                    seed_dir / f"class-images-{prompts_key}", sweep)
                stats, _ = measure_model(load_for_measure(base, out, device), run_cfg, histogram)
            except Exception as exc:  # one broken configuration must not cost the rest of a long sweep
                result.setdefault("errors", {})[f"{name}@{seed}"] = f"{type(exc).__name__}: {exc}"
                log(f"seed {seed} {name}: FAILED {type(exc).__name__}: {exc}")
                _write(work, result)
                continue
            result["runs"][name][str(seed)] = summarise(stats)
            result["seconds"][name].append(round(seconds, 1))
            log(f"seed {seed} {name}: trained in {seconds:.0f} s; "
                + ", ".join(f"{k} {v:.2f}" for k, v in result["runs"][name][str(seed)].items()))
            _write(work, result)
    return _write(work, result)


def _earlier_runs(work: Path, result: dict[str, Any]) -> set[tuple[str, str]]:
    """Reuse the runs of an interrupted sweep in the same folder with the same settings; return them."""
    path = work / "sweep.json"
    if not path.is_file():
        return set()
    earlier = json.loads(path.read_text())
    if earlier.get("config") != json.loads(json.dumps(result["config"])):
        return set()
    done = set()
    for name, runs in earlier.get("runs", {}).items():  # every earlier configuration stays in the file
        result["runs"].setdefault(name, {}).update(runs)
        done |= {(name, seed) for seed in runs}
        if name != "base":
            result["seconds"][name] = list(earlier.get("seconds", {}).get(name, []))
            result["descriptions"].setdefault(name, earlier.get("descriptions", {}).get(name, ""))
    return done


def _write(work: Path, result: dict[str, Any]) -> dict[str, Any]:
    result["summary"] = {n: aggregate(list(r.values())) for n, r in result["runs"].items() if r}
    (work / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def sweep_table(result: dict[str, Any]) -> str:
    """Markdown: one row per model (the base, then every configuration), one column per measure, "mean ± sd"."""
    summary = result["summary"]
    rows = [c for c in ["base", *result["configs"]] if c in summary]
    default = summary.get("default")
    seconds = result.get("seconds", {})
    header = ["configuration", *(f"{label} {'↑' if higher else '↓'}" for _, label, _, _, higher in MEASURES),
              "n seeds", "all 3 targets", "train s/run"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in rows:
        cells = [f"`{name}`"]
        for key, *_ in MEASURES:
            m = summary[name][key]
            cells.append(f"{m['mean']:.2f} ± {m['std']:.2f}" if key == "similarity"
                         else f"{100 * m['mean']:.0f}% ± {100 * m['std']:.0f}")
        cells.append(str(summary[name]["subject"]["n"]))
        cells.append("–" if name == "base" or not default else "yes" if meets_targets(summary[name], default) else "no")
        cells.append(f"{statistics.fmean(seconds[name]):.0f}" if seconds.get(name) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
