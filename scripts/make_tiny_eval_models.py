"""Write tiny random CLIP and DINO-shaped ViT scoring models for offline demos and CLI tests.

    python scripts/make_tiny_eval_models.py OUT_DIR [--seed 0]

Creates OUT_DIR/clip and OUT_DIR/dino, loadable with
``lora-dreambooth evaluate ... --clip OUT_DIR/clip --dino OUT_DIR/dino``. Random weights: the scores they
give exercise every code path but mean nothing.
"""
from __future__ import annotations

import argparse

from lora_dreambooth.evaluation.tiny_models import save_tiny_metric_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    clip_dir, dino_dir = save_tiny_metric_models(args.out_dir, seed=args.seed)
    print(f"CLIP: {clip_dir}\nDINO: {dino_dir}")


if __name__ == "__main__":
    main()
