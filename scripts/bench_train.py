#!/usr/bin/env python
"""Training speed and memory of OUR recipe on the SD v1.4 architecture (random weights) at 512 px, on a GPU.

    python scripts/make_random_sd.py /tmp/sd14 --vocab bpe_simple_vocab_16e6.txt.gz
    python scripts/bench_train.py --base /tmp/sd14 --out-dir bench-out [--settings R1,R2,R3]
        [--profiles plain,fast,low-memory,fast+ckpt] [--warmup 10 --steps 40] [--compile]

Settings mirror the reference figures of diffusers' train_dreambooth_lora.py (FIELD-NOTES.md, issue 4):
R1 = UNet LoRA only, no prior, gradient checkpointing + 8-bit Adam; R2 = R1 + text-encoder LoRA + prior
preservation (1 instance + 1 class image a step); R3 = UNet only, no checkpointing, AdamW. All at rank 4, batch 1,
bf16 compute with fp32 adapters. The `plain` profile runs each setting's own options through our eager path;
`fast` and `low-memory` choose their own execution (they use AdamW: 8-bit Adam saves under 7 MB for LoRA and
cannot be captured), so R1 and R3 are one configuration for them and are measured once ("R1/R3").

For each run: setup time, steady-state it/s (optimizer steps after `--warmup` steps, timed to the end of
`recipe.train()`, host syncs included), `torch.cuda.max_memory_allocated` over the loop and over the whole
run (setup's VAE encoding included), and the planner's predicted peak. A calibration loop (FIELD-NOTES:
UNet-only LoRA, bf16 UNet, random inputs on the GPU, fused AdamW, eager, batch 1) runs in the same process so
hosts can be compared: the reference's R2 speed is about 0.28 x the calibration figure.
Writes bench_train.json and bench_train.md into --out-dir (and the R2 adapters, for bench_inference.py, under
--adapter-dir).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_dreambooth import TrainConfig  # noqa: E402
from lora_dreambooth.training.recipe import DreamBoothRecipe  # noqa: E402

GIB = 1 << 30
# diffusers' train_dreambooth_lora.py on an H100 (FIELD-NOTES.md "GPU reference"): it/s, peak allocated GiB
REFERENCE = {"R1": (2.67, 2.47), "R2": (2.08, 2.86), "R3": (4.82, 3.19)}
REFERENCE_R2_PER_CALIBRATION = 0.28  # measured on two H100 hosts: 0.278 and 0.282
SETTINGS = {
    "R1": dict(train_text_encoder=False, prior=False, gradient_checkpointing=True, optimizer="adamw8bit"),
    "R2": dict(train_text_encoder=True, prior=True, gradient_checkpointing=True, optimizer="adamw8bit"),
    "R3": dict(train_text_encoder=False, prior=False, gradient_checkpointing=False, optimizer="adamw"),
}
PROFILES = {  # what each profile changes in a setting's options
    "plain": dict(profile="plain"),
    "fast": dict(profile="fast", optimizer="adamw", gradient_checkpointing=False),
    "fast+ckpt": dict(profile="fast", optimizer="adamw", gradient_checkpointing=True),
    "low-memory": dict(profile="low-memory", optimizer="adamw", gradient_checkpointing=False),
}


class TimedRecipe(DreamBoothRecipe):
    """Our recipe, with a clock started (after a device sync) when micro-step `mark` begins."""

    mark = 0
    started: float | None = None

    def _micro_step(self, micro_index: int) -> torch.Tensor:
        if micro_index == self.mark:
            torch.cuda.synchronize()
            self.started = time.perf_counter()
        return super()._micro_step(micro_index)


class ContiguousRecipe(TimedRecipe):
    """Probe: the fast profile with the UNet left in the default (NCHW) memory format instead of channels-last."""

    def _inject_adapters(self) -> None:
        super()._inject_adapters()
        self.base.unet.to(memory_format=torch.contiguous_format)


# probe -> the ExecutionPlan fields it changes: one lever at a time against the shipped plan (profile_step.py
# profiles the same probes)
PLAN_PROBES = {"peft": {"fused_adapters": False},  # peft's own LoRA forward, not the fused update (fused_lora.py)
               "unfolded": {"fused_base_linear": False},  # the fused update after the base layer, not with it
               # weight gradients returned to autograd, which adds them into the static buffers
               "grads-returned": {"adapter_grads_in_place": False},
               "torch-gn": {"channels_last_norms": False},  # torch's NCHW GroupNorm, not the NHWC kernel
               "apart-silu": {"resnet_norms_with_silu": False},  # resnet blocks' SiLU after the NHWC norm, apart
               # diffusers' transformer-block output: tokens made NCHW-contiguous before proj_out
               "diffusers-layout": {"channels_last_outputs": False},
               # the full-resolution self-attention on flash attention (torch's choice), not cuDNN's kernel
               "flash-top": {"top_attention": "flash"},
               # cuDNN's kernel for the self-attention of the two highest-resolution levels, not only the first
               "cudnn-top2": {"top_attention_levels": 2}, "cudnn-top-cross": {"top_attention_cross": True},
               "torch-geglu": {"fused_geglu": False},  # diffusers' chunk, GELU and product, not the GEGLU kernel
               # each attention layer's q, k, v LoRA projections as separate fused layers, not stacked in one node
               # (fused_projections.py): in the UNet and the text encoder, or in the text encoder only
               "separate-qkv": {"fused_qkv": False, "fused_text_qkv": False},
               "separate-text-qkv": {"fused_text_qkv": False}}


def plan_probe(base: type, overrides: dict) -> type:
    """`base` (a recipe class) with `overrides` applied to the plan it chooses."""

    class PlanProbe(base):
        def _choose_plan(self):
            return dataclasses.replace(super()._choose_plan(), **overrides)

    return PlanProbe


PROBES = {"nchw": ContiguousRecipe, **{name: plan_probe(TimedRecipe, fields) for name, fields in PLAN_PROBES.items()}}


def make_photos(folder: Path, count: int, size: int, seed: int, prefix: str = "photo") -> Path:
    """Smooth random RGB pictures (not zeros, not white noise), written as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{prefix}-{i:05d}.png")
    return folder


def calibration_its(base: str, warmup: int = 10, steps: int = 50) -> float:
    """FIELD-NOTES' calibration loop: UNet-only LoRA r4, bf16 UNet, random 1x4x64x64 latents and 1x77x768 text."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").to("cuda", torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    latents = torch.randn(1, 4, 64, 64, device="cuda")
    text = torch.randn(1, 77, 768, device="cuda", dtype=torch.bfloat16)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet((latents + noise).to(torch.bfloat16), t, text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - start)
    del unet, optimizer, params
    _release()
    return rate


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_one(setting: str, profile: str, args: argparse.Namespace, data: dict[str, Path], work: Path) -> dict:
    """Train `warmup + steps` steps of one (setting, profile) and measure it."""
    options = {**SETTINGS[setting], **PROFILES[profile.split(":")[0]]}
    label = f"{setting}-{profile}".replace("+", "-").replace(":", "-")
    cfg = TrainConfig(instance_dir=str(data["instance"]), base=args.base, token="sks", class_noun="dog",
                      output_dir=str(work / label), class_dir=str(data["class"]), num_class_images=args.class_images,
                      resolution=args.resolution, steps=args.warmup + args.steps, rank=4, batch_size=1, lr=1e-4,
                      mixed_precision=args.mixed_precision, seed=0, compile=args.compile, overwrite=True, **options)
    recipe_class = PROBES.get(profile.partition(":")[2], TimedRecipe)
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    recipe = recipe_class(cfg)
    recipe.mark = args.warmup
    recipe.setup()
    setup_s = time.perf_counter() - started
    setup_peak = torch.cuda.max_memory_allocated() - baseline
    torch.cuda.reset_peak_memory_stats()
    result = recipe.train()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - recipe.started
    loop_peak = torch.cuda.max_memory_allocated() - baseline
    row = {
        "setting": setting, "profile": profile, "its": args.steps / elapsed,
        "plan": recipe.plan.label.replace(", channels-last", "" if recipe_class is ContiguousRecipe
                                          else ", channels-last"),
        "setup_s": setup_s, "peak_loop_gib": loop_peak / GIB, "peak_run_gib": max(setup_peak, loop_peak) / GIB,
        "peak_setup_gib": setup_peak / GIB, "predicted_gib": (recipe.plan.predicted_bytes or 0) / GIB,
        "last_loss": result.last_loss, "skipped_steps": result.skipped_steps, "steps_timed": args.steps,
        "mixed_precision": args.mixed_precision, "graph_captured": bool(
            getattr(recipe.step_runner, "replaying", False)),
    }
    if setting == "R2" and ":" not in profile:
        recipe.cfg = cfg.replace(output_dir=str((args.adapter_dir or args.out_dir / "adapters") / label))
        recipe.out = Path(recipe.cfg.output_dir)
        recipe.out.mkdir(parents=True, exist_ok=True)
        recipe.save(result)
    else:
        recipe.accelerator.end_training()
    recipe.accelerator.free_memory()
    del recipe
    _release()
    row["leftover_mib"] = (torch.cuda.memory_allocated() - baseline) / (1 << 20)
    print(f"  {setting:<5} {profile:<14} {row['plan']:<46} {row['its']:6.2f} it/s  loop peak "
          f"{row['peak_loop_gib']:.2f} GiB (predicted {row['predicted_gib']:.2f}), run peak "
          f"{row['peak_run_gib']:.2f} GiB, setup {setup_s:.1f} s", flush=True)
    return row


def host_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / GIB, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "python": platform.python_version()}


def markdown(rows: list[dict], calibration: float, host: dict, args: argparse.Namespace) -> str:
    reference_r2 = REFERENCE_R2_PER_CALIBRATION * calibration
    lines = [
        f"GPU: {host['gpu']} ({host['gpu_memory_gib']} GiB), torch {host['torch']} (CUDA {host['cuda']}), "
        f"{host['cpu_count']} CPU cores. {args.resolution} px, rank 4, batch 1 (+1 class image in R2), "
        f"{args.mixed_precision} compute, "
        f"fp32 adapters; it/s over {args.steps} steps after {args.warmup} warm-up steps.",
        "",
        f"Calibration loop on this host: **{calibration:.2f} it/s** (FIELD-NOTES hosts: 7.47 and 5.58). Predicted "
        f"reference R2 here: 0.28 x {calibration:.2f} = {reference_r2:.2f} it/s, so the 4x target is "
        f"{4 * reference_r2:.2f} it/s.",
        "",
        "| setting | profile | what ran | it/s | x reference | x calibration | loop peak GiB | run peak GiB "
        "| predicted GiB | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref_key = "R1" if r["setting"].startswith("R1") else r["setting"]
        ref = REFERENCE[ref_key][0] if ref_key in REFERENCE else float("nan")
        lines.append(f"| {r['setting']} | {r['profile']} | {r['plan']} | {r['its']:.2f} | {r['its'] / ref:.1f} "
                     f"| {r['its'] / calibration:.2f} | {r['peak_loop_gib']:.2f} | {r['peak_run_gib']:.2f} "
                     f"| {r['predicted_gib']:.2f} | {r['setup_s']:.1f} |")
    lines += ["", "Reference (diffusers train_dreambooth_lora.py, H100, fp16): "
              + ", ".join(f"{k} {v[0]} it/s / {v[1]} GiB" for k, v in REFERENCE.items())
              + ". 'x reference' divides by those fixed figures; 'x calibration' compares across hosts "
                "(reference R2 = 0.28, R1 = 0.36-0.42, R3 = 0.65-0.73)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="diffusers folder (scripts/make_random_sd.py writes one)")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--settings", default="R1,R2,R3")
    parser.add_argument("--profiles", default="plain,fast,low-memory",
                        help="comma list of plain, fast, fast+ckpt, low-memory; 'fast:PROBE' runs fast with one "
                             f"lever changed, PROBE one of {', '.join(PROBES)} (nchw: no channels-last; the others: "
                             "PLAN_PROBES in this script)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--adapter-dir", type=Path, help="where the R2 adapters go [OUT_DIR/adapters]")
    parser.add_argument("--compile", action="store_true", help="also pass --compile to the recipe")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"),
                        help="compute precision of every run (fp16: what a T4 or V100 runs, with loss scaling)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.profiles.split(",") if p.partition(":")[2] and p.partition(":")[2] not in PROBES]
    if unknown:  # a misspelt probe would otherwise measure the shipped plan under the probe's name
        parser.error(f"unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBES)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    host = host_info()
    print(f"host: {host}", flush=True)
    calibration = float("nan") if args.no_calibration else calibration_its(args.base)
    print(f"calibration loop: {calibration:.2f} it/s -> predicted reference R2 here "
          f"{REFERENCE_R2_PER_CALIBRATION * calibration:.2f} it/s, 4x target {4 * 0.28 * calibration:.2f} it/s",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {"instance": make_photos(work / "instance", 4, args.resolution, 1),
                "class": make_photos(work / "class", args.class_images, args.resolution, 2, prefix="class")}
        for setting in args.settings.split(","):
            for profile in args.profiles.split(","):
                base_profile = profile.split(":")[0]
                if base_profile != "plain" and setting == "R1" and "R3" in args.settings:
                    continue  # R1 and R3 differ only in options that fast/low-memory choose themselves
                name = "R1/R3" if base_profile != "plain" and setting in ("R1", "R3") else setting
                row = run_one(setting, profile, args, data, work)
                row["setting"] = name
                rows.append(row)
    (args.out_dir / "bench_train.json").write_text(json.dumps(
        {"host": host, "calibration_its": calibration, "args": {k: str(v) for k, v in vars(args).items()},
         "rows": rows}, indent=2))
    table = markdown(rows, calibration, host, args)
    (args.out_dir / "bench_train.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
