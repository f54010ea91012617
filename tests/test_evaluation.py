"""Evaluation harness: DreamBench prompts, DINO / CLIP-I / CLIP-T, generation, report files.

Real transformers models (tiny, random, built from configs and saved to disk), the real tiny diffusers
pipeline, real peft LoRA layers and the bundled (downscaled) DreamBooth dog photos.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_dreambooth import evaluation as ev
from lora_dreambooth.demo import example_photos
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.tiny import build_tiny_pipeline

SHARED = Path("/work/shared/data/dreambooth")  # the full DreamBench subset, where this machine has it


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return ev.save_tiny_metric_models(tmp_path_factory.mktemp("metric-models"))


@pytest.fixture(scope="module")
def metric_models(model_dirs) -> ev.MetricModels:
    clip_dir, dino_dir = model_dirs
    return ev.load_metric_models(str(clip_dir), str(dino_dir))


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    """Three of the bundled dog photos."""
    out = tmp_path_factory.mktemp("real")
    for source in ev.list_images(example_photos("dog"))[:3]:
        shutil.copy(source, out / source.name)
    return out


def tiny_pipe(with_lora: bool = False):
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    if with_lora:
        from peft import LoraConfig

        torch.manual_seed(1)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return pipe


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------------------------- prompts
def test_dreambench_prompts_put_token_and_class_where_the_paper_does():
    live = ev.dreambench_prompts("live", "sks", "dog")
    objects = ev.dreambench_prompts("object", "zwx", "stuffed animal")
    assert len(live) == len(objects) == 25
    assert live[0] == ev.EvalPrompt("a sks dog in the jungle", "a dog in the jungle")
    assert live[10] == ev.EvalPrompt("a sks dog wearing a red hat", "a dog wearing a red hat")
    assert objects[10] == ev.EvalPrompt("a zwx stuffed animal with a wheat field in the background",
                                        "a stuffed animal with a wheat field in the background")
    assert objects[24] == ev.EvalPrompt("a cube shaped zwx stuffed animal", "a cube shaped stuffed animal")
    assert all("zwx" not in p.clip_text and "stuffed animal" in p.clip_text for p in objects)


@pytest.mark.skipif(not (SHARED / "prompts_and_classes_original.txt").is_file(), reason="source file not available")
def test_bundled_templates_are_the_source_lines_unchanged():
    original = (SHARED / "prompts_and_classes_original.txt").read_text()
    objects, live = original.split("Live Subject Prompts")
    for kind, section in (("object", objects), ("live", live)):
        source_lines = [line.split("'")[1] for line in section.splitlines() if ".format(unique_token, class_token)" in line]
        bundled = [t.replace("{unique_token}", "{0}").replace("{class_token}", "{1}") for t in ev.load_prompt_templates(kind)]
        assert bundled == source_lines


def test_unknown_kind_and_empty_class_are_user_errors():
    with pytest.raises(UserInputError, match="unknown subject kind 'animal'"):
        ev.dreambench_prompts("animal", "sks", "dog")
    with pytest.raises(UserInputError, match="class noun is empty"):
        ev.dreambench_prompts("live", "sks", " ")


def test_prompt_file_takes_templates_and_plain_prompts(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\n\na {unique_token} {class_token} on the moon\nsks dog, sks!  in a boat\nsksdog runs\n")
    prompts = ev.read_prompt_file(file, "sks", "dog")
    assert prompts == [
        ev.EvalPrompt("a sks dog on the moon", "a dog on the moon"),
        ev.EvalPrompt("sks dog, sks! in a boat", "dog, ! in a boat"),
        ev.EvalPrompt("sksdog runs", "sksdog runs"),  # only whole words are the token
    ]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserInputError, match="has no prompts"):
        ev.read_prompt_file(tmp_path / "empty.txt", "sks", "dog")
    with pytest.raises(UserInputError, match="cannot read prompt file"):
        ev.read_prompt_file(tmp_path / "missing.txt", "sks", "dog")


# ------------------------------------------------------------------------------------ metric formulas
def test_metric_formulas_match_a_hand_computation():
    generated = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # lengths must not matter
    real = torch.tensor([[2.0, 2.0], [5.0, 0.0]])
    # cosines: g0·r0 = 1/sqrt2, g0·r1 = 1, g1·r0 = 1/sqrt2, g1·r1 = 0
    expected = torch.tensor([[2 ** -0.5, 1.0], [2 ** -0.5, 0.0]])
    assert torch.allclose(ev.cosine_matrix(generated, real), expected, atol=1e-6)
    assert ev.mean_pairwise_cosine(generated, real) == pytest.approx((2 * 2 ** -0.5 + 1.0) / 4)
    assert ev.paired_cosine(generated, real).tolist() == pytest.approx([2 ** -0.5, 0.0])
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # distinct pairs (both orders): 0, 1/sqrt2, 0, 1/sqrt2, 1/sqrt2, 1/sqrt2 -> 4/sqrt2 / 6
    assert ev.mean_distinct_pair_cosine(three) == pytest.approx(4 * 2 ** -0.5 / 6)
    # a set against itself: the diagonal is 1, the mean over all pairs is (n + off-diagonal sum) / n^2
    assert ev.mean_pairwise_cosine(three, three) == pytest.approx((3 + 4 * 2 ** -0.5) / 9)
    with pytest.raises(ValueError):
        ev.mean_distinct_pair_cosine(three[:1])


def test_identical_images_score_one_and_sets_follow_the_pairwise_definition(real_dir, metric_models):
    photo = ev.list_images(real_dir)[0]
    single = ev.score_images([photo], [photo], clip=metric_models.clip, dino=metric_models.dino)
    assert single["dino"] == pytest.approx(1.0, abs=1e-5)
    assert single["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert single["clip_t"] is None and single["real_baseline"] == {"dino": None, "clip_i": None}

    same_set = ev.score_images(real_dir, real_dir, clip=metric_models.clip, dino=metric_models.dino)
    n = same_set["n_real"]
    assert n == same_set["n_generated"] == 3
    for metric in ("dino", "clip_i"):
        embeddings = getattr(metric_models, "dino" if metric == "dino" else "clip").embed_images(
            ev.load_images(real_dir)[0])
        assert torch.allclose(ev.cosine_matrix(embeddings, embeddings).diagonal(), torch.ones(n), atol=1e-5)
        baseline = same_set["real_baseline"][metric]
        assert same_set[metric] == pytest.approx((1 + (n - 1) * baseline) / n, abs=1e-5)
        assert baseline < 1.0 - 1e-4  # the photos differ, so the set is not 1.0 against itself


def test_clip_t_uses_the_text_without_the_token_and_groups_per_prompt(real_dir, metric_models):
    files = ev.list_images(real_dir)
    prompts = [ev.EvalPrompt("a sks dog in the snow", "a dog in the snow")] * 2 + [
        ev.EvalPrompt("a red sks dog", "a red dog")]
    scores = ev.score_images(files, files[:2], prompts, clip=metric_models.clip, dino=metric_models.dino)
    image_emb = metric_models.clip.embed_images(ev.load_images(files)[0])
    text_emb = metric_models.clip.embed_texts(["a dog in the snow", "a dog in the snow", "a red dog"])
    by_hand = (image_emb * text_emb).sum(dim=1)
    assert [row["clip_t"] for row in scores["per_image"]] == pytest.approx(by_hand.tolist(), abs=1e-5)
    assert scores["clip_t"] == pytest.approx(float(by_hand.mean()), abs=1e-5)
    with_token = ev.score_images(files, files[:2], [p.prompt for p in prompts], clip=metric_models.clip)
    assert with_token["clip_t"] != pytest.approx(scores["clip_t"], abs=1e-6)
    assert with_token["dino"] is None
    first, second = scores["per_prompt"]
    assert (first["prompt"], first["n_images"], second["n_images"]) == ("a sks dog in the snow", 2, 1)
    assert first["dino"] == pytest.approx(np.mean([r["dino"] for r in scores["per_image"][:2]]))
    with pytest.raises(UserInputError, match="3 generated images but 2 prompts"):
        ev.score_images(files, files, prompts[:2], clip=metric_models.clip)


# -------------------------------------------------------------------------------------- model loading
def test_missing_models_fail_in_one_clear_line(monkeypatch, model_dirs, tmp_path):
    clip_dir, dino_dir = model_dirs
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError) as offline:
        ev.load_metric_models("no-such-org/no-such-clip-model", str(dino_dir))
    assert str(offline.value) == ("cannot load CLIP model 'no-such-org/no-such-clip-model': not a local folder "
                                  "and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    with pytest.raises(UserInputError, match=r"^cannot load DINO model '\./no/such/dir': no such folder$"):
        ev.load_metric_models(str(clip_dir), "./no/such/dir")
    with pytest.raises(UserInputError, match="model type 'vit', not 'clip'"):
        ev.load_metric_models(str(dino_dir), None)
    broken = tmp_path / "broken-clip"
    broken.mkdir()
    shutil.copy(clip_dir / "config.json", broken / "config.json")
    with pytest.raises(UserInputError, match="^cannot load CLIP model '.*broken-clip': ") as no_weights:
        ev.load_metric_models(str(broken), None)
    assert "\n" not in str(no_weights.value)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    assert not ev.hub_reachable(timeout=2)
    with pytest.raises(UserInputError, match=r"^cannot load CLIP model 'no-such-org/no-such-clip-model': not a "
                                             r"local folder and the model hub is unreachable \(http://127.0.0.1:9\)"):
        ev.load_metric_models("no-such-org/no-such-clip-model", None)


# ----------------------------------------------------------------------------------------- generation
def test_generation_is_deterministic_per_image_and_writes_a_manifest(tmp_path):
    pipe = tiny_pipe()
    prompts = ev.dreambench_prompts("live", "sks", "dog")[:2]
    common = dict(images_per_prompt=2, seed=7, num_inference_steps=2, height=32, width=32)
    batched = ev.generate_for_evaluation(pipe, prompts, tmp_path / "batched", batch_size=2, **common)
    one_by_one = ev.generate_for_evaluation(pipe, prompts, tmp_path / "single", batch_size=1, **common)
    assert [(g.path.name, g.prompt_index, g.image_index, g.seed) for g in batched] == [
        ("00_00.png", 0, 0, 7), ("00_01.png", 0, 1, 8), ("01_00.png", 1, 0, 9), ("01_01.png", 1, 1, 10)]
    for a, b in zip(batched, one_by_one):
        assert np.abs(pixels(a.path) - pixels(b.path)).max() <= 1  # same seed, same image (batching rounding)
    assert np.abs(pixels(batched[0].path) - pixels(batched[1].path)).max() > 10  # different seeds differ
    assert ev.read_manifest(tmp_path / "batched") == batched
    assert Image.open(batched[0].path).size == (32, 32)


def test_evaluate_end_to_end_with_compare_base(tmp_path, real_dir, metric_models, model_dirs):
    pipe = tiny_pipe(with_lora=True)
    prompts = ev.dreambench_prompts("live", "sks", "dog")[:2]
    result = ev.evaluate(pipe, prompts, real_dir, tmp_path / "eval", metric_models, images_per_prompt=1, seed=3,
                         num_inference_steps=2, height=32, width=32, compare_base=True, settings={"kind": "live"})
    out = tmp_path / "eval"
    report = json.loads((out / "scores.json").read_text())
    assert report == result.report
    for key in ("scores", "base_scores"):
        assert set(report[key]) == {"dino", "clip_i", "clip_t"}
        assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in report[key].values())
    for metric, gain in report["gain"].items():
        assert gain == pytest.approx(report["scores"][metric] - report["base_scores"][metric])
    assert report["counts"] == {"generated": 2, "real": 3, "prompts": 2}
    assert report["settings"]["kind"] == "live" and report["settings"]["seed"] == 3
    assert [row["file"] for row in report["per_image"]] == ["images/adapter/00_00.png", "images/adapter/01_00.png"]

    with open(out / "per_prompt.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["prompt"] for r in rows] == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert [r["clip_text"] for r in rows] == ["a dog in the jungle", "a dog in the snow"]
    assert float(rows[0]["gain_dino"]) == pytest.approx(float(rows[0]["dino"]) - float(rows[0]["base_dino"]), abs=2e-6)
    sheet = Image.open(result.contact_sheet)
    assert sheet.format == "PNG" and sheet.height > 3 * 128

    # the base run is the plain pipeline with the same seeds; the adapter run differs; the adapter is back on
    plain = ev.generate_for_evaluation(tiny_pipe(), prompts, tmp_path / "plain", images_per_prompt=1, seed=3,
                                       num_inference_steps=2, height=32, width=32)
    for record in plain:
        assert np.abs(pixels(record.path) - pixels(out / "images" / "base" / record.path.name)).max() <= 1
    assert np.abs(pixels(plain[0].path) - pixels(out / "images" / "adapter" / "00_00.png")).max() > 1
    again = ev.generate_for_evaluation(pipe, prompts[:1], tmp_path / "again", images_per_prompt=1, seed=3,
                                       num_inference_steps=2, height=32, width=32)
    assert np.abs(pixels(again[0].path) - pixels(out / "images" / "adapter" / "00_00.png")).max() <= 1

    # the metrics-only API on two folders (prompts from the manifest, models by path) gives the same scores
    clip_dir, dino_dir = model_dirs
    rescored = ev.score_images(out / "images" / "adapter", real_dir, clip=str(clip_dir), dino=str(dino_dir))
    for metric in ("dino", "clip_i", "clip_t"):
        assert rescored[metric] == pytest.approx(report["scores"][metric], abs=1e-5)
    assert "DINO" in ev.format_summary(report) and "gain:" in ev.format_summary(report)


def test_bad_real_folder_fails_before_generating(tmp_path, metric_models):
    (tmp_path / "real").mkdir()
    with pytest.raises(UserInputError, match="no images"):
        ev.evaluate(None, ev.dreambench_prompts("object", "sks", "backpack")[:1], tmp_path / "real",
                    tmp_path / "out", metric_models, images_per_prompt=1, num_inference_steps=2, height=32, width=32)
    assert not (tmp_path / "out").exists()
