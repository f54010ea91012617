"""`lora-dreambooth demo` without --base: the shipped synthetic base, the synthetic subject, a labelled comparison."""
from __future__ import annotations

from PIL import Image

from lora_dreambooth.demo import CELL, HEADER_HEIGHT, LABEL_WIDTH, run_demo
from lora_dreambooth.files.metadata import read_summary
from lora_dreambooth.synthetic.pretrain import shipped_base


def test_demo_trains_the_synthetic_subject_and_writes_the_comparison(tmp_path):
    grid_path = run_demo(tmp_path / "demo", steps=8, seeds=2)
    out = tmp_path / "demo"
    assert grid_path == out / "comparison.png"
    photos = sorted(p.name for p in (out / "photos").iterdir())
    assert photos == [f"subject_{i:02d}.png" for i in range(5)]
    summary = read_summary(out / "adapter" / "pytorch_lora_weights.safetensors")
    assert (summary["token"], summary["class_noun"]) == ("sks", "triangle")
    assert summary["base_model"] == str(shipped_base())
    grid = Image.open(grid_path)
    # photos row + base/adapter rows for the instance prompt and the edit prompt; columns: up to 5 photos / 3 seeds
    assert grid.size == (LABEL_WIDTH + 5 * CELL, HEADER_HEIGHT + 5 * CELL)
