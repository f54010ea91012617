#!/usr/bin/env python
"""Time to adapter: the whole `lora-dreambooth train` command, end to end, split by phase; optionally diffusers'
reference script on the same base and photos in the same call.

    python scripts/make_random_sd.py /tmp/sd14 --device cuda
    python scripts/bench_e2e.py --base /tmp/sd14 --photos PHOTOS --out-dir bench-e2e \\
        [--reference train_dreambooth_lora.py --reference-steps 60] [--runs default,compile,compile]

The seed's setting: the photos at 512 px, the text encoder trained, prior preservation with 100 class images
generated in the run (a fresh class-image cache per run unless `--share-cache`), 1800 steps, every other option at
its default. Each of our runs is one CLI subprocess; its wall time is split by the phases the command logs at the
end (`phases: base load ..., total ...`), plus "start-up" (Python, imports, checks: wall time before the recipe's
clock starts) and "exit" (from the phase summary line until the process has ended). `--runs` names our runs:
`default` (no extra flags), `compile` (`--compile`), each optionally with its own step count (`compile:300`: the
loop rate and compile cost without a full run); a second `compile` in one call with `--share-cache` shows the warm
compiler cache.

`--reference PATH` runs a user's copy of diffusers' examples/dreambooth/train_dreambooth_lora.py (never shipped)
on the same base and photos, same setting (fp16 as its README runs it; its class images at its defaults: 50
steps, 4 at a time). Its phases come from the time stamps of its own output (class-image bar, "Running training",
its step bar). `--reference-steps N` runs N steps instead of all: its loop is then rated over the steps after the
10th and extrapolated to the full count (marked as such).

Writes bench_e2e.json and bench_e2e.md into --out-dir (and each run's log), prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_dreambooth.training.phases import SUMMARY_PREFIX, parse_summary  # noqa: E402

TOKEN, CLASS_NOUN = "sks", "dog"
RUN_FLAGS = {"default": [], "compile": ["--compile"], "no-latent-cache": ["--no-latent-cache"]}
REF_RATE_FROM_STEP = 10  # the reference's first steps include its warm-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--base", required=True, help="an SD v1.x diffusers folder (e.g. from make_random_sd.py)")
    parser.add_argument("--photos", required=True, help="folder of the instance photos")
    parser.add_argument("--out-dir", required=True, help="where runs, logs, bench_e2e.json and bench_e2e.md go")
    parser.add_argument("--steps", type=int, default=1800, help="training steps [1800, the seed's setting]")
    parser.add_argument("--num-class-images", type=int, default=100, help="class images generated [100]")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--runs", default="default", help=f"our runs, comma-separated, of {sorted(RUN_FLAGS)}")
    parser.add_argument("--share-cache", action="store_true",
                        help="one class-image, latent and compiler cache for all our runs (later runs reuse class images "
                             "and latents)")
    parser.add_argument("--extra", default="", help="extra flags for every one of our runs, e.g. '--log-every 50'")
    parser.add_argument("--reference", default=None, help="path to diffusers' train_dreambooth_lora.py")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="run the reference for this many steps and extrapolate its loop to --steps")
    parser.add_argument("--reference-precision", default="fp16", choices=["fp16", "bf16", "no"])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    return parser.parse_args(argv)


# -- running a command with time-stamped output -------------------------------------------------------------------
def run_timed(cmd: list[str], log_path: Path, env: dict, timeout: float) -> tuple[float, int, list[tuple[float, str]]]:
    """Run `cmd`; return (wall seconds, exit code, [(seconds since start, text)] for every line or bar redraw)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    events: list[tuple[float, str]] = []

    def reader() -> None:
        buffer = b""
        with log_path.open("wb") as log:
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                now = time.perf_counter() - start
                buffer += chunk
                *done, buffer = re.split(rb"[\r\n]", buffer)
                events.extend((now, piece.decode("utf-8", "replace")) for piece in done if piece.strip())
        if buffer.strip():
            events.append((time.perf_counter() - start, buffer.decode("utf-8", "replace")))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -9
    thread.join()
    return time.perf_counter() - start, code, events


# -- ours -----------------------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, spec: str, index: int, out: Path) -> dict:
    label, _, own_steps = spec.partition(":")
    steps = int(own_steps) if own_steps else args.steps
    flags = RUN_FLAGS[label]
    name = f"ours-{index}-{label}-{steps}"
    cache = out / ("cache" if args.share_cache else f"cache-{name}")
    cmd = [sys.executable, "-m", "lora_dreambooth", "train", args.photos, "--base", args.base, "--token", TOKEN,
           "--class-noun", CLASS_NOUN, "--output", str(out / name), "--steps", str(steps),
           "--num-class-images", str(args.num_class_images), "--resolution", str(args.resolution), "--overwrite",
           *flags, *args.extra.split()]
    env = {**os.environ, "LORA_DREAMBOOTH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    wall, code, events = run_timed(cmd, out / f"{name}.log", env, args.timeout)
    summary_at, summary = next(((at, text) for at, text in reversed(events) if SUMMARY_PREFIX in text), (wall, None))
    phases = parse_summary(summary) if summary else {}
    result = {"run": name, "flags": flags + args.extra.split(), "steps": steps, "exit_code": code,
              "wall_s": round(wall, 2), "phases_s": phases,
              "plan": next((t for _, t in events if t.startswith("profile: ")), None)}
    if phases:
        startup = round(summary_at - phases["total"], 2)
        recipe_phases = {k: v for k, v in phases.items() if k != "total"}
        result["phases_s"] = {"start-up (python, imports, checks)": startup, **recipe_phases,
                              "exit": round(wall - summary_at, 2), "total": phases["total"]}
        warm = next((k for k in phases if "warm-up" in k or "compile" in k), None)
        warm_steps = (4 if "graph" in warm else 2) if warm else 0  # GRAPH_WARMUP_STEPS + the capturing step
        if phases.get("loop"):
            result["loop_its"] = round((steps - warm_steps) / phases["loop"], 2)
        setup = sum(v for k, v in phases.items() if k not in ("loop", "save", "total", warm))
        result["before_first_step_s"] = round(startup + setup, 2)
    return result


# -- the reference --------------------------------------------------------------------------------------------------
def run_reference(args: argparse.Namespace, out: Path) -> dict:
    steps = args.reference_steps or args.steps
    ref_out = out / "reference"
    cmd = [sys.executable, args.reference, "--pretrained_model_name_or_path", args.base,
           "--instance_data_dir", args.photos, "--instance_prompt", f"a photo of {TOKEN} {CLASS_NOUN}",
           "--class_data_dir", str(out / "reference-class"), "--class_prompt", f"a photo of {CLASS_NOUN}",
           "--with_prior_preservation", "--num_class_images", str(args.num_class_images), "--train_text_encoder",
           "--resolution", str(args.resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
           "--learning_rate", "1e-4", "--output_dir", str(ref_out), "--seed", "0"]
    if args.reference_precision != "no":
        cmd += ["--mixed_precision", args.reference_precision]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "WANDB_DISABLED": "true"}
    wall, code, events = run_timed(cmd, out / "reference.log", env, args.timeout)
    return {"run": "reference", "exit_code": code, "wall_s": round(wall, 2), "steps_run": steps,
            **reference_phases(events, wall, steps, args.steps)}


def reference_phases(events: list[tuple[float, str]], wall: float, steps_run: int, steps_full: int) -> dict:
    """Phases from the reference's time-stamped output: its class-image bar, 'Running training', its step bar."""
    gen = [t for t, text in events if "Generating class images" in text]
    running = next((t for t, text in events if "Running training" in text), None)
    step_marks = []
    for t, text in events:
        match = re.search(r"Steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", text)
        if match and int(match.group(2)) == steps_run:
            step_marks.append((t, int(match.group(1))))
    if not step_marks or running is None:
        return {"phases_s": {}, "error": "could not find the reference's step bar in its output"}
    first_step = next((t for t, k in step_marks if k >= 1), step_marks[-1][0])
    last_t, last_k = max(step_marks, key=lambda m: (m[1], m[0]))
    after = [(t, k) for t, k in step_marks if k >= REF_RATE_FROM_STEP]
    t0, k0 = after[0] if after and after[0][1] < last_k else step_marks[0]
    rate = (last_k - k0) / (last_t - t0) if last_t > t0 else None
    gen_start, gen_end = (gen[0], gen[-1]) if gen else (None, None)
    phases = {"load + start-up (before class images)": gen_start if gen else None,
              "class images": (gen_end - gen_start) if gen else 0.0,
              "setup (models, data)": first_step - (gen_end if gen else 0.0),
              f"loop ({last_k} steps measured)": last_t - first_step,
              "save + final pipeline load": wall - last_t}
    result = {"phases_s": {k: round(v, 2) for k, v in phases.items() if v is not None}, "loop_its": round(rate, 3)
              if rate else None, "before_first_step_s": round(first_step, 2)}
    if rate and steps_run != steps_full:
        loop_full = steps_full / rate
        result["extrapolated"] = {"steps": steps_full, "loop_s": round(loop_full, 1),
                                  "total_s": round(first_step + loop_full + (wall - last_t), 1)}
    return result


# -- report ---------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            # pip writes bytecode at install; without it (PYTHONDONTWRITEBYTECODE, --no-compile installs) every
            # run compiles the libraries' sources again: ~15 s more start-up on the lent H200, ours and the reference's
            "bytecode_written": not sys.flags.dont_write_bytecode}
    if sys.flags.dont_write_bytecode:
        print("warning: PYTHONDONTWRITEBYTECODE is set: imports compile from source in every run (unlike a pip "
              "install); unset it and run `python -m compileall` on site-packages for a user's start-up", flush=True)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def markdown(report: dict) -> str:
    bytecode = "yes" if report["env"].get("bytecode_written") else "no"
    lines = [f"GPU: {report['env'].get('gpu', 'none')}; torch {report['env']['torch']}; "
             f"bytecode cached: {bytecode}; setting: {report['setting']}", ""]
    for run in report["runs"]:
        total = run.get("extrapolated", {}).get("total_s", run["wall_s"])
        note = " (loop extrapolated from the steps run)" if "extrapolated" in run else ""
        flags = " ".join(run.get("flags", []))
        lines.append(f"### {run['run']} {flags}: {total:.1f} s{note}, exit {run['exit_code']}")
        if run.get("plan"):
            lines.append(f"{run['plan']}")
        lines += ["", "| phase | seconds |", "|---|---|"]
        lines += [f"| {name} | {value:.1f} |" for name, value in run.get("phases_s", {}).items()]
        lines.append(f"| **wall (measured)** | **{run['wall_s']:.1f}** |")
        if "extrapolated" in run:
            ex = run["extrapolated"]
            lines.append(f"| loop at {ex['steps']} steps (extrapolated) | {ex['loop_s']:.1f} |")
            lines.append(f"| **total at {ex['steps']} steps (extrapolated)** | **{ex['total_s']:.1f}** |")
        lines.append(f"| before the first step | {run.get('before_first_step_s', float('nan')):.1f} |")
        lines.append(f"| loop it/s | {run.get('loop_its') or float('nan'):.2f} |")
        lines.append("")
    ours = [r for r in report["runs"] if r["run"].startswith("ours") and r["exit_code"] == 0]
    ref = next((r for r in report["runs"] if r["run"] == "reference"), None)
    if ref and ours:
        ref_total = ref.get("extrapolated", {}).get("total_s", ref["wall_s"])
        lines.append("| run | total s | x reference |")
        lines.append("|---|---|---|")
        lines += [f"| {r['run']} | {r['wall_s']:.1f} | {ref_total / r['wall_s']:.1f}x |" for r in ours]
        lines.append(f"| reference | {ref_total:.1f} | 1.0x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [label for label in args.runs.split(",") if label]
    unknown = [label for label in labels if label.partition(":")[0] not in RUN_FLAGS]
    if unknown:
        sys.exit(f"Error: unknown run(s) {unknown}; choose from {sorted(RUN_FLAGS)}")
    report = {"env": environment(), "setting": (
        f"{len(list(Path(args.photos).iterdir()))} files in {args.photos}, {args.resolution} px, text encoder "
        f"trained, prior preservation with {args.num_class_images} class images generated, {args.steps} steps"),
        "runs": []}
    for index, label in enumerate(labels):
        report["runs"].append(run_ours(args, label, index, out))
        print(json.dumps(report["runs"][-1]), flush=True)
    if args.reference:
        report["runs"].append(run_reference(args, out))
        print(json.dumps(report["runs"][-1]), flush=True)
    (out / "bench_e2e.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "bench_e2e.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
