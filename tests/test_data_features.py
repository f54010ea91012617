"""Training data and loss features: captions, several subjects, buckets, masks, min-SNR, noise offset, model prior,
rare tokens, validation grids. Real tiny SD pipelines, real peft/diffusers, real PIL; CPU, a few seconds each."""
from __future__ import annotations

import logging
import shutil
import tomllib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_dreambooth import TrainConfig
from lora_dreambooth.data.buckets import BucketSampler, bucket_sizes, nearest_bucket
from lora_dreambooth.data.captions import dropout_mask
from lora_dreambooth.data.examples import load_mask
from lora_dreambooth.data.tokens import suggest_tokens, token_pieces, token_warnings
from lora_dreambooth.errors import UserInputError
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, read_summary
from lora_dreambooth.training.losses import add_noise_offset, dreambooth_loss, min_snr_weights, snr_table
from lora_dreambooth.training.recipe import DreamBoothRecipe, train

from .conftest import run_cli

# On a GPU the training runs the fast profile, whose kernels are not bitwise repeatable: compare with a tolerance.
EXACT = {"atol": 0.0, "rtol": 0.0} if not torch.cuda.is_available() else {"atol": 1e-4, "rtol": 1e-3}


def _config(instance_dir, base, out, **overrides) -> TrainConfig:
    values = dict(instance_dir=str(instance_dir), base=str(base), token="sks", class_noun="dog", output_dir=str(out),
                  resolution=32, steps=4, prior=False, num_class_images=2, class_inference_steps=2, lr=1e-3,
                  save_dtype="fp32", log_every=2)
    values.update(overrides)
    return TrainConfig(**values)


@contextmanager
def _debug_lines(name: str = "lora_dreambooth.training.batches"):
    """Collect the DEBUG messages of one of our loggers (whatever the CLI did to the parent's handlers)."""
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _copy_photos(src: Path, dst: Path, count: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dst / p.name)) for p in sorted(src.glob("*.jpg"))[:count]]


def _seen_prompts(lines: list[str]) -> set[str]:
    prompts: set[str] = set()
    for line in lines:
        if line.startswith("micro-batch") and "prompts" in line:
            prompts |= set(eval(line.split("prompts ", 1)[1]))  # the logged Python list of strings
    return prompts


# -- captions --------------------------------------------------------------------------------------------------------
def test_captions_reach_the_loop_with_placeholders_filled(tmp_path, tiny_base, dog_dir):
    photos = _copy_photos(dog_dir, tmp_path / "photos", 3)
    photos[0].with_suffix(".txt").write_text("a photo of {token} {class}\n on the beach \n")
    photos[1].with_suffix(".caption").write_text("{token} {class} in the snow")
    cfg = _config(tmp_path / "photos", tiny_base, tmp_path / "out", batch_size=3, steps=2)
    with _debug_lines() as lines:
        train(cfg)
    assert _seen_prompts(lines) == {"a photo of sks dog on the beach", "sks dog in the snow", "a photo of sks dog"}
    # --caption-dropout 1: every captioned photo is trained with the instance prompt instead
    with _debug_lines() as lines:
        train(cfg.replace(caption_dropout=1.0, output_dir=str(tmp_path / "out2")))
    assert _seen_prompts(lines) == {"a photo of sks dog"}


def test_caption_dropout_is_a_pure_function_of_seed_and_step():
    first = [dropout_mask(3, step, 4, 0.3) for step in range(200)]
    assert all(torch.equal(a, dropout_mask(3, step, 4, 0.3)) for step, a in enumerate(first))
    rate = torch.stack(first).float().mean().item()
    assert 0.2 < rate < 0.4, rate
    # two ranks with batch 2 drop exactly the captions one rank with batch 4 drops
    whole = dropout_mask(3, 7, 4, 0.5)
    halves = [dropout_mask(3, 7, 2, 0.5, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
    assert not dropout_mask(3, 7, 4, 0.0).any()


# -- several subjects ------------------------------------------------------------------------------------------------
def _two_subjects_toml(tmp_path: Path, base: Path, dog_dir: Path, cat_dir: Path, out: Path, extra: str = "") -> Path:
    config = tmp_path / "two.toml"
    config.write_text(
        f'base = "{base}"\noutput_dir = "{out}"\nresolution = 32\nsteps = 3\nprior = false\nlr = 1e-3\n'
        f'save_dtype = "fp32"\nlog_every = 1\n{extra}\n'
        f'[[subjects]]\ninstance_dir = "{dog_dir}"\ntoken = "sks"\nclass_noun = "dog"\n\n'
        f'[[subjects]]\ninstance_dir = "{cat_dir}"\ntoken = "zwx"\nclass_noun = "cat"\nname = "kitty"\n')
    return config


def test_two_subjects_one_adapter_knows_both(tmp_path, tiny_base, dog_dir, cat_dir):
    data = tomllib.loads(_two_subjects_toml(tmp_path, tiny_base, dog_dir, cat_dir, tmp_path / "out").read_text())
    cfg = TrainConfig.from_dict({**data, "steps": 16, "prior": True, "num_class_images": 2,
                                 "class_inference_steps": 2, "log_every": 4, "batch_size": 2})
    assert (cfg.token, cfg.class_noun, cfg.instance_dir) == ("sks", "dog", str(dog_dir))  # mirrored from entry 1
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    with _debug_lines() as lines:
        result = recipe.save(recipe.train())
    # each photo is trained with its own subject's prompt, class images with their own class prompt
    assert _seen_prompts(lines) == {"a photo of sks dog", "a photo of zwx cat", "a photo of dog", "a photo of cat"}
    summary = read_summary(result.adapter_path)
    assert summary["token"] == "sks" and summary["class_noun"] == "dog"  # what the app reads: the first subject
    assert [(s["name"], s["token"], s["class_noun"], s["num_instance_images"]) for s in summary["subjects"]] == [
        ("sks", "sks", "dog", 5), ("kitty", "zwx", "cat", 5)]
    # each token learned its subject: the adapter denoises that subject's photos, prompted with its token, better
    unet, te = recipe.base.unet, recipe.base.text_encoder
    for subject in recipe.subjects:
        rows = [i for i, e in enumerate(recipe.instance) if e.subject == subject.index]
        latents = recipe.batches.instance_latents.plain[rows]
        ids = recipe.prompts.ids[[recipe.prompts.row[subject.instance_prompt]] * len(rows)]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5)).to(latents.device)
        steps = [torch.full((len(rows),), t, device=latents.device) for t in (100, 400, 700)]
        losses = {}
        for enabled in (False, True):
            for model in (unet, te):
                model.enable_adapters() if enabled else model.disable_adapters()
            with torch.no_grad():
                hidden = te(ids)[0]
                losses[enabled] = sum(torch.nn.functional.mse_loss(
                    unet(recipe.base.noise_scheduler.add_noise(latents, noise, t), t, hidden).sample, noise).item()
                    for t in steps)
        assert losses[True] < losses[False], (subject.token, losses)


def test_separate_adapters_from_one_command(tmp_path, tiny_base, dog_dir, cat_dir):
    out = tmp_path / "out"
    config = _two_subjects_toml(tmp_path, tiny_base, dog_dir, cat_dir, out)
    run = run_cli("train", "--config", config, "--separate-adapters")
    assert run.returncode == 0, run.stderr[-2000:]
    files = [out / "sks" / ADAPTER_FILENAME, out / "kitty" / ADAPTER_FILENAME]
    assert [line for line in run.stdout.splitlines() if line.startswith("Wrote")] == [f"Wrote {f}" for f in files]
    for file, token, noun in zip(files, ("sks", "zwx"), ("dog", "cat")):
        summary = read_summary(file)
        assert (summary["token"], summary["class_noun"]) == (token, noun)
        assert [s["token"] for s in summary["subjects"]] == [token]
        assert summary["num_instance_images"] == 5
    a, b = load_file(str(files[0])), load_file(str(files[1]))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    saved = tomllib.loads((out / "train_config.toml").read_text())
    assert saved["separate_adapters"] is True and len(saved["subjects"]) == 2


def test_subject_prompts_never_mix_tokens(tmp_path, tiny_base, dog_dir, cat_dir):
    cats = _copy_photos(cat_dir, tmp_path / "cats", 2)
    cats[0].with_suffix(".txt").write_text("{token} cat next to sks dog")
    data = tomllib.loads(_two_subjects_toml(tmp_path, tiny_base, dog_dir, tmp_path / "cats", tmp_path / "o")
                         .read_text())
    with pytest.raises(UserInputError, match=r"caption of '.*00.jpg' names 'sks', the token of subject 'sks'"):
        DreamBoothRecipe(TrainConfig.from_dict(data)).setup()
    data["subjects"][1]["token"] = "SKS"
    with pytest.raises(UserInputError, match="token 'SKS' is already used by entry 1"):
        TrainConfig.from_dict(data)
    data["subjects"][1].update(token="zwx", class_prompt="a photo of zwx cat")
    with pytest.raises(UserInputError, match="class prompt 'a photo of zwx cat' names the token 'zwx'"):
        DreamBoothRecipe(TrainConfig.from_dict(data)).setup()


# -- aspect-ratio buckets --------------------------------------------------------------------------------------------
def test_bucket_sizes_and_assignment():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 2 for w, h in sizes)
    assert nearest_bucket(1920, 1080, sizes) == (640, 384)
    assert nearest_bucket(1000, 1000, sizes) == (512, 512)
    assert nearest_bucket(3000, 4000, sizes) == (448, 576)


def test_bucket_sampler_is_pure_and_batches_one_bucket():
    buckets = [(24, 40)] * 3 + [(40, 24)] * 5
    sampler = BucketSampler(buckets, batch_size=2, seed=1, flip=True)
    assert sampler.batches_per_epoch == 2 + 3
    seen = []
    for step in range(sampler.batches_per_epoch * 3):
        idx, flips = sampler.indices(step)
        fresh_idx, fresh_flips = BucketSampler(buckets, 2, 1, True).indices(step)
        assert torch.equal(idx, fresh_idx) and torch.equal(flips, fresh_flips)  # resumable at any step
        assert len({buckets[i] for i in idx.tolist()}) == 1
        seen += idx.tolist()
    assert set(seen) == set(range(len(buckets)))
    whole = BucketSampler(buckets, 4, 1).indices(3)[0]
    assert torch.equal(torch.cat([BucketSampler(buckets, 2, 1, rank=r, world_size=2).indices(3)[0] for r in (0, 1)]),
                       whole)


def test_buckets_keep_the_framing_of_non_square_photos(tmp_path, tiny_base, dog_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, path in enumerate(sorted(dog_dir.glob("*.jpg"))[:4]):
        image = Image.open(path)
        box = (0, 24, 128, 104) if i % 2 == 0 else (24, 0, 104, 128)  # 128x80 landscape, 80x128 portrait
        image.crop(box).save(folder / f"{i}.png")
    cfg = _config(folder, tiny_base, tmp_path / "out", buckets=True, batch_size=2, steps=4, prior=True,
                  class_dir=str(tmp_path / "class"), flip=True)
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    assert recipe.batches.instance_buckets == [(40, 24), (24, 40), (40, 24), (24, 40)]
    for example, (w, h) in zip(recipe.instance, recipe.batches.instance_buckets):
        assert abs(np.log((w / h) / (example.image.width / example.image.height))) < 0.1  # aspect kept
    for step in range(4):
        latents, rows = recipe.batches.batch(step)
        idx, _ = recipe.batches.instance_sampler.indices(step)
        w, h = recipe.batches.instance_buckets[int(idx[0])]
        assert latents.shape == (4, 4, h // 2, w // 2)  # 2 photos + 2 class images, all at the bucket's size
    result = recipe.save(recipe.train())
    assert result.last_loss is not None and np.isfinite(result.last_loss)


# -- loss options ----------------------------------------------------------------------------------------------------
def test_min_snr_weights_match_the_formula(tiny_base):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler.from_pretrained(str(tiny_base), subfolder="scheduler")
    timesteps = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    gamma = 5.0
    eps = min_snr_weights(snr_table(scheduler)[timesteps], gamma, "epsilon")
    torch.testing.assert_close(eps, torch.minimum(snr, torch.full_like(snr, gamma)) / snr)
    torch.testing.assert_close(min_snr_weights(snr_table(scheduler)[timesteps], gamma, "v_prediction"),
                               torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1))
    assert eps[0] < 0.01 and eps[-1] == 1.0  # low-noise steps weigh little, high-noise ones fully
    prediction, target = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    total, instance, prior = dreambooth_loss(prediction, target, 3, 0.5, weights=eps)
    torch.testing.assert_close(instance, (per_sample * eps)[:3].mean())
    torch.testing.assert_close(total, (per_sample * eps)[:3].mean() + 0.5 * (per_sample * eps)[3:].mean())


def test_masked_loss_counts_only_the_subject():
    prediction, target = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    target[:, :, :, 4:] = 3.0  # errors only on the right half
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :4] = 1.0  # photo 0: subject on the left half
    mask[1, :, :, 2:6] = 0.5  # photo 1: a soft mask over the middle
    _, instance, _ = dreambooth_loss(prediction, target, 2, 1.0, mask=mask)
    # photo 0: no error under its mask; photo 1: half of its (weighted) area sees an error of 9
    torch.testing.assert_close(instance, torch.tensor((0.0 + 4.5) / 2))


def test_masks_from_mask_files_and_alpha(tmp_path):
    photo = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), "red").save(photo)
    mask = Image.new("L", (40, 30), 0)
    mask.paste(255, (0, 0, 20, 30))
    mask.save(tmp_path / "a.mask.png")
    assert np.asarray(load_mask(photo, (40, 30))).mean() == pytest.approx(127.5)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 4))
    rgba.save(tmp_path / "b.png")
    assert np.asarray(load_mask(tmp_path / "b.png", (16, 16))).mean() == pytest.approx(255 / 4)
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    assert load_mask(tmp_path / "c.png", (8, 8)) is None
    Image.new("L", (9, 9)).save(tmp_path / "c.mask.png")
    with pytest.raises(UserInputError, match=r"mask '.*c.mask.png' is 9x9 but its photo is 8x8"):
        load_mask(tmp_path / "c.png", (8, 8))


def test_masked_loss_trains_and_mask_files_are_not_photos(tmp_path, tiny_base, dog_dir):
    photos = _copy_photos(dog_dir, tmp_path / "photos", 2)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    mask.save(photos[0].with_name("00.mask.png"))
    recipe = DreamBoothRecipe(_config(tmp_path / "photos", tiny_base, tmp_path / "out", masked_loss=True,
                                      batch_size=2))
    recipe.setup()
    assert [e.path.name for e in recipe.instance] == ["00.jpg", "01.jpg"]
    masks = recipe.batches.instance_masks.batch(torch.tensor([0, 1]), torch.tensor([False, False]))
    assert masks.shape == (2, 1, 16, 16) and masks[0].mean().item() == pytest.approx(0.25) and masks[1].min() == 1
    result = recipe.save(recipe.train())
    assert np.isfinite(result.last_loss)


def test_noise_offset_adds_one_constant_per_sample_and_channel(tmp_path, tiny_base, dog_dir):
    torch.testing.assert_close(add_noise_offset(torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 1, 1), 0.1),
                               torch.full((2, 4, 3, 3), 0.1))
    plain = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "a", batch_size=4))
    plain.setup()
    offset = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "b", batch_size=4, noise_offset=0.1,
                                      prediction_type="v_prediction"))
    offset.setup()
    latents, _ = plain.batches.batch(0)
    base_noise, base_t = plain.batches.noise(latents, 0)
    noise, t = offset.batches.noise(latents, 0)
    assert torch.equal(t, base_t)
    shift = noise - base_noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over the image
    per_channel = shift[:, :, 0, 0]
    assert per_channel.abs().min() > 0 and 0.02 < per_channel.std().item() < 0.3
    # --prediction-type v_prediction: the target is the velocity (the tiny base's scheduler says epsilon)
    scheduler = offset.base.noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    noisy = scheduler.add_noise(latents, noise, t)
    velocity = scheduler.get_velocity(latents, noise, t)
    assert offset.objective(velocity, latents, noise, noisy, t, None, None).item() == 0.0
    assert offset.objective(noise, latents, noise, noisy, t, None, None).item() > 0.01


# -- prior from the base model ---------------------------------------------------------------------------------------
def test_model_prior_is_zero_for_an_untrained_adapter(tmp_path, tiny_base, dog_dir):
    cfg = _config(dog_dir, tiny_base, tmp_path / "out", prior=True, prior_mode="model", batch_size=2,
                  class_dir=str(tmp_path / "never"))
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    assert recipe.class_examples == [] and not (tmp_path / "never").exists()  # no generation, no disk
    trainable = [p for p in recipe.base.unet.parameters() if p.requires_grad]
    latents, rows = recipe.batches.batch(0)
    assert [recipe.prompts.texts[int(r)] for r in rows[2:]] == ["a photo of dog"] * 2
    assert torch.equal(latents[2:], latents[:2])  # the class rows reuse the instance latents
    noise, timesteps = recipe.batches.noise(latents, 0)
    noisy = recipe.base.noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = recipe.text_encoder(recipe.prompts.ids[rows])[0]
    prediction = recipe.unet(noisy, timesteps, hidden).sample
    prior_target = recipe.objective.base_prediction(noisy[2:], timesteps[2:], rows[2:])
    _, instance, prior = dreambooth_loss(prediction, torch.cat([noise[:2], prior_target]), 2, 1.0)
    assert prior.item() < (1e-10 if not torch.cuda.is_available() else 1e-5 * instance.item())
    assert instance.item() > 0.1
    total = recipe.objective(prediction, latents, noise, noisy, timesteps, rows, None)
    torch.testing.assert_close(total, instance, **EXACT)
    assert [p for p in recipe.base.unet.parameters() if p.requires_grad] == trainable  # adapters trainable again
    result = recipe.save(recipe.train())
    assert np.isfinite(result.last_loss)
    # after training, the target is still the base's own prediction (adapters off), and the adapter now differs
    with torch.no_grad():
        trained = recipe.unet(noisy, timesteps, recipe.text_encoder(recipe.prompts.ids[rows])[0]).sample
    torch.testing.assert_close(recipe.objective.base_prediction(noisy[2:], timesteps[2:], rows[2:]), prior_target)
    assert dreambooth_loss(trained, torch.cat([noise[:2], prior_target]), 2, 1.0)[2].item() > 1e-8


# -- tokens ----------------------------------------------------------------------------------------------------------
def test_suggest_token_lists_rare_single_tokens(tiny_base):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_base), subfolder="tokenizer")
    suggestions = suggest_tokens(tokenizer, 10)
    assert [s.text for s in suggestions] == ["zwx", "sks"]  # the tiny vocabulary's rare whole words; not dog/photo
    for s in suggestions:
        assert token_pieces(tokenizer, s.text) == [s.token_id]
    run = run_cli("suggest-token", "--base", tiny_base, "--json")
    assert run.returncode == 0, run.stderr
    import json

    listed = json.loads(run.stdout)
    assert [(x["token"], x["id"]) for x in listed] == [(s.text, s.token_id) for s in suggestions]


def test_train_warns_about_split_or_common_tokens(tiny_base):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_base), subfolder="tokenizer")
    assert token_warnings(tokenizer, "sks") == []
    assert "splits into 6 tokenizer pieces (q w e r t z)" in token_warnings(tokenizer, "qwertz")[0]
    assert "is a common word" in token_warnings(tokenizer, "dog")[0]


# -- validation images -----------------------------------------------------------------------------------------------
def test_validation_grids_at_the_right_steps_without_changing_training(tmp_path, tiny_base, dog_dir):
    out = tmp_path / "with"
    cfg = _config(dog_dir, tiny_base, out, steps=5, validation_prompts=("a photo of {token} {class}", "a dog"),
                  validation_every=2, validation_inference_steps=2)
    train(cfg)
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    with Image.open(out / "validation" / grids[0]) as grid:
        assert grid.size == (2 * 32, 2 * 32)  # 2 seeds per row, one row per prompt
    a, b = (np.asarray(Image.open(out / "validation" / g)) for g in grids)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0  # the adapter changed between the two steps
    train(cfg.replace(validation_prompts=(), validation_every=0, output_dir=str(tmp_path / "without")))
    with_v, without_v = load_file(str(out / ADAPTER_FILENAME)), load_file(str(tmp_path / "without" / ADAPTER_FILENAME))
    for key in with_v:  # validation draws no training randomness (GPU kernels are not bitwise repeatable)
        torch.testing.assert_close(with_v[key], without_v[key], **EXACT)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    if events:  # tensorboard installed: the grids are logged as images too
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = set()
        for event_file in events:
            accumulator = EventAccumulator(str(event_file))
            accumulator.Reload()
            tags |= set(accumulator.Tags()["images"])
        assert "validation" in tags
