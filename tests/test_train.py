"""Core training, end to end on a tiny base: CLI, adapter file, diffusers loading, priors, precision, resume."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_dreambooth import TrainConfig
from lora_dreambooth.files.metadata import ADAPTER_FILENAME, read_file_metadata, read_summary
from lora_dreambooth.training.recipe import DreamBoothRecipe

from .conftest import cli_in_process, run_cli, small_train_args


def _config(instance_dir, base, out, **overrides) -> TrainConfig:
    values = dict(instance_dir=str(instance_dir), base=str(base), token="sks", class_noun="dog", output_dir=str(out),
                  resolution=32, steps=6, num_class_images=2, class_inference_steps=2, lr=1e-3, save_dtype="fp32",
                  log_every=2)
    values.update(overrides)
    return TrainConfig(**values)


def _generate(pipe, prompt="a photo of sks dog", seed=0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def _fresh_pipeline(base):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, dog_dir):
    """One in-process training run kept in memory (recipe + models) for several checks. Its models go to the CPU in
    fp32 afterwards (on a GPU they trained in bf16 there), so that they compare with fresh CPU pipelines anywhere."""
    out = tmp_path_factory.mktemp("trained") / "adapter"
    cfg = _config(dog_dir, tiny_base, out, class_dir=str(out.parent / "class"), steps=12)
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    result = recipe.save(recipe.train())
    for model in (recipe.base.unet, recipe.base.text_encoder, recipe.base.vae):
        model.to("cpu", torch.float32)
    return recipe, result, cfg


def _load_base_weights_of(pipe, recipe) -> None:
    """The base weights as the run held them, adapters left out: on a GPU the run rounded its frozen weights to bf16
    (the picture then 1.4e-3 from a fresh fp32 base's), so the file is compared on the base it was trained on."""
    for name in ("unet", "text_encoder", "vae"):
        trained = getattr(recipe.base, name).state_dict()
        base = {key.replace(".base_layer.", "."): value for key, value in trained.items() if ".lora_" not in key}
        getattr(pipe, name).load_state_dict(base, strict=True)


def test_saved_adapter_loads_in_plain_diffusers_and_matches_memory(trained, tiny_base):
    recipe, result, cfg = trained
    assert result.adapter_path == Path(cfg.output_dir) / ADAPTER_FILENAME
    in_memory = _generate(recipe.base.pipeline(scheduler=_fresh_pipeline(tiny_base).scheduler))
    fresh = _fresh_pipeline(tiny_base)
    _load_base_weights_of(fresh, recipe)
    base_image = _generate(fresh)
    fresh.load_lora_weights(cfg.output_dir)
    loaded = _generate(fresh)
    assert np.abs(loaded - base_image).max() > 1e-3, "the adapter does not change the image"
    np.testing.assert_allclose(loaded, in_memory, atol=1e-5)


def test_adapter_file_metadata(trained):
    recipe, result, cfg = trained
    raw = read_file_metadata(result.adapter_path)
    lora_meta = json.loads(raw["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 4 and lora_meta["unet.lora_alpha"] == 4.0
    assert lora_meta["text_encoder.r"] == 4
    summary = read_summary(result.adapter_path)
    assert summary["token"] == "sks" and summary["class_noun"] == "dog"
    assert summary["instance_prompt"] == "a photo of sks dog" and summary["steps"] == 12
    assert summary["config"]["resolution"] == 32 and summary["base_model"] == cfg.base
    keys = load_file(str(result.adapter_path)).keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    saved = tomllib.loads((Path(cfg.output_dir) / "train_config.toml").read_text())
    assert TrainConfig.from_dict(saved) == recipe.cfg  # the effective config: mixed precision resolved
    assert cfg.mixed_precision == "auto" and saved["mixed_precision"] == ("bf16" if torch.cuda.is_available() else "no")


def test_training_lowers_instance_loss(trained):
    """Same noise and timesteps: the adapted UNet denoises the instance latents better than the base."""
    recipe, _, _ = trained
    latents = recipe.batches.instance_latents.plain.cpu()
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=g)
    losses = {}
    for name, enabled in (("base", False), ("adapter", True)):
        unet = recipe.base.unet
        unet.enable_adapters() if enabled else unet.disable_adapters()
        te = recipe.base.text_encoder
        te.enable_adapters() if enabled else te.disable_adapters()
        total = 0.0
        with torch.no_grad():
            hidden = te(recipe.prompts.ids[recipe.batches.instance_rows].cpu())[0]
            for t in (100, 300, 500, 700, 900):
                timesteps = torch.full((latents.shape[0],), t)
                noisy = recipe.base.noise_scheduler.add_noise(latents, noise, timesteps)
                total += torch.nn.functional.mse_loss(unet(noisy, timesteps, hidden).sample, noise).item()
        losses[name] = total
    recipe.base.unet.enable_adapters()
    recipe.base.text_encoder.enable_adapters()
    assert losses["adapter"] < losses["base"], losses


def test_cli_train_and_inspect(tmp_path, tiny_base, dog_dir, trained):
    out = tmp_path / "cli-out"
    proc = run_cli(*small_train_args(dog_dir, tiny_base, out, "--steps", "12", "--class-dir", str(tmp_path / "c")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / ADAPTER_FILENAME).is_file()
    assert "Wrote" in proc.stdout
    insp = run_cli("inspect", out)
    assert insp.returncode == 0, insp.stderr
    for text in ("sks", "dog", "rank:", "alpha:", "4.0"):
        assert text in insp.stdout
    as_json = json.loads(run_cli("inspect", out / ADAPTER_FILENAME, "--json").stdout)
    assert as_json["summary"]["rank"] == 4 and as_json["tensors"]["keys"] > 0
    # Same config and seed as the in-process run (fresh class dir with the same seeds): same weights.
    _, result, _ = trained
    cli_sd, api_sd = load_file(str(out / ADAPTER_FILENAME)), load_file(str(result.adapter_path))
    assert cli_sd.keys() == api_sd.keys()
    for key in api_sd:
        torch.testing.assert_close(cli_sd[key], api_sd[key], atol=1e-5, rtol=1e-4)


def test_refuses_finished_output_without_overwrite(tmp_path, tiny_base, dog_dir, trained):
    _, result, _ = trained
    out = Path(result.adapter_path).parent
    before = Path(result.adapter_path).read_bytes()
    proc = run_cli(*small_train_args(dog_dir, tiny_base, out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: output folder")
    assert "Traceback" not in proc.stderr
    assert Path(result.adapter_path).read_bytes() == before


def test_prior_generates_only_missing_class_images(tmp_path, tiny_base, dog_dir):
    from PIL import Image

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 100, 50, 50)).save(class_dir / f"mine-{i}.png")
    mine = {p.name: p.read_bytes() for p in class_dir.iterdir()}
    cfg = _config(dog_dir, tiny_base, tmp_path / "out", class_dir=str(class_dir), num_class_images=5, steps=2)
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    images = sorted(p.name for p in class_dir.glob("*.png"))
    assert images == ["class-00000.png", "class-00001.png", "class-00002.png", "mine-0.png", "mine-1.png"]
    assert all((class_dir / n).read_bytes() == b for n, b in mine.items())
    assert len(recipe.class_examples) == 5
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")}
    DreamBoothRecipe(cfg.replace(num_class_images=4, overwrite=True)).setup()
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == stamps
    assert json.loads((class_dir / "manifest.json").read_text())["prompt"] == "a photo of dog"


def test_bf16_mixed_precision_keeps_fp32_adapters(tmp_path, tiny_base, dog_dir):
    cfg = _config(dog_dir, tiny_base, tmp_path / "bf16", mixed_precision="bf16", steps=3,
                  class_dir=str(tmp_path / "class"))
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    trainable = [p for p in recipe.base.unet.parameters() if p.requires_grad]
    frozen = [p for p in recipe.base.unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    result = recipe.save(recipe.train())
    assert result.last_loss is not None and np.isfinite(result.last_loss)


def test_fp16_on_cpu_is_a_clear_error(tmp_path, tiny_base, dog_dir):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    proc = run_cli(*small_train_args(dog_dir, tiny_base, tmp_path / "o", "--mixed-precision", "fp16"))
    assert proc.returncode == 2
    assert "fp16 needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / ADAPTER_FILENAME).exists()


def test_toml_config_and_flag_override(tmp_path, tiny_base, dog_dir, capsys):
    """--config and flags through the real entry point (in this process: option parsing needs no fresh one)."""
    config = tmp_path / "run.toml"
    config.write_text(
        f'instance_dir = "{dog_dir}"\nbase = "{tiny_base}"\ntoken = "zwx"\nclass_noun = "dog"\n'
        f'output_dir = "{tmp_path / "o"}"\nresolution = 32\nsteps = 2\nrank = 2\nprior = false\n'
        f'no_such_option = 1\n')
    proc = cli_in_process(capsys, "train", "--config", config)
    assert proc.returncode == 2 and "unknown option(s) no_such_option" in proc.stderr
    config.write_text(config.read_text().replace("no_such_option = 1\n", ""))
    proc = cli_in_process(capsys, "train", "--config", config, "--rank", "3", "--save-dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = tomllib.loads((tmp_path / "o" / "train_config.toml").read_text())
    assert saved["rank"] == 3 and saved["token"] == "zwx" and saved["prior"] is False and saved["steps"] == 2
    assert read_summary(tmp_path / "o" / ADAPTER_FILENAME)["rank"] == 3


def test_repeatable_options_keep_whole_values(tmp_path, tiny_base, dog_dir, capsys):
    """List options given on the command line (`--unet-target-modules A --unet-target-modules B`, `--export kohya`)
    arrive as whole names, in the saved config and in the adapter's layers, and a lone TOML string is one item."""
    out = tmp_path / "o"
    proc = cli_in_process(capsys, *small_train_args(dog_dir, tiny_base, out, "--no-prior", "--steps", "2",
                                                   "--unet-target-modules", "to_q", "--unet-target-modules",
                                                   "to_v", "--export", "kohya"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = tomllib.loads((out / "train_config.toml").read_text())
    assert saved["unet_target_modules"] == ["to_q", "to_v"] and saved["export"] == ["kohya"]
    unet_layers = {k.split(".lora")[0].rsplit(".", 1)[-1] for k in load_file(out / ADAPTER_FILENAME)
                   if k.startswith("unet.")}
    assert unet_layers == {"to_q", "to_v"}
    assert any(p.name != ADAPTER_FILENAME and p.suffix == ".safetensors" for p in out.iterdir())
    config = TrainConfig(instance_dir=str(dog_dir), base=str(tiny_base), token="sks", class_noun="dog",
                         output_dir=str(out), export="kohya", unet_target_modules="to_q")
    assert config.export == ("kohya",) and config.unet_target_modules == ("to_q",)


def test_resume_from_checkpoint_is_bit_exact(tmp_path, tiny_base, dog_dir, deterministic_gpu_kernels):
    common = dict(steps=8, checkpoint_every=4, class_dir=str(tmp_path / "class"))
    full = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "full", **common))
    full.setup()
    full.save(full.train())
    # A second run is stopped right after its step-4 checkpoint, then resumed.
    part = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "part", **common))
    part.setup()
    part.total_steps = 5  # the step-4 checkpoint is written on the way; the run then "dies" after step 5
    part.train()
    assert (tmp_path / "part" / "checkpoints" / "checkpoint-4").is_dir()
    resumed = DreamBoothRecipe(_config(dog_dir, tiny_base, tmp_path / "part", resume=True, **common))
    resumed.setup()
    assert resumed.start_step == 4
    resumed.save(resumed.train())
    a = load_file(str(tmp_path / "full" / ADAPTER_FILENAME))
    b = load_file(str(tmp_path / "part" / ADAPTER_FILENAME))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bf16_run_is_repeatable_when_class_images_are_reused(tmp_path, tiny_base, dog_dir):
    """The first run generates class images, the second reuses them: the VAE must not be left bf16-rounded."""
    outs = []
    for name in ("first", "second"):
        cfg = _config(dog_dir, tiny_base, tmp_path / name, mixed_precision="bf16", steps=2,
                      class_dir=str(tmp_path / "class"))
        outs.append(load_file(str(_train_and_save(cfg))))
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def _train_and_save(cfg: TrainConfig) -> Path:
    recipe = DreamBoothRecipe(cfg)
    recipe.setup()
    return recipe.save(recipe.train()).adapter_path


def test_cpu_adamw_is_fused_and_steps_like_the_per_tensor_loop():
    """On a CPU the optimizer is torch's fused AdamW (one kernel for every adapter tensor): the same update as the
    per-tensor Python loop, within float rounding."""
    from lora_dreambooth.training.optim import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in ((4, 32), (32, 4), (7,))]
    fused_params = [torch.nn.Parameter(t.clone()) for t in start]
    loop_params = [torch.nn.Parameter(t.clone()) for t in start]
    fused = build_optimizer("adamw", [{"params": fused_params, "lr": 1e-2}], weight_decay=0.01,
                            device=torch.device("cpu"))
    loop = torch.optim.AdamW([{"params": loop_params, "lr": 1e-2}], weight_decay=0.01, foreach=False)
    assert fused.param_groups[0]["fused"]
    for step in range(5):
        for a, b in zip(fused_params, loop_params):
            a.grad = torch.full_like(a, 0.1 * (step + 1)) + a.detach()
            b.grad = torch.full_like(b, 0.1 * (step + 1)) + b.detach()
        fused.step()
        loop.step()
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
