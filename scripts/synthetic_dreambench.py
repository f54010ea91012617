#!/usr/bin/env python
"""Run the Synthetic DreamBench: does DreamBooth learn a subject, and does prior preservation prevent drift?

Fully offline, CPU only. Pretrains a tiny SD v1-layout base on a world of coloured shapes (cached, built once
per config), trains two adapters on a striped-triangle subject with lora-dreambooth's real trainer (with prior
preservation through the CLI, without through the Python API), and measures base and adapters with simple
detectors. Writes synthetic_dreambench.{md,json,png} to --out.

    python scripts/synthetic_dreambench.py --out synthetic-dreambench   # full run (~8 min on 2 cores, ~2.5 once cached)
    python scripts/synthetic_dreambench.py --out /tmp/sdb --quick       # the CI variant: same base, fewer steps
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    parser.add_argument("--steps", type=int, default=None, help="adapter training steps")
    parser.add_argument("--samples", type=int, default=None, help="pictures per prompt family")
    parser.add_argument("--seed", type=int, default=None, help="seed of the subject photos and both trainings")
    args = parser.parse_args(argv)

    import torch

    from lora_dreambooth.synthetic.bench import CI_CONFIG, BenchConfig, run_bench, with_overrides
    from lora_dreambooth.synthetic.report import markdown_table

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = with_overrides(CI_CONFIG if args.quick else BenchConfig(), steps=args.steps, samples=args.samples,
                         seed=args.seed)
    started = time.perf_counter()
    result = run_bench(cfg, args.out, cache_root=args.cache,
                       log=lambda m: print(f"[{time.perf_counter() - started:6.1f} s] {m}", flush=True))
    print()
    print(markdown_table(result, cfg))
    print()
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
