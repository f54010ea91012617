"""The Synthetic DreamBench: DreamBooth measured end to end, offline, in a world where the truth is known.

1. pretrain (or reuse) a tiny SD v1-layout base on the shape world (:mod:`.pretrain`);
2. write a few photos of the subject, a striped triangle the base has never drawn (:mod:`.world`);
3. train two adapters with the package's real trainer, side by side: with prior preservation through the CLI in a
   subprocess, without it through ``lora_dreambooth.train`` — same steps, rank, learning rate, targets and seed;
4. draw pictures from base / adapter / adapter without prior for the same prompts and seeds, load adapters the
   way users do (``pipe.load_lora_weights(folder)``), and read them with the detectors (:mod:`.detectors`):

* **subject fidelity** — "a photo of {token} {class}": how often the subject appears, and how close its colours are;
* **prompt fidelity** — "a photo of {token} {class} in {colour}": whether the edit is kept;
* **language drift** — "a photo of a {class}" (and its colour variants, and the other classes): class accuracy,
  how much the subject leaks in (the paper's PRES) and how varied the pictures stay (its DIV).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

from lora_dreambooth.synthetic.config import CI_CONFIG, BenchConfig, BenchResult, with_overrides
from lora_dreambooth.synthetic.detectors import reference_histogram
from lora_dreambooth.synthetic.measure import MODELS, Expectation, PromptStats, effects, measure, world_expectations
from lora_dreambooth.synthetic.pretrain import pretrained_base
from lora_dreambooth.synthetic.world import SHAPES, write_subject_photos

if TYPE_CHECKING:
    from lora_dreambooth.config import TrainConfig

logger = logging.getLogger(__name__)











# -- training through the package's real trainer ------------------------------------------------------------------
def train_config(cfg: BenchConfig, base: Path, instance_dir: Path, out: Path, **changes) -> "TrainConfig":
    """The trainer's config for one of the two adapters (``changes``: what differs between them).

    fp32 and the plain profile everywhere, so a run on a GPU measures what a CPU run does.
    """
    from lora_dreambooth import TrainConfig

    targets = {"unet_target_modules": cfg.unet_targets} if cfg.unet_targets else {}
    return TrainConfig(instance_dir=str(instance_dir), base=str(base), output_dir=str(out), token=cfg.token,
                       class_noun=cfg.class_noun, resolution=cfg.pretrain.resolution, steps=cfg.steps, rank=cfg.rank,
                       lr=cfg.lr, text_encoder_lr=cfg.text_encoder_lr, seed=cfg.seed,
                       train_text_encoder=cfg.train_text_encoder, mixed_precision="no", profile="plain",
                       overwrite=True, log_every=50, **targets, **changes)


def start_cli_training(config: "TrainConfig", threads: int) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m lora_dreambooth train --config <output>.toml`` in a subprocess using ``threads`` CPU
    threads; its output goes to ``<output>.log``. Finish with :func:`wait_for_cli_training`."""
    out = Path(config.output_dir)
    config_path, log_path = out.with_name(out.name + ".toml"), out.with_name(out.name + ".log")
    config_path.write_text(config.to_toml())
    command = [sys.executable, "-m", "lora_dreambooth", "train", "--config", str(config_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return process, log_path


def wait_for_cli_training(process: subprocess.Popen, log_path: Path) -> None:
    """Wait for :func:`start_cli_training`'s subprocess; a failure raises with the end of its log."""
    if process.wait() != 0:
        raise RuntimeError(f"lora-dreambooth train failed (exit {process.returncode}):\n"
                           f"{log_path.read_text()[-3000:]}")


def train_with_api(config: "TrainConfig") -> None:
    """Train one adapter in this process through ``lora_dreambooth.train(config)``."""
    from lora_dreambooth import train

    with contextlib.redirect_stderr(io.StringIO()):  # the trainer's progress bar; errors still raise
        train(config)


def train_both(cfg: BenchConfig, base: Path, instance_dir: Path, adapters: dict[str, Path], class_dir: Path) -> None:
    """Train the two adapters at the same time, each on half of this process's CPU threads: with prior
    preservation through the CLI (a subprocess), without it through the Python API (here)."""
    import torch

    with_prior = train_config(cfg, base, instance_dir, adapters["adapter"], prior=True, prior_weight=cfg.prior_weight,
                              class_dir=str(class_dir), num_class_images=cfg.num_class_images,
                              class_prompt="a photo of a {class}", class_inference_steps=cfg.class_inference_steps)
    without_prior = train_config(cfg, base, instance_dir, adapters["adapter_no_prior"], prior=False)
    threads = torch.get_num_threads()
    cli_threads = max(1, threads // 2)
    process, log_path = start_cli_training(with_prior, cli_threads)
    try:
        torch.set_num_threads(max(1, threads - cli_threads))
        train_with_api(without_prior)
    except BaseException:
        process.kill()
        raise
    finally:
        torch.set_num_threads(threads)
    wait_for_cli_training(process, log_path)


# -- measuring ----------------------------------------------------------------------------------------------------
def prompt_families(cfg: BenchConfig) -> dict[str, list[Expectation]]:
    """What each model is asked to draw, one list of expectations per measured family."""
    n, noun, token = cfg.samples, cfg.class_noun, cfg.token
    edits = [cfg.edit_colors[i % len(cfg.edit_colors)] for i in range(n)]
    others = [s for s in SHAPES if s != noun]
    return {
        "subject": [Expectation(cfg.instance_prompt, noun)] * n,
        "edit": [Expectation(f"a photo of {token} {noun} in {c}", noun, c) for c in edits],
        "class": [Expectation(cfg.class_prompt, noun)] * n,
        "class_color": world_expectations(cfg.world_repeats, shapes=[noun]),
        "other_classes": world_expectations(cfg.world_repeats, shapes=others),
    }


def load_pipeline(base: Path, adapter_dir: Path | None, device: str = "cpu"):
    """The base as users load it, plus an adapter through plain diffusers ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base).to(device)
    pipe.set_progress_bar_config(disable=True)
    if adapter_dir is not None:
        pipe.load_lora_weights(adapter_dir)
    return pipe


def measure_model(pipe, cfg: BenchConfig, subject_histogram: dict[str, float]
                  ) -> tuple[dict[str, PromptStats], dict[str, list[Image.Image]]]:
    """Every family's statistics for one model, and its pictures (for the grid)."""
    stats, pictures = {}, {}
    for offset, (family, expectations) in enumerate(prompt_families(cfg).items()):
        stats[family], pictures[family] = measure(pipe, family, expectations, cfg.sampler, subject_histogram,
                                                  seed_offset=1000 * offset)
    return stats, pictures


# -- the run ------------------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, work_dir: str | Path, *, cache_root: str | Path | None = None,
              log: Callable[[str], None] = logger.info, device: str = "cpu",
              from_scratch: bool = False) -> BenchResult:
    """Pretrain (or reuse) the base, train both adapters, measure all three models, write table, JSON and grid."""
    from lora_dreambooth.synthetic.report import write_grid, write_markdown

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now
        log(f"{name}: {seconds[name]:.1f} s")

    base = pretrained_base(cfg.pretrain, cache_root, log, device, from_scratch=from_scratch)
    lap("pretrain_base")
    subject_dir = work / "subject"
    photos = [Image.open(p).convert("RGB") for p in
              write_subject_photos(subject_dir, cfg.subject_photos, cfg.pretrain.resolution, seed=cfg.seed,
                                     size=cfg.subject_size)]
    adapters = {"adapter": work / "adapter", "adapter_no_prior": work / "adapter-no-prior"}
    train_both(cfg, base, subject_dir, adapters, work / "class-images")
    lap("train_adapters")
    subject_histogram = reference_histogram(photos)
    stats, pictures = {}, {}
    for model in MODELS:
        pipe = load_pipeline(base, adapters.get(model), device)
        stats[model], pictures[model] = measure_model(pipe, cfg, subject_histogram)
        lap(f"measure_{model}")
    seconds["total"] = time.perf_counter() - started
    result = BenchResult(stats=stats, seconds=seconds, base_dir=base)
    result.files["json"] = work / "synthetic_dreambench.json"
    result.files["json"].write_text(json.dumps(result.to_json(cfg), indent=2) + "\n")
    result.files["markdown"] = write_markdown(result, cfg, work / "synthetic_dreambench.md")
    result.files["grid"] = write_grid(photos, pictures, cfg, work / "synthetic_dreambench.png")
    return result


__all__ = ["BenchConfig", "BenchResult", "CI_CONFIG", "run_bench", "effects", "prompt_families", "with_overrides"]
