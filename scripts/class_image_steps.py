#!/usr/bin/env python
"""How many denoising steps class images need: the class-image generator (`training.priors`) at several step
counts, each set compared with a long-run solution from the same starting noise, on a base whose pictures can be
read (the package's Synthetic DreamBench base: shapes whose kind and colour the detectors name).

    python scripts/class_image_steps.py --out-dir bench-out/class-steps            # CPU, about a minute
    python scripts/class_image_steps.py --base /tmp/sd14 --device cuda --count 100 --steps 12,25 --timing-only
    python scripts/class_image_steps.py --scheduler unipc --steps 10   # another solver, same 100-step reference

For every step count: the share of pictures that show the prompted shape, the colour entropy and pixel diversity
of the set (a prior that keeps the class's variety), and the mean per-pixel distance to the `--reference-steps`
solution of the same index (0 = converged; the reference is always plain DPM-Solver++ 2M, so `--scheduler`
compares every solver of the same ODE, the trainer's included, against one yardstick). With `--timing-only` (any
base, e.g. the random-weight SD v1.4 on a GPU) it reports the wall time of each set only. Writes
class_image_steps.json and class_image_steps.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_dreambooth.models import load_base, prefer_flash_attention  # noqa: E402
from lora_dreambooth.training.priors import ClassImagePlan, class_image_pipeline, generate_class_images  # noqa: E402


# Multistep solvers that diffusers builds from the base's own scheduler config. None: the trainer's own solver
# (`priors.class_image_pipeline`, DPM-Solver++ 2M with Karras sigmas), taken from there so that it cannot drift from
# what training uses. The reference pictures are always REFERENCE_SCHEDULER's.
TRAINER_SCHEDULER = "trainer"
REFERENCE_SCHEDULER = "dpm-solver++"
SCHEDULERS = {
    TRAINER_SCHEDULER: None,
    REFERENCE_SCHEDULER: ("DPMSolverMultistepScheduler", {}),
    "dpm-solver++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm-solver++-3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}


def generate(base, folder: Path, *, count: int, steps: int, prompt: str, resolution: int, seed: int,
             scheduler: str = TRAINER_SCHEDULER) -> float:
    """`count` class images into `folder` exactly as a training run makes them (with `scheduler`'s solver);
    the wall time in seconds."""
    import diffusers

    def pipeline():
        if SCHEDULERS[scheduler] is None:
            return class_image_pipeline(base)
        name, options = SCHEDULERS[scheduler]
        return base.pipeline(getattr(diffusers, name).from_config(base.noise_scheduler.config, **options))

    started = time.perf_counter()
    generate_class_images(pipeline, ClassImagePlan(folder, 0, list(range(count))),
                          prompt=prompt, resolution=resolution, steps=steps, seed=seed)
    return time.perf_counter() - started


def read_set(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(folder.glob("class-*.png"))]


def quality(images: list[np.ndarray], reference: list[np.ndarray], shape: str) -> dict:
    """Detector readings of the set and its distance to the reference set (mean |pixel difference| / 255)."""
    from lora_dreambooth.synthetic.detectors import analyze, color_entropy, diversity

    found = [analyze(im.astype(np.uint8)) for im in images]
    return {"shape_accuracy": float(np.mean([d.shape == shape for d in found])),
            "color_entropy": color_entropy(d.color for d in found),
            "diversity": diversity([im.astype(np.uint8) for im in images]),
            **_distances([np.abs(a - b).mean() / 255 for a, b in zip(images, reference)])}


def _distances(per_image: list[float]) -> dict:
    """Mean, median and 90th percentile: a few pictures that settle into another composition dominate the mean."""
    return {"distance_to_reference": float(np.mean(per_image)), "distance_median": float(np.median(per_image)),
            "distance_p90": float(np.percentile(per_image, 90))}


def markdown(report: dict) -> str:
    timing_only = report["timing_only"]
    lines = [f"Base: {report['base']} on {report['device']}; {report['count']} class images of '{report['prompt']}' "
             f"at {report['resolution']} px, {report['scheduler']}, guidance 7.5 (the trainer's class-image generator)."
             + ("" if timing_only else f" Distance: mean |pixel difference| to the {report['reference_steps']}-step "
                                       "DPM-Solver++ 2M pictures of the same starting noise (0 = converged)."), ""]
    if timing_only:
        lines += ["| steps | seconds |", "|---|---|"]
        lines += [f"| {r['steps']} | {r['seconds']:.1f} |" for r in report["rows"]]
    else:
        lines += ["| steps | shape right | colour entropy (bits) | diversity | distance to reference (mean, median, "
                  "90th pct.) | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['shape_accuracy']:.1%} | {r['color_entropy']:.2f} | {r['diversity']:.3f} "
                  f"| {r['distance_to_reference']:.4f}, {r['distance_median']:.4f}, {r['distance_p90']:.4f} "
                  f"| {r['seconds']:.1f} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=None, help="diffusers folder [the shipped Synthetic DreamBench base]")
    parser.add_argument("--shape", default="triangle", help="the class (a synthetic-world shape) [triangle]")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--steps", default="6,8,10,12,15,20,25", help="step counts to compare")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--scheduler", default=TRAINER_SCHEDULER, choices=sorted(SCHEDULERS),
                        help="the solver of the compared sets [trainer: the trainer's own, DPM-Solver++ 2M Karras]")
    parser.add_argument("--resolution", type=int, default=None, help="[the base's own]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timing-only", action="store_true", help="wall time only (bases without detectors)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out/class-steps"))
    args = parser.parse_args(argv)
    if args.base is None:
        from lora_dreambooth.synthetic.pretrain import PretrainConfig, pretrained_base

        args.base, resolution = str(pretrained_base()), PretrainConfig().resolution
    else:
        resolution = 512
    resolution = args.resolution or resolution
    device = torch.device(args.device)
    prefer_flash_attention(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_base(args.base, device=device, dtype=dtype) if device.type == "cuda" else load_base(args.base)
    base.vae.to(device, torch.float32)
    prompt = f"a photo of a {args.shape}"
    step_counts = [int(s) for s in args.steps.split(",")]
    rows, sets = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in step_counts + ([] if args.timing_only else [args.reference_steps]):
            folder = Path(tmp) / f"steps-{steps}"
            is_reference = steps == args.reference_steps and not args.timing_only and steps not in step_counts
            seconds = generate(base, folder, count=args.count, steps=steps, prompt=prompt, resolution=resolution,
                               seed=0, scheduler=REFERENCE_SCHEDULER if is_reference else args.scheduler)
            sets[steps] = (folder, seconds)
            print(f"{steps} steps: {seconds:.1f} s", flush=True)
        reference = None if args.timing_only else read_set(sets[args.reference_steps][0])
        for steps in step_counts + ([] if args.timing_only else [args.reference_steps]):
            row = {"steps": steps, "seconds": sets[steps][1]}
            if not args.timing_only:
                row.update(quality(read_set(sets[steps][0]), reference, args.shape))
            rows.append(row)
    report = {"base": args.base, "device": str(device), "count": args.count, "prompt": prompt,
              "scheduler": args.scheduler,
              "resolution": resolution, "reference_steps": args.reference_steps, "timing_only": args.timing_only,
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "class_image_steps.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out_dir / "class_image_steps.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
