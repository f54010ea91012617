#!/usr/bin/env python
"""Run the Synthetic DreamBench: does DreamBooth learn a subject, and does prior preservation prevent drift?

Fully offline, CPU only. Uses a tiny SD v1-layout base pretrained on a world of coloured shapes (the package
ships it; --from-scratch pretrains it again, ~5 min), trains two adapters on a striped-triangle subject with
lora-dreambooth's real trainer (with prior preservation through the CLI, without through the Python API), and
measures base and adapters with simple detectors. Writes synthetic_dreambench.{md,json,png} to --out.

    python scripts/synthetic_dreambench.py --out synthetic-dreambench                 # ~2 min on 2 cores
    python scripts/synthetic_dreambench.py --out synthetic-dreambench --from-scratch  # ~7 min: pretrains the base too
    python scripts/synthetic_dreambench.py --out /tmp/sdb --quick                     # the CI variant (~1 min)
    python scripts/synthetic_dreambench.py --out /tmp/sweep --quick --seeds 0,1,2     # configurations over seeds
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("synthetic-dreambench"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="the CI variant: fewer training steps and pictures")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where pretrained bases are cached [~/.cache/lora-dreambooth/synthetic]")
    parser.add_argument("--from-scratch", action="store_true",
                        help="pretrain the base again (~5 min) instead of using the cached or shipped copy")
    parser.add_argument("--refresh-shipped", action="store_true",
                        help="with --from-scratch: copy the new base into the package (lora_dreambooth/assets/synthetic)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    parser.add_argument("--steps", type=int, default=None, help="adapter training steps")
    parser.add_argument("--samples", type=int, default=None, help="pictures per prompt family")
    parser.add_argument("--seed", type=int, default=None, help="seed of the subject photos and both trainings")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds: compare training configurations over them (mean and spread)")
    parser.add_argument("--configs", default=None,
                        help="with --seeds: comma-separated configurations [the first five]: "
                        + ", ".join(_configurations()))
    args = parser.parse_args(argv)
    if args.refresh_shipped and not args.from_scratch:
        parser.error("--refresh-shipped needs --from-scratch (it ships a base this run pretrained)")

    import torch

    from lora_dreambooth.synthetic.bench import run_bench
    from lora_dreambooth.synthetic.config import CI_CONFIG, BenchConfig, with_overrides
    from lora_dreambooth.synthetic.report import markdown_table

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = with_overrides(CI_CONFIG if args.quick else BenchConfig(), steps=args.steps, samples=args.samples,
                         seed=args.seed)
    started = time.perf_counter()
    if args.seeds:
        return run_seeds(args, cfg, started)
    result = run_bench(cfg, args.out, cache_root=args.cache, from_scratch=args.from_scratch,
                       log=lambda m: print(f"[{time.perf_counter() - started:6.1f} s] {m}", flush=True))
    if args.refresh_shipped:
        print(f"shipped: {refresh_shipped(result.base_dir)}")
    print()
    print(markdown_table(result, cfg))
    print()
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


def _configurations() -> list[str]:
    from lora_dreambooth.synthetic.sweep import CONFIGURATIONS

    return list(CONFIGURATIONS)


def run_seeds(args: argparse.Namespace, cfg, started: float) -> int:
    """--seeds: every configuration at every seed, then the side-by-side table of means and spreads."""
    from lora_dreambooth.synthetic.sweep import run_sweep, sweep_table

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    from lora_dreambooth.synthetic.sweep import DEFAULT_SWEEP

    configs = [c.strip() for c in args.configs.split(",")] if args.configs else list(DEFAULT_SWEEP)
    unknown = [c for c in configs if c not in _configurations()]
    if unknown:
        raise SystemExit(f"Error: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(_configurations())}")
    result = run_sweep(cfg, args.out, seeds, configs, cache_root=args.cache,
                       log=lambda m: print(f"[{time.perf_counter() - started:6.1f} s] {m}", flush=True))
    table = sweep_table(result)
    (args.out / "sweep.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\njson: {args.out / 'sweep.json'}\nmarkdown: {args.out / 'sweep.md'}")
    return 0


def refresh_shipped(base_dir: Path) -> Path:
    """Replace the package's shipped base(s) with ``base_dir`` (a freshly pretrained cache entry)."""
    import shutil

    from lora_dreambooth.synthetic.pretrain import SHIPPED_ROOT

    target = SHIPPED_ROOT / base_dir.name
    if SHIPPED_ROOT.exists():
        shutil.rmtree(SHIPPED_ROOT)
    shutil.copytree(base_dir, target)
    return target


if __name__ == "__main__":
    sys.exit(main())
