"""Pivotal tuning (--pivotal), Prodigy (--optimizer prodigy) and priors over several class prompts, on the tiny base.

One pivotal run (6 steps, 32 px, two class prompts, a checkpoint at step 3) is shared by most tests: the trained
model in memory must equal a fresh plain-diffusers pipeline given ``load_textual_inversion`` + ``load_lora_weights``,
and our own ``load_adapter`` (folder and kohya export with the bundled embedding) must give the same pictures.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_dreambooth import TrainConfig
from lora_dreambooth.errors import UserInputError
from tests.conftest import cli_in_process, small_train_args

PROMPT = "a photo of sks dog"
CLASS_PROMPTS = ("a photo of {class}", "a photo of {class} in red")
PIVOTAL_RUN = dict(pivotal=True, embedding_lr=5e-2, class_prompt=CLASS_PROMPTS, checkpoint_every=3, export=("kohya",))


def _config(base: Path, photos: Path, out: Path, **changes) -> TrainConfig:
    options = dict(resolution=32, steps=6, num_class_images=3, class_inference_steps=2, lr=1e-2, save_dtype="fp32",
                   log_every=2)
    return TrainConfig(instance_dir=str(photos), base=str(base), token="sks", class_noun="dog", output_dir=str(out),
                       **{**options, **changes})


def _latents(pipe, prompt: str = PROMPT) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(7)
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=generator, height=32, width=32,
                output_type="latent").images


def _scheduler(base: Path):
    """The same sampler for the in-memory and the reloaded pipeline (StableDiffusionPipeline's constructor turns
    DDIM's clip_sample off, an assignment afterwards does not)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(str(base), subfolder="scheduler", clip_sample=False)


def _fresh(base: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.scheduler = _scheduler(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def _deterministic(deterministic_gpu_kernels):
    """The bit-exact resume below holds on a GPU only with deterministic kernels (conftest)."""


@pytest.fixture(scope="module")
def pivotal_run(tiny_base, dog_dir, tmp_path_factory):
    """A finished --pivotal run (text-encoder LoRA on, two class prompts) and its in-memory pipeline's latents."""
    from lora_dreambooth.training.recipe import DreamBoothRecipe

    root = tmp_path_factory.mktemp("pivotal")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_DREAMBOOTH_CACHE", str(root / "cache"))
    try:
        # fp32 (on a GPU too), and the trained model compared on the CPU, where the fresh pipelines below run
        cfg = _config(tiny_base, dog_dir, root / "out", mixed_precision="no", **PIVOTAL_RUN)
        recipe = DreamBoothRecipe(cfg)
        recipe.setup()
        result = recipe.save(recipe.train())
        pipe = recipe.base.pipeline(_scheduler(tiny_base)).to("cpu")
        latents = _latents(pipe)
        row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("sks")].clone()
    finally:
        mp.undo()
    return {"out": root / "out", "result": result, "latents": latents, "row": row, "cache": root / "cache",
            "config": cfg}


def test_plain_diffusers_reload_equals_the_trained_model(pivotal_run, tiny_base):
    out = pivotal_run["out"]
    pipe = _fresh(tiny_base)
    pipe.load_textual_inversion(str(out / "embeddings.safetensors"), token="sks")
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(_latents(pipe), pivotal_run["latents"], rtol=1e-4, atol=1e-5)
    without = _fresh(tiny_base)
    without.load_lora_weights(str(out))  # the LoRA alone is not the trained model: the embedding matters
    assert not torch.allclose(_latents(without), pivotal_run["latents"], atol=1e-3)


def test_only_the_identifier_row_trains(pivotal_run, tiny_base):
    from lora_dreambooth.files.embeddings import read_embedding

    token, vector = read_embedding(pivotal_run["out"] / "embeddings.safetensors")
    assert token == "sks" and vector.shape == (1, pivotal_run["row"].numel())
    torch.testing.assert_close(vector[0], pivotal_run["row"].float())
    base = _fresh(tiny_base)
    start = base.text_encoder.get_input_embeddings().weight[base.tokenizer("dog", add_special_tokens=False).input_ids]
    assert (vector[0] - start.mean(0)).abs().max() > 1e-3, "the row never moved from its --init-token start"
    trained = _fresh(tiny_base)
    trained.load_textual_inversion(str(pivotal_run["out"] / "embeddings.safetensors"), token="sks")
    old = base.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(trained.text_encoder.get_input_embeddings().weight[: old.shape[0]], old)


def test_metadata_checkpoint_and_class_prompt_split(pivotal_run):
    from safetensors import safe_open

    from lora_dreambooth.files.metadata import read_summary

    out = pivotal_run["out"]
    summary = read_summary(out / "pytorch_lora_weights.safetensors")
    assert summary["pivotal"] == {"token": "sks", "init_token": "dog", "file": "embeddings.safetensors",
                                  "layout": "a1111-textual-inversion"}
    assert summary["subjects"][0]["class_prompts"] == ["a photo of dog", "a photo of dog in red"]
    with safe_open(str(out / "checkpoints" / "checkpoint-3" / "adapter_1.safetensors"), "pt") as fh:
        assert any("pivotal_row" in k for k in fh.keys()), "the embedding row must be checkpointed for --resume"
    folders = sorted((pivotal_run["cache"] / "class-images").iterdir())
    counts = {f.name.rsplit("-", 1)[0]: len(list(f.glob("*.png"))) for f in folders}
    assert counts == {"a-photo-of-dog": 2, "a-photo-of-dog-in-red": 1}  # 3 class images split over 2 prompts


def test_resume_restores_the_embedding_row_bit_exactly(pivotal_run, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    from lora_dreambooth import train

    monkeypatch.setenv("LORA_DREAMBOOTH_CACHE", str(pivotal_run["cache"]))  # the same class images
    part = tmp_path / "part"
    shutil.copytree(pivotal_run["out"] / "checkpoints" / "checkpoint-3", part / "checkpoints" / "checkpoint-3")
    train(pivotal_run["config"].replace(output_dir=str(part), resume=True, export=()))
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
        a, b = load_file(str(pivotal_run["out"] / name)), load_file(str(part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_load_adapter_and_kohya_bundle_carry_the_embedding(pivotal_run, tiny_base):
    from safetensors import safe_open

    from lora_dreambooth.files.load_adapter import load_adapter

    out = pivotal_run["out"]
    pipe = _fresh(tiny_base)
    load_adapter(pipe, out)
    torch.testing.assert_close(_latents(pipe), pivotal_run["latents"], rtol=1e-4, atol=1e-5)
    kohya = next(out.glob("*kohya*.safetensors"), None) or next(p for p in out.glob("*.safetensors")
                                                                 if p.name not in ("pytorch_lora_weights.safetensors",
                                                                                   "embeddings.safetensors"))
    with safe_open(str(kohya), "pt") as fh:
        assert "bundle_emb.sks.emb_params" in fh.keys()
    pipe = _fresh(tiny_base)
    load_adapter(pipe, kohya)
    torch.testing.assert_close(_latents(pipe), pivotal_run["latents"], rtol=1e-4, atol=1e-5)


def test_pivotal_without_text_encoder_lora_and_prodigy(tiny_base, dog_dir, tmp_path, capsys):
    """--pivotal with a frozen text encoder (only the row trains there) under --optimizer prodigy, via the CLI."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    run = cli_in_process(capsys, *small_train_args(dog_dir, tiny_base, out, "--pivotal", "--no-train-text-encoder",
                                                   "--optimizer", "prodigy", "--lr", "1.0", "--steps", "4",
                                                   "--class-prompt", "a photo of {class}",
                                                   "--class-prompt", "a {class} in red"))
    assert run.returncode == 0, run.stderr
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert tensors and all(k.startswith("unet.") for k in tensors)
    assert max(float(t.abs().max()) for k, t in tensors.items() if "lora_B" in k) > 0, "prodigy never stepped"
    assert (out / "embeddings.safetensors").is_file()
    from lora_dreambooth.config import read_toml

    assert read_toml(out / "train_config.toml")["class_prompt"] == ["a photo of {class}", "a {class} in red"]


def test_option_validation(tiny_base, dog_dir, tmp_path, capsys):
    with pytest.raises(UserInputError, match="prodigy takes one lr"):
        _config(tiny_base, dog_dir, tmp_path, optimizer="prodigy", lr=1.0, text_encoder_lr=0.5)
    with pytest.raises(UserInputError, match="--embedding-lr must be positive"):
        _config(tiny_base, dog_dir, tmp_path, pivotal=True, embedding_lr=0.0)
    run = cli_in_process(capsys, *small_train_args(dog_dir, tiny_base, tmp_path / "o", "--optimizer", "prodigy",
                                                   "--lr", "1.0", "--text-encoder-lr", "0.1"))
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("Error: --optimizer prodigy")


def test_class_prompt_stays_a_string_for_one_prompt(tmp_path):
    from lora_dreambooth.config import read_toml

    single = _config(tmp_path, tmp_path, tmp_path, class_prompt="a photo of {class}")
    assert single.class_prompt == "a photo of {class}" and single.to_dict()["class_prompt"] == "a photo of {class}"
    one_listed = _config(tmp_path, tmp_path, tmp_path, class_prompt=["a photo of {class}"])
    assert one_listed.to_dict() == single.to_dict()  # old checkpoints (a string) still resume
    many = _config(tmp_path, tmp_path, tmp_path, class_prompt=list(CLASS_PROMPTS))
    assert many.effective_class_prompts == ("a photo of dog", "a photo of dog in red")
    path = tmp_path / "c.toml"
    path.write_text(many.to_toml())
    assert TrainConfig.from_dict(read_toml(path)).class_prompt == CLASS_PROMPTS


def test_class_image_sets_split_counts():
    from lora_dreambooth.data.subjects import Subject, class_image_sets

    prompts = ("a", "b", "c")
    subject = Subject(0, "s", "sks", "dog", "x", "a photo of sks dog", "a", "/tmp/cls", prompts)
    sets = class_image_sets([subject], 10)
    assert [(p, Path(f).name, n) for p, f, n in sets] == [("a", "prompt-00", 4), ("b", "prompt-01", 3),
                                                          ("c", "prompt-02", 3)]
    assert [n for *_, n in class_image_sets([subject], 2)] == [1, 1]  # prompts beyond the count get none


def test_graph_blockers_name_prodigy_and_pivotal(tmp_path):
    from lora_dreambooth.training.lowmem import graph_blockers

    cfg = _config(tmp_path, tmp_path, tmp_path, pivotal=True, optimizer="prodigy", lr=1.0)
    reasons = " ".join(graph_blockers(cfg, torch.device("cuda"), 1))
    assert "prodigy" in reasons and "--pivotal" in reasons


def test_model_card_shows_the_embedding(pivotal_run):
    card = (pivotal_run["out"] / "README.md").read_text()
    assert 'pipe.load_textual_inversion("path/to/this/folder/embeddings.safetensors", token="sks")' in card
    assert "`embeddings.safetensors`: the trained embedding" in card


def test_sweep_summary_and_table():
    from lora_dreambooth.synthetic.sweep import aggregate, meets_targets, sweep_table

    runs = {"base": {"0": {"subject": 0.0, "similarity": 0.1, "edit_color": 0.9, "edit_shape": 1.0, "leak": 0.0,
                           "class_accuracy": 1.0, "world_color": 0.75}}}
    runs["default"] = {"0": {**runs["base"]["0"], "subject": 0.3, "edit_color": 0.4},
                       "1": {**runs["base"]["0"], "subject": 0.1, "edit_color": 0.2}}
    runs["pivotal"] = {"0": {**runs["base"]["0"], "subject": 0.3, "edit_color": 0.8},
                       "1": {**runs["base"]["0"], "subject": 0.2, "edit_color": 0.7, "leak": 0.1}}
    summary = {n: aggregate(list(r.values())) for n, r in runs.items()}
    assert summary["default"]["subject"]["mean"] == pytest.approx(0.2)
    assert summary["default"]["subject"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert meets_targets(summary["pivotal"], summary["default"])  # 25 % >= 20 %, 75 % >= 70 %, leak 5 % <= 5 %
    assert not meets_targets(summary["default"], summary["default"])  # colour 30 % < 70 %
    table = sweep_table({"summary": summary, "configs": ["default", "pivotal"], "seeds": [0, 1],
                         "seconds": {"default": [60.0, 62.0], "pivotal": [70.0, 72.0]}})
    rows = {line.split(" | ")[0]: line for line in table.splitlines()}
    assert rows["| `pivotal`"].endswith("| 75% ± 7 | 100% ± 0 | 5% ± 7 | 100% ± 0 | 75% ± 0 | 2 | yes | 71 |")
    assert rows["| `default`"].split(" | ")[-2] == "no" and rows["| `base`"].split(" | ")[-2] == "–"


def test_pivotal_with_several_subjects_needs_separate_adapters(tmp_path):
    subjects = [{"instance_dir": "a", "token": "sks", "class_noun": "dog"},
                {"instance_dir": "b", "token": "ohwx", "class_noun": "cat"}]
    with pytest.raises(UserInputError, match="--separate-adapters"):
        _config(tmp_path, "a", tmp_path, pivotal=True, subjects=subjects)
    assert _config(tmp_path, "a", tmp_path, pivotal=True, subjects=subjects, separate_adapters=True).pivotal
