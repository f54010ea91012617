#!/usr/bin/env python
"""Several processes with and without the CUDA graph, on ONE GPU over gloo (the correctness and overhead check a
one-GPU machine allows; NCCL refuses two ranks on one GPU), against one process with the same effective batch.

    python scripts/bench_processes.py --base /tmp/sd14 --out-dir bench-out/processes [--mixed-precision fp16]

Runs the R2 setting of bench_train.py with the fast profile's options (AdamW, no checkpointing) in three ways, each
in its own torchrun launch: 1 process x batch 2 with the graph, 2 processes x batch 1 with the graph (forward +
backward captured, one all-reduce of the flat LoRA gradients, captured optimizer step), 2 processes x batch 1 eager
(accelerate's DDP). Two ranks share one GPU here, so 2-process it/s says nothing about 2-GPU scaling: it shows the
graph path's gain over the eager multi-process path and that both train the adapter one process trains.
Writes bench_processes.json, bench_processes.md and each launch's output (run-N.log).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUNS = [  # label, processes, batch per process, graph
    ("1 process x batch 2, graph", 1, 2, True),
    ("2 processes x batch 1, graph", 2, 1, True),
    ("2 processes x batch 1, eager (DDP)", 2, 1, False),
]


def rank_main(args: argparse.Namespace) -> None:
    """One torchrun rank: gloo process group on GPU 0, our recipe timed after the warm-up steps."""
    from accelerate import PartialState

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lora_dreambooth.training.graph").setLevel(logging.DEBUG)  # a failed capture's traceback
    os.environ["LOCAL_RANK"] = "0"  # accelerate's device, DDP device ids and barriers: GPU 0 for every rank
    torch.cuda.set_device(0)
    PartialState(backend="gloo")  # accelerate must know the backend: its gather differs for gloo
    from bench_train import PROFILES, SETTINGS, TimedRecipe

    from lora_dreambooth import TrainConfig

    class Recipe(TimedRecipe):
        def _prepare_optimization(self) -> None:  # before the models are prepared: DDP wraps them only without graph
            if not args.graph:
                self.plan = dataclasses.replace(self.plan, cuda_graph=False)
            super()._prepare_optimization()

    work = Path(args.work)
    cfg = TrainConfig(instance_dir=str(work / "instance"), base=args.base, token="sks", class_noun="dog",
                      output_dir=str(work / f"run-{args.label_index}"), class_dir=str(work / "class"),
                      num_class_images=8, resolution=args.resolution, steps=args.warmup + args.steps, rank=4,
                      batch_size=args.batch, lr=1e-4, seed=0, overwrite=True, mixed_precision=args.mixed_precision,
                      **{**SETTINGS["R2"], **PROFILES["fast"]})
    recipe = Recipe(cfg)
    recipe.mark = args.warmup
    recipe.setup()
    result = recipe.train()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - recipe.started
    if recipe.accelerator.is_main_process:
        adapter = torch.cat([p.detach().float().flatten().cpu() for p in recipe.params])
        torch.save(adapter, work / f"adapter-{args.label_index}.pt")
        row = {"its": args.steps / elapsed, "plan": recipe.plan.describe(), "last_loss": result.last_loss,
               "skipped_steps": result.skipped_steps, "graph_captured": bool(recipe.graph and recipe.graph.replaying),
               "graph_disabled_reason": recipe.graph.disabled_reason if recipe.graph else "no graph in the plan"}
        (work / f"row-{args.label_index}.json").write_text(json.dumps(row))
    recipe.accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(index: int, processes: int, batch: int, graph: bool, args: argparse.Namespace, work: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), __file__, "--rank-mode", "--base", args.base,
               "--work", str(work), "--label-index", str(index), "--batch", str(batch), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--resolution", str(args.resolution), "--mixed-precision",
               args.mixed_precision] + (["--graph"] if graph else [])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "4"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    (args.out_dir / f"run-{index}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-12:]
        raise SystemExit(f"run {index} failed:\n" + "\n".join(errors) + f"\n{proc.stderr[-2000:]}")
    return json.loads((work / f"row-{index}.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--out-dir", type=Path, default=Path("bench-out/processes"))
    parser.add_argument("--mixed-precision", default="fp16", choices=("bf16", "fp16", "no"))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--label-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--graph", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_mode:
        rank_main(args)
        return 0
    from bench_train import make_photos

    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "instance", 4, args.resolution, 1)
        make_photos(work / "class", 8, args.resolution, 2, prefix="class")
        for index, (label, processes, batch, graph) in enumerate(RUNS):
            row = {"run": label, **launch(index, processes, batch, graph, args, work)}
            reference = torch.load(work / "adapter-0.pt")
            adapter = torch.load(work / f"adapter-{index}.pt")
            row["adapter_distance_to_1x2"] = float((adapter - reference).norm() / reference.norm())
            rows.append(row)
            print(f"  {label:<36} {row['its']:6.2f} it/s  adapter distance {row['adapter_distance_to_1x2']:.2e}  "
                  f"loss {row['last_loss']:.5f}  skipped {row['skipped_steps']}  graph {row['graph_captured']} "
                  f"({row['graph_disabled_reason']})", flush=True)
    (args.out_dir / "bench_processes.json").write_text(json.dumps({"args": vars(args) | {"out_dir": str(args.out_dir)},
                                                                   "rows": rows}, indent=2, default=str))
    lines = [f"{args.resolution} px, R2 options of the fast profile, {args.mixed_precision}, {args.steps} steps after "
             f"{args.warmup} warm-up steps; all ranks on ONE GPU over gloo.", "",
             "| run | it/s (optimizer steps) | adapter vs 1 x batch 2 (relative) | last loss | skipped |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['its']:.2f} | {r['adapter_distance_to_1x2']:.1e} | {r['last_loss']:.5f} "
              f"| {r['skipped_steps']} |" for r in rows]
    (args.out_dir / "bench_processes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
