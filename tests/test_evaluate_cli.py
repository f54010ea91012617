"""`lora-dreambooth evaluate` end to end through the real CLI on tiny SD / CLIP / DINO models (offline)."""
from __future__ import annotations

import csv
import json

import pytest

from lora_dreambooth import TrainConfig, train
from lora_dreambooth.evaluation.tiny_models import save_tiny_metric_models

from .conftest import run_cli


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_base, dog_dir):
    out = tmp_path_factory.mktemp("eval-adapter") / "sks-dog"
    train(TrainConfig(instance_dir=str(dog_dir), base=str(tiny_base), token="sks", class_noun="dog",
                      output_dir=str(out), resolution=32, steps=4, prior=False, lr=1e-3, save_dtype="fp32"))
    return out


def test_evaluate_cli_writes_all_three_scores(tmp_path, tiny_base, tiny_adapter, dog_dir):
    clip_dir, dino_dir = save_tiny_metric_models(tmp_path / "metric-models")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {unique_token} {class_token} in the jungle\na {unique_token} {class_token} on the beach\n")
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--base", tiny_base, "--adapter", tiny_adapter, "--real-dir", dog_dir, "--kind", "live",
                   "--out", out, "--images-per-prompt", "1", "--prompts", prompts, "--clip", clip_dir, "--dino",
                   dino_dir, "--steps", "2", "--compare-base", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "scores.json").read_text())
    for metric in ("dino", "clip_i", "clip_t"):
        assert isinstance(report["scores"][metric], float), report["scores"]
    assert report["base_scores"] is not None
    rows = list(csv.DictReader((out / "per_prompt.csv").open()))
    assert [r["prompt"] for r in rows] == ["a sks dog in the jungle", "a sks dog on the beach"]
    assert (out / "contact_sheet.png").is_file()
    assert "DINO" in proc.stdout


def test_evaluate_without_metric_models_is_one_line(tmp_path, tiny_base, tiny_adapter, dog_dir):
    proc = run_cli("evaluate", "--base", tiny_base, "--adapter", tiny_adapter, "--real-dir", dog_dir, "--kind", "live",
                   "--out", tmp_path / "eval", "--clip", "nobody/no-such-clip", "--device", "cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: cannot load CLIP model 'nobody/no-such-clip'")
    assert not (tmp_path / "eval").exists()
