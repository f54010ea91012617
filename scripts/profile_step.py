#!/usr/bin/env python
"""Where one training step's GPU time goes: kernels by kind for the R2 fast step, as shipped and with one lever off.

    python scripts/make_random_sd.py /tmp/sd14 --vocab bpe_simple_vocab_16e6.txt.gz --device cuda
    python scripts/profile_step.py --base /tmp/sd14 [--variants shipped,peft,torch-gn] [--top 14] [--ops 40]

Builds our recipe on the R2 setting (512 px, rank 4, text encoder trained, 1 instance + 1 class image a step, fast
profile, bf16), runs 3 eager steps, then profiles one more eager step (the work a CUDA graph replays) with
torch.profiler, once per variant: `shipped`, `peft` (peft's own forward instead of the fused LoRA update,
`adapters/fused_lora.py`), `torch-gn` (torch's NCHW GroupNorm instead of the NHWC kernel, `kernels/group_norm.py`)
and bench_train.py's other plan probes. Prints the kernel count and GPU milliseconds per kind, with `--top` the most
expensive kernels overall and among copies and elementwise kernels, and with `--ops` the operators (by input shapes)
with the most GPU time of their own.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import PLAN_PROBES, make_photos, plan_probe  # noqa: E402
from lora_dreambooth import TrainConfig  # noqa: E402
from lora_dreambooth.training.recipe import DreamBoothRecipe  # noqa: E402

# matched in order: Hopper's flash-attention and cuDNN kernel names also contain "cutlass"/"sm90"
KINDS = [("attention", ("flash", "fmha", "attention")), ("norm", ("norm", "welford", "moments")),
         ("matmul + conv", ("gemm", "cutlass", "sm90", "sm80", "xmma", "cublas", "splitk", "conv", "cudnn")),
         ("adam", ("adam",)), ("copy/cast", ("copy", "cast", "convert", "memcpy"))]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, words in KINDS if any(w in name for w in words)), "elementwise/other")


# variant -> (label, ExecutionPlan fields it changes): bench_train.py's plan probes
LABELS = {"shipped": "as shipped", "peft": "peft's forward", "torch-gn": "torch's NCHW GroupNorm",
          "torch-geglu": "diffusers' GEGLU gate", "flash-top": "flash attention at 64x64"}
VARIANTS = {name: (LABELS.get(name, name), fields) for name, fields in {"shipped": {}, **PLAN_PROBES}.items()}


def profile_one_step(base: str, work: Path, variant: str, ops: int = 0) -> list[tuple[str, float]]:
    """(kernel name, GPU ms) of the 4th R2 fast step of one variant; with `ops`, first prints that many aten
    operators (grouped by input shapes) with the most GPU time of their own."""
    recipe_class = plan_probe(DreamBoothRecipe, VARIANTS[variant][1])
    instance, classes = make_photos(work / "instance", 4, 512, 1), make_photos(work / "class", 8, 512, 2, "class")
    cfg = TrainConfig(instance_dir=str(instance), base=base, token="sks", class_noun="dog", class_dir=str(classes),
                      output_dir=str(work / f"out-{variant}"), num_class_images=8, resolution=512, steps=20, rank=4,
                      batch_size=1, lr=1e-4, mixed_precision="bf16", seed=0, overwrite=True, train_text_encoder=True,
                      prior=True, profile="fast", optimizer="adamw", gradient_checkpointing=False)
    recipe = recipe_class(cfg)
    recipe.setup()
    step = recipe.graph.micro.step  # the whole step, uncaptured: forward, backward, clipping, AdamW
    batches = recipe.batches

    def inputs(index: int):
        latents, rows = batches.batch(index)
        noise, timesteps = batches.noise(latents, index)
        return latents, noise, timesteps, rows

    for index in range(3):
        step(*inputs(index))
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA] + [torch.profiler.ProfilerActivity.CPU] * bool(ops)
    with torch.profiler.profile(activities=activities, record_shapes=bool(ops)) as prof:
        step(*inputs(3))
        torch.cuda.synchronize()
    kernels = [(e.name, e.device_time_total / 1000) for e in prof.events()  # not the ranges of record_function
               if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    if ops:
        print(f"  {variant}: the {ops} operators (by input shapes) with the most GPU time of their own:")
        rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
        for e in sorted(rows, key=lambda e: -e.self_device_time_total)[:ops]:
            print(f"    {e.count:5d} {e.self_device_time_total / 1000:6.2f} ms  {e.key} {str(e.input_shapes)[:150]}")
    recipe.accelerator.end_training()
    del recipe
    torch.cuda.empty_cache()
    return kernels


def report(label: str, kernels: list[tuple[str, float]], top: int) -> None:
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, ms in kernels:
        for table, key in ((by_kind, kind_of(name)), (by_name, name[:110])):
            table[key][0] += 1
            table[key][1] += ms
    print(f"{label}: {len(kernels)} kernels, {sum(ms for _, ms in kernels):.2f} ms of GPU time")
    for kind, (count, ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:20s} {count:5d} {ms:7.2f} ms")
    if top:
        print("  costliest kernels of any kind:")
        for name, (count, ms) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"    {count:5d} {ms:6.2f} ms  {name}")
        print("  costliest copy/elementwise kernels:")
    copies = [(n, v) for n, v in by_name.items() if kind_of(n) in ("copy/cast", "elementwise/other")]
    for name, (count, ms) in sorted(copies, key=lambda kv: -kv[1][1])[:top]:
        print(f"    {count:5d} {ms:6.2f} ms  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="diffusers folder (scripts/make_random_sd.py writes one)")
    parser.add_argument("--top", type=int, default=0,
                        help="also list the N costliest kernels, and the N costliest copy/elementwise ones")
    parser.add_argument("--ops", type=int, default=0,
                        help="also list the N operators, by input shapes, with the most GPU time of their own")
    parser.add_argument("--variants", default="shipped,peft", help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="profile-step-"))
    for variant in variants:
        report(VARIANTS[variant][0], profile_one_step(args.base, work, variant, args.ops), args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
