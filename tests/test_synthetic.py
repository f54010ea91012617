"""The Synthetic DreamBench: world, detectors, cached pretraining, and the CI variant end to end.

The end-to-end test uses the benchmark's base (the copy shipped in the package, see `ci_bench`), trains two
adapters with the real trainer (the one with prior preservation through the CLI in a subprocess) and asserts the
direction of each effect: the adapters' pictures of "a photo of sks triangle" are far closer to the subject than
the base's, and prior preservation reduces the subject's leak into "a photo of a triangle". It never asserts exact
numbers or timings.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
from PIL import Image

from lora_dreambooth.synthetic.detectors import (analyze, color_entropy, diversity, foreground_mask, largest_component,
                                                 reference_histogram)
from lora_dreambooth.synthetic.pretrain import (MARKER, RECIPE_VERSION, PretrainConfig, pretrained_base, shipped_base,
                                                with_rare_tag)
from lora_dreambooth.synthetic.world import (BACKGROUND, COLORS, RARE_TAGS, SHAPES, VOCABULARY, ShapeSpec, caption_for,
                                             make_class_dataset, random_class_spec, render, subject_spec,
                                             write_subject_photos)


@pytest.mark.parametrize("resolution", [32, 64])
def test_detectors_read_clean_renders_exactly(resolution):
    rng = random.Random(resolution)
    specs = [random_class_spec(rng) for _ in range(150)]
    found = [analyze(render(s, resolution)) for s in specs]
    assert [d.shape for d in found] == [s.shape for s in specs]
    assert [d.color for d in found] == [s.color_name for s in specs]
    assert [d.position for d in found] == [s.position_name for s in specs]
    assert not any(d.is_subject for d in found)
    assert all(d.shape_iou > 0.75 for d in found)


def test_every_shape_and_colour_is_told_apart():
    for shape in SHAPES:
        for color in COLORS:
            spec = random_class_spec(random.Random(0), shape=shape, color=color, position="center")
            detection = analyze(render(spec, 32))
            assert (detection.shape, detection.color) == (shape, color)


def test_subject_photos_are_detected_as_the_subject(tmp_path):
    paths = write_subject_photos(tmp_path / "subject", count=5, resolution=32, seed=3)
    assert [p.name for p in paths] == [f"subject_{i:02d}.png" for i in range(5)]
    photos = [Image.open(p) for p in paths]
    assert all(p.size == (32, 32) and p.mode == "RGB" for p in photos)
    reference = reference_histogram(photos)
    assert reference["teal"] > 0.15 and reference["pink"] > 0.4
    for photo in photos:
        detection = analyze(photo, reference)
        assert detection.is_subject and detection.shape == "triangle"
        assert detection.subject_similarity > 0.7 and detection.color_fraction < 0.1  # no palette colour in it
    # A solid triangle of a palette colour scores low against the subject's colours.
    plain = analyze(render(random_class_spec(random.Random(1), shape="triangle", color="blue"), 32), reference)
    assert not plain.is_subject and plain.subject_similarity < 0.1


def test_subject_is_outside_the_class_world():
    """The class world never contains the subject's colours, stripes or dot: the base cannot have seen it."""
    dataset = make_class_dataset(216, resolution=32, seed=5)
    assert not any(analyze(im).is_subject for im in dataset.images)
    assert all(s.stripes == () and s.dot is None for s in dataset.specs)
    rng = random.Random(0)
    assert all(s.color_name in COLORS for s in dataset.specs)
    counts = {(s.shape, s.color_name) for s in dataset.specs}
    assert len(counts) == len(SHAPES) * len(COLORS)
    subject = subject_spec(rng)
    assert subject.stripes and subject.dot is not None and subject.color_name is None


def test_captions_are_truthful_and_tokenize_to_whole_words():
    from lora_dreambooth.tiny import build_tiny_tokenizer

    rng = random.Random(0)
    tokenizer = build_tiny_tokenizer(words=VOCABULARY)
    for word in VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for _ in range(100):
        spec = random_class_spec(rng)
        caption = caption_for(spec, rng)
        words = caption.split()
        assert caption.startswith("a photo of a") and spec.shape in words
        assert all(w in VOCABULARY for w in words)
        named_colors = [w for w in words if w in COLORS]
        assert named_colors in ([], [spec.color_name])
        tagged = with_rare_tag(caption, rng, share=1.0).split()
        assert len(tagged) == len(words) + 1 and sum(w in RARE_TAGS for w in tagged) == 1
        assert [w for w in tagged if w not in RARE_TAGS] == words
        assert with_rare_tag(caption, rng, share=0.0) == caption


def test_diversity_and_entropy():
    square = render(ShapeSpec("square", COLORS["red"]), 32)
    assert diversity([square, square, square]) == 0.0
    blank = Image.new("RGB", (32, 32), BACKGROUND)
    assert 0.0 < diversity([square, blank]) < 1.0
    assert color_entropy(list(COLORS)) == pytest.approx(math.log2(len(COLORS)))
    assert color_entropy(["red"] * 5) == 0.0
    assert not largest_component(foreground_mask(blank)).any()
    assert analyze(blank).shape is None


def test_pretrain_cache_key_and_layout(tmp_path):
    """A base is cached under its config's key, is an ordinary diffusers folder, and is built only once."""
    from diffusers import StableDiffusionPipeline

    cfg = PretrainConfig(vae_steps=2, unet_steps=2, dataset_size=54, warmup_steps=1)
    assert cfg.key() == PretrainConfig(vae_steps=2, unet_steps=2, dataset_size=54, warmup_steps=1).key()
    assert cfg.key() != PretrainConfig(vae_steps=2, unet_steps=3, dataset_size=54, warmup_steps=1).key()
    base = pretrained_base(cfg, tmp_path)
    assert base == tmp_path / cfg.key()
    assert [p.name for p in tmp_path.iterdir()] == [cfg.key()]  # no staging folder left behind
    marker = (base / MARKER).stat().st_mtime_ns
    assert pretrained_base(cfg, tmp_path) == base
    assert (base / MARKER).stat().st_mtime_ns == marker
    pipe = StableDiffusionPipeline.from_pretrained(base)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    assert pipe.tokenizer("a photo of sks triangle", add_special_tokens=False).input_ids.__len__() == 5
    assert json.loads((base / MARKER).read_text())["config"]["unet_steps"] == 2
    rebuilt = pretrained_base(cfg, tmp_path, from_scratch=True)
    assert rebuilt == base and (base / MARKER).stat().st_mtime_ns != marker


def test_shipped_base_is_the_default_configs():
    """The package ships the default config's base; a change to the world, the recipe or the config must come with
    a rebuilt copy (`python scripts/synthetic_dreambench.py --from-scratch --refresh-shipped`)."""
    shipped = shipped_base(PretrainConfig())
    assert shipped is not None, "the shipped synthetic base is stale: rebuild it with --from-scratch --refresh-shipped"
    marker = json.loads((shipped / MARKER).read_text())
    assert marker["recipe"] == RECIPE_VERSION
    assert marker["config"] == json.loads(json.dumps(dataclasses.asdict(PretrainConfig())))
    assert pretrained_base(PretrainConfig(), shipped.parent.parent / "no-such-cache") == shipped


@pytest.fixture(scope="module")
def ci_bench(tmp_path_factory):
    """The CI variant end to end, on the base shipped with the package (pretraining it takes ~5 min on 2 cores)."""
    from lora_dreambooth.synthetic.bench import run_bench
    from lora_dreambooth.synthetic.config import CI_CONFIG

    if shipped_base(CI_CONFIG.pretrain) is None:
        pytest.fail("the shipped synthetic base is stale: rebuild it with --from-scratch --refresh-shipped")
    root = tmp_path_factory.mktemp("synthetic-dreambench")
    return CI_CONFIG, run_bench(CI_CONFIG, root / "run", cache_root=root / "bases")


def test_ci_bench_adapter_learns_the_subject(ci_bench):
    _, result = ci_bench
    base, adapter, free = (result.stats[m]["subject"] for m in ("base", "adapter", "adapter_no_prior"))
    assert base.subject_rate == 0.0  # the base has never drawn the subject
    assert adapter.subject_similarity > 1.5 * base.subject_similarity
    assert free.subject_similarity > 1.5 * base.subject_similarity
    assert free.subject_rate > base.subject_rate


def test_ci_bench_prior_preservation_reduces_drift(ci_bench):
    _, result = ci_bench
    effects = json.loads(result.files["json"].read_text())["effects"]
    # Without prior preservation the plain class prompt drifts towards the subject's colours and draws it.
    assert effects["drift_similarity_no_prior_minus_prior"] > 0
    assert effects["drift_leak_no_prior_minus_prior"] >= 0


def test_ci_bench_writes_table_json_and_grid(ci_bench):
    cfg, result = ci_bench
    data = json.loads(result.files["json"].read_text())
    assert set(data["stats"]) == {"base", "adapter", "adapter_no_prior"}
    assert data["effects"]["subject_similarity_gain"] > 1
    table = result.files["markdown"].read_text()
    assert f"`a photo of {cfg.token} {cfg.class_noun}`" in table and "adapter (no prior)" in table
    grid = Image.open(result.files["grid"])
    assert grid.width > 12 * 32 and grid.height > 4 * 32
    run = result.files["json"].parent
    for adapter in ("adapter", "adapter-no-prior"):
        assert (run / adapter / "pytorch_lora_weights.safetensors").is_file()
    class_images = sorted((run / "class-images").glob("*.png"))
    assert len(class_images) == cfg.num_class_images
    # The class images came from the base through the real trainer: mostly triangles, never the subject.
    found = [analyze(np.asarray(Image.open(p).convert("RGB"))) for p in class_images]
    assert not any(d.is_subject for d in found)
