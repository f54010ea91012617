#!/usr/bin/env python
"""Inference with trained adapters on a GPU: subject switch time and 25-step 512 px generation speed.

    python scripts/bench_inference.py --base /tmp/sd14 --adapters bench-out/adapters/* --out-dir bench-out

Loads every adapter folder as a resident adapter (`load_lora_weights(..., adapter_name=...)`), times
`set_adapters` switches between them (what the app does when you pick another subject), then times one image
(25 steps, 512 px, classifier-free guidance, fp16) for: the base pipeline before any adapter is loaded, an active
unfused adapter, the adapter fused into the weights with peft's wrappers still in place (`fuse_lora`, can be
undone), fused with the wrappers bypassed (`lora_dreambooth.training.graph.bypass_merged_adapters`, can be undone), and
fused then unloaded (`fuse_lora` + `unload_lora_weights`, wrappers gone for good). Writes bench_inference.json
and bench_inference.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_dreambooth.adapters.fusing import bypass_merged_adapters  # noqa: E402

PROMPT = "a photo of sks dog on the beach"


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def image(pipe, steps: int = 25, size: int = 512):
    """One image as a float array (fixed seed)."""
    return pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cuda").manual_seed(0)).images[0]


def generation_seconds(pipe, steps: int, size: int, repeats: int) -> float:
    """Median seconds for one image (after one warm-up image)."""
    def once():
        pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.5, output_type="np",
             generator=torch.Generator("cuda").manual_seed(0))

    once()
    return statistics.median(_timed(once, repeats))


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapters", nargs="+", required=True, help="at least two adapter folders")
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switches", type=int, default=20)
    args = parser.parse_args(argv)
    if len(args.adapters) < 2:
        raise SystemExit("give at least two adapter folders")
    pipe = StableDiffusionPipeline.from_pretrained(args.base, torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": args.steps,
                     "size": args.size}
    results["base_s"] = generation_seconds(pipe, args.steps, args.size, args.repeats)
    print(f"base: {results['base_s'] * 1000:.0f} ms/image", flush=True)

    names = [f"subject{i}" for i in range(len(args.adapters))]
    start = time.perf_counter()
    for name, folder in zip(names, args.adapters):
        pipe.load_lora_weights(folder, adapter_name=name)
    results["load_all_s"] = time.perf_counter() - start
    switch_times = []
    for i in range(args.switches):
        name = names[i % len(names)]
        switch_times += _timed(lambda: pipe.set_adapters([name]), 1)
    results["switch_ms_median"] = statistics.median(switch_times) * 1000
    results["switch_ms_max"] = max(switch_times) * 1000
    print(f"switch (set_adapters): median {results['switch_ms_median']:.1f} ms, max {results['switch_ms_max']:.1f} ms",
          flush=True)

    pipe.set_adapters([names[0]])
    results["unfused_s"] = generation_seconds(pipe, args.steps, args.size, args.repeats)
    pipe.fuse_lora(adapter_names=[names[0]])
    results["fused_s"] = generation_seconds(pipe, args.steps, args.size, args.repeats)
    with_wrappers = image(pipe)
    restores = [bypass_merged_adapters(pipe.unet), bypass_merged_adapters(pipe.text_encoder)]
    results["fused_bypassed_s"] = generation_seconds(pipe, args.steps, args.size, args.repeats)
    results["bypassed_max_pixel_diff"] = float(abs(image(pipe) - with_wrappers).max())
    for restore in restores:
        restore()
    pipe.unfuse_lora()
    results["switch_after_unfuse_ms"] = _timed(lambda: pipe.set_adapters([names[1]]), 1)[0] * 1000
    pipe.set_adapters([names[0]])
    pipe.fuse_lora(adapter_names=[names[0]])
    pipe.unload_lora_weights()  # keeps the fused weights, removes peft's wrappers for good
    results["fused_unloaded_s"] = generation_seconds(pipe, args.steps, args.size, args.repeats)
    for key in ("unfused", "fused", "fused_bypassed", "fused_unloaded"):
        results[f"{key}_vs_base"] = results[f"{key}_s"] / results["base_s"]
        print(f"{key}: {results[f'{key}_s'] * 1000:.0f} ms/image ({results[f'{key}_vs_base']:.3f} x base)", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_inference.json").write_text(json.dumps(results, indent=2))
    table = "\n".join([
        f"GPU: {results['gpu']}, torch {results['torch']}, fp16, {args.steps} steps, {args.size} px, CFG 7.5, "
        f"{len(names)} resident adapters (loaded in {results['load_all_s']:.2f} s).",
        "",
        "| what | time | vs base |",
        "|---|---|---|",
        f"| subject switch (`set_adapters`), median of {args.switches} | {results['switch_ms_median']:.1f} ms "
        f"(max {results['switch_ms_max']:.1f}) | |",
        f"| base pipeline, no adapters | {results['base_s'] * 1000:.0f} ms/image | 1.000 |",
        f"| adapter active, unfused | {results['unfused_s'] * 1000:.0f} ms/image | {results['unfused_vs_base']:.3f} |",
        f"| adapter fused, wrappers kept (`fuse_lora`) | {results['fused_s'] * 1000:.0f} ms/image "
        f"| {results['fused_vs_base']:.3f} |",
        f"| adapter fused, wrappers bypassed (`fuse_lora` + `lora_dreambooth.training.graph.bypass_merged_adapters`; "
        f"reversible, images identical: max pixel diff {results['bypassed_max_pixel_diff']:.1e}) "
        f"| {results['fused_bypassed_s'] * 1000:.0f} ms/image | {results['fused_bypassed_vs_base']:.3f} |",
        f"| adapter fused, wrappers removed (`fuse_lora` + `unload_lora_weights`; not reversible) | "
        f"{results['fused_unloaded_s'] * 1000:.0f} ms/image | {results['fused_unloaded_vs_base']:.3f} |",
    ]) + "\n"
    (args.out_dir / "bench_inference.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
