"""`lora-dreambooth` command line: thin click commands that parse, build a config and call the library.

Exit codes: 0 success; 2 usage or bad input (one line `Error: ...` naming the culprit); 1 unexpected failure.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click

from lora_dreambooth.config import (CROPS, EXPORT_FORMATS, INITS, LR_SCHEDULERS, MIXED_PRECISIONS, OPTIMIZERS,
                                    PREDICTION_TYPES, PRIOR_MODES, PROFILES, SAVE_DTYPES, VARIANTS, TrainConfig,
                                    mirror_first_subject, read_toml)
from lora_dreambooth.errors import TrainingDiverged, UserInputError

# Help text for each TrainConfig field; the options themselves are generated from the dataclass.
TRAIN_HELP: dict[str, str] = {
    "base": "Base SD v1.x model: a diffusers folder, an A1111/Civitai .safetensors checkpoint (.ckpt with "
            "--allow-pickle) or a hub id.",
    "token": "Rare word that will name your subject (e.g. sks).",
    "class_noun": "What the subject is (dog, person, backpack).",
    "output_dir": "Folder for pytorch_lora_weights.safetensors, train_config.toml, checkpoints, logs.",
    "instance_prompt": "Prompt for your photos; {token} and {class} are filled in. [a photo of {token} {class}]",
    "class_prompt": "Prompt for class images; repeat it to split the class images across several prompts (e.g. the "
                    "edits you will ask for: 'a photo of {class} in red'). [a photo of {class}]",
    "variant": "Adapter variant.",
    "rank": "Adapter rank.",
    "alpha": "Adapter alpha (scale = alpha / rank). [= rank]",
    "train_text_encoder": "Also train a LoRA on the text encoder.",
    "unet_target_modules": "UNet modules that get adapters (repeatable).",
    "text_encoder_target_modules": "Text-encoder modules that get adapters (repeatable).",
    "prior": "Prior preservation with class images.",
    "prior_mode": "Prior target: generated class images, or the frozen base's own prediction.",
    "prior_weight": "Weight of the prior-preservation loss.",
    "class_dir": "Folder of class images (missing ones are generated). [a cache folder keyed by base + prompt]",
    "num_class_images": "How many class images to use.",
    "class_inference_steps": "Denoising steps when generating class images.",
    "steps": "Optimizer steps. [100 per instance image, at most 1500]",
    "batch_size": "Instance images per step (plus as many class images with prior preservation).",
    "gradient_accumulation": "Micro-batches per optimizer step.",
    "lr": "Learning rate.",
    "scale_lr": "Multiply the learning rates by the effective batch size (processes x batch x accumulation).",
    "text_encoder_lr": "Learning rate of the text-encoder adapter. [= --lr]",
    "lr_scheduler": "Learning-rate schedule.",
    "warmup_steps": "Warm-up steps of the schedule.",
    "optimizer": "adamw, adamw8bit (bitsandbytes), or prodigy (pip install prodigyopt; it estimates its own step "
                 "size: use --lr 1.0, one lr for all parameters).",
    "weight_decay": "AdamW weight decay.",
    "max_grad_norm": "Gradient clipping (0 disables).",
    "mixed_precision": "Compute precision of the frozen model; adapter weights stay fp32. auto: bf16 on GPUs that "
                       "support it, fp16 on older GPUs, no on CPU.",
    "max_vram": "With --profile auto: pick the fastest settings predicted to fit this much GPU memory (e.g. 4GB).",
    "gradient_checkpointing": "Trade speed for memory.",
    "profile": "Speed/memory profile.",
    "compile": "torch.compile the UNet (GPU).",
    "resolution": "Training resolution (multiple of 8).",
    "crop": "Train on a square at the centre of each photo, or (random) at a place drawn anew every epoch.",
    "flip": "Random horizontal flips.",
    "latent_cache": "Keep the encoded latents in the cache folder: a rerun on the same photos, class images, "
                    "resolution, seed and VAE loads them instead of encoding again.",
    "skip_bad_images": "Skip unreadable photos with a warning instead of stopping.",
    "seed": "Random seed (the whole run is reproducible from it).",
    "checkpoint_every": "Save a resumable checkpoint every N steps (0: never).",
    "checkpoints_total_limit": "Keep at most N checkpoints.",
    "resume": "Resume from the latest checkpoint in the output folder.",
    "overwrite": "Replace a finished adapter in the output folder.",
    "save_dtype": "Precision of the saved adapter weights.",
    "log_every": "Log the loss every N steps.",
    "progress_file": "Also append step, total, loss and ETA as JSON lines to this file (read by the app).",
    "sample_prompts": "Prompt for a sample grid written after training (repeatable).",
    "allow_pickle": "Allow loading pickle (.bin/.ckpt) weights, which can run code.",
    "pivotal": "Pivotal tuning: the token gets its own trained input embedding (added to the tokenizer), saved "
               "beside the adapter as embeddings.safetensors (A1111 textual-inversion layout).",
    "init_token": "With --pivotal: word(s) whose embedding starts the token's. [the class noun]",
    "embedding_lr": "With --pivotal: learning rate of the token's embedding. [= --text-encoder-lr, else --lr]",
    "init": "LoRA initialisation: gaussian, or pissa/olora (start from the base weights' SVD/QR factors; the saved "
            "file is still a plain delta on the untouched base). lora, dora, rslora only.",
    "export": "Also write the adapter in this layout beside it (repeatable): kohya (A1111, ComfyUI).",
    "separate_adapters": "With [[subjects]] in --config: one adapter per subject (OUT/<name>/), not one for all.",
    "captions": "Use photo.txt / photo.caption beside each photo as its prompt ({token}/{class} filled in).",
    "caption_dropout": "Probability of training a captioned photo with the instance prompt instead.",
    "buckets": "Aspect-ratio buckets: non-square photos keep their framing instead of a square crop.",
    "masked_loss": "Weight the loss by photo.mask.png (white = subject) or the photo's alpha channel.",
    "snr_gamma": "Min-SNR loss weighting with this gamma (5 is the paper's choice). [off]",
    "noise_offset": "Noise offset (per-channel constant added to the noise, e.g. 0.05).",
    "prediction_type": "Training target. [the base scheduler's prediction_type]",
    "validation_prompts": "Prompt for validation images during training (repeatable).",
    "validation_every": "Write a validation grid every N steps (0: never).",
    "validation_inference_steps": "Denoising steps of validation images.",
}
CHOICES = {"variant": VARIANTS, "init": INITS, "mixed_precision": MIXED_PRECISIONS, "optimizer": OPTIMIZERS,
           "lr_scheduler": LR_SCHEDULERS, "crop": CROPS, "save_dtype": SAVE_DTYPES, "prior_mode": PRIOR_MODES,
           "profile": PROFILES, "prediction_type": PREDICTION_TYPES}
FLAG_NAMES = {"output_dir": "--output", "lr": "--lr", "validation_prompts": "--validation-prompt"}
CONFIG_FILE_ONLY = ("instance_dir", "subjects")  # the positional argument, and the TOML [[subjects]] list


def _option_for(field: dataclasses.Field) -> click.Option | None:
    """A click option generated from one TrainConfig field (defaults stay in the dataclass)."""
    if field.name in CONFIG_FILE_ONLY:
        return None
    name = FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
    hint = typing.get_type_hints(TrainConfig)[field.name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    help_text = TRAIN_HELP.get(field.name, "")
    if field.default is not dataclasses.MISSING and field.default not in (None, ()) and kind is not bool:
        help_text += f" [default: {field.default}]"
    if kind is bool:
        return click.Option([f"{name}/--no-{name[2:]}", field.name], default=None, help=help_text)
    if typing.get_origin(kind) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint)):
        return click.Option([name, field.name], multiple=True, default=None, help=help_text)
    click_type: Any = click.Choice(CHOICES[field.name]) if field.name in CHOICES else kind
    return click.Option([name, field.name], type=click_type, default=None, help=help_text)


def train_options(func):
    """Attach one option per TrainConfig field."""
    for field in reversed(dataclasses.fields(TrainConfig)):
        option = _option_for(field)
        if option is not None:
            func.__click_params__ = getattr(func, "__click_params__", []) + [option]
    return func


def config_from_cli(ctx: click.Context, config_file: str | None, values: dict[str, Any]) -> TrainConfig:
    """TOML file values, overridden by options the user actually typed."""
    data: dict[str, Any] = read_toml(config_file) if config_file else {}
    source = f"config file '{config_file}'" if config_file else "command line"
    for key, value in values.items():
        passed = ctx.get_parameter_source(key) not in (click.core.ParameterSource.DEFAULT, None)
        if passed and value is not None and value != ():
            data[key] = value
    data = mirror_first_subject(data)
    for flag, key in (("--base", "base"), ("--token", "token"), ("--class-noun", "class_noun"),
                      ("--output", "output_dir"), ("INSTANCE_DIR", "instance_dir")):
        if not data.get(key):
            raise UserInputError(f"missing {flag} (give it on the command line or in --config)")
    return TrainConfig.from_dict(data, source=source)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lora-dreambooth")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages.")
def cli(verbose: bool) -> None:
    """Teach Stable Diffusion v1.x a new subject from a few photos (DreamBooth + LoRA)."""
    setup_logging(logging.DEBUG if verbose else logging.INFO)


@cli.command(context_settings={"show_default": False})
@click.argument("instance_dir", required=False)
@click.option("--config", "config_file", type=click.Path(), help="TOML file holding any option; flags override it.")
@train_options
@click.pass_context
def train(ctx: click.Context, instance_dir: str | None, config_file: str | None, **options: Any) -> None:
    """Train a DreamBooth adapter on the photos in INSTANCE_DIR."""
    from lora_dreambooth.training.recipe import train as run_training

    options["instance_dir"] = instance_dir
    config = config_from_cli(ctx, config_file, options)
    result = run_training(config)
    if result.interrupted:
        click.echo(f"Interrupted at step {result.steps_done}/{result.total_steps}; checkpoint saved. "
                   f"Resume with the same command plus --resume.", err=True)
        sys.exit(130)
    for path in result.adapter_paths or ([result.adapter_path] if result.adapter_path is not None else []):
        click.echo(f"Wrote {path}")  # only the main process writes adapters


@cli.command("suggest-token")
@click.option("--base", required=True, help="Base SD v1.x model: a local diffusers folder, an A1111/Civitai "
              ".safetensors checkpoint (.ckpt with --allow-pickle) or a hub id.")
@click.option("--count", default=20, show_default=True, help="How many tokens to list.")
@click.option("--min-length", default=2, show_default=True, help="Fewest letters.")
@click.option("--max-length", default=4, show_default=True, help="Most letters.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def suggest_token(base: str, count: int, min_length: int, max_length: int, as_json: bool) -> None:
    """List rare single-token words of the base's tokenizer to use as --token (rarest first)."""
    from lora_dreambooth.data.tokens import suggest_tokens
    from lora_dreambooth.models import load_tokenizer

    suggestions = suggest_tokens(load_tokenizer(base), count, min_length=min_length, max_length=max_length)
    if not suggestions:
        raise UserInputError(f"no candidate tokens in the tokenizer of '{base}': none of its whole-word entries of "
                             f"{min_length}-{max_length} letters is rare and encodes back to one token (a tiny or "
                             f"byte-level vocabulary has none); widen --min-length/--max-length or pick a rare "
                             f"word such as 'sks' yourself")
    if as_json:
        click.echo(json.dumps([{"token": s.text, "id": s.token_id, "rarity": round(s.rarity, 3)}
                               for s in suggestions], indent=2))
        return
    for s in suggestions:
        click.echo(f"{s.text:<8} id {s.token_id:<6} rarity {s.rarity:.2f}")


@cli.command()
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle files.")
def inspect(adapter: str, as_json: bool, allow_pickle: bool) -> None:
    """Print an adapter's metadata and tensor statistics."""
    from lora_dreambooth.files.adapter_file import inspect_adapter

    info = inspect_adapter(adapter, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(format_inspection(info))


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable `inspect` output."""
    summary, tensors = info["summary"], info["tensors"]
    lines = [f"{'file:':<20}{info['file']} ({info['file_bytes'] / 1e6:.2f} MB)"]
    if not summary:
        lines.append(f"{'metadata:':<20}none from lora-dreambooth (written by another tool)")
    for key in ("token", "class_noun", "instance_prompt", "base_model", "variant", "rank", "alpha", "steps",
                "resolution", "train_text_encoder", "version"):
        if key in summary:
            lines.append(f"{key + ':':<20}{summary[key]}")
    if info.get("layout") == "kohya":
        lines.append(f"{'layout:':<20}kohya/A1111 (alpha per module in `.alpha`)")
    else:
        lines.append(f"{'diffusers metadata:':<20}{'yes' if info['has_diffusers_metadata'] else 'no (loaders assume alpha = rank)'}")
    consumers = info.get("native_consumers") or {}
    if consumers:
        lines.append(f"{'loads natively in:':<20}" + f"\n{'':<20}".join(f"{k}: {v}" for k, v in consumers.items()))
    comps = ", ".join(f"{k} {v}" for k, v in sorted(tensors["components"].items()))
    lines.append(f"{'tensors:':<20}{tensors['keys']} keys ({comps}), {tensors['params']:,} params, "
                 f"{tensors['bytes']:,} bytes, dtypes {tensors['dtypes']}")
    return "\n".join(lines)


@cli.command("export")
@click.argument("adapter")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS + ("checkpoint",)), default="kohya",
              show_default=True, help="kohya: the A1111 / ComfyUI / kohya sd-scripts layout (LyCORIS names for LoHa "
              "and LoKr). checkpoint: --base with the adapter fused in, one SD v1 .safetensors to load as a model.")
@click.option("--out", "out_file", required=True, help="The .safetensors file to write.")
@click.option("--dtype", type=click.Choice(SAVE_DTYPES), default=None,
              help="Tensor precision. [kohya: the adapter's; checkpoint: fp16]")
@click.option("--base", default=None, help="With --format checkpoint: the SD v1.x base to fuse into (a "
              "checkpoint file, a diffusers folder or a hub id).")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help="With --format checkpoint: the adapter's strength in the merged weights.")
@click.option("--allow-pickle", is_flag=True, help="Allow a .ckpt base or pickle adapter, which can run code.")
def export_command(adapter: str, fmt: str, out_file: str, dtype: str | None, base: str | None, strength: float,
                   allow_pickle: bool) -> None:
    """Write ADAPTER (a folder or file) in another tool's layout, or merged into a base checkpoint."""
    from lora_dreambooth.files.export import export_kohya

    if fmt == "checkpoint":
        from lora_dreambooth.files.checkpoint import export_checkpoint

        if not base:
            raise UserInputError("--format checkpoint needs --base (the model to fuse the adapter into)")
        written = export_checkpoint(adapter, base, out_file, strength=strength, save_dtype=dtype or "fp16",
                                    allow_pickle=allow_pickle)
        click.echo(f"Wrote {written}")
        return
    if base or strength != 1.0:
        raise UserInputError("--base and --strength belong to --format checkpoint (a kohya file is the adapter alone)")
    click.echo(f"Wrote {export_kohya(adapter, out_file, save_dtype=dtype)}")


@cli.command("import")
@click.argument("file")
@click.option("--out", "out_dir", required=True, help="Folder for pytorch_lora_weights.safetensors and README.md.")
@click.option("--dtype", type=click.Choice(SAVE_DTYPES), default=None, help="Tensor precision. [the file's]")
@click.option("--overwrite", is_flag=True, help="Replace an adapter already in --out.")
def import_command(file: str, out_dir: str, dtype: str | None, overwrite: bool) -> None:
    """Convert a kohya/LyCORIS (or diffusers) adapter FILE into this package's layout in --out."""
    from lora_dreambooth.files.export import import_adapter

    click.echo(f"Wrote {import_adapter(file, out_dir, save_dtype=dtype, overwrite=overwrite)}")


@cli.command()
@click.option("--out", "out_dir", default="demo-output", show_default=True, help="Where to write everything.")
@click.option("--base", default=None,
              help="A real SD v1.x base (trains on the bundled dog photos); default: the shipped synthetic base "
                   "and the synthetic subject (offline, about a minute on a CPU).")
@click.option("--steps", type=int, default=None, help="Training steps. [600 synthetic, 400 real base]")
@click.option("--resolution", type=int, default=None, help="Training resolution (real base only). [512]")
def demo(out_dir: str, base: str | None, steps: int | None, resolution: int | None) -> None:
    """Offline demo: teach a base a subject, write comparison.png (photos, base vs adapter on the same seeds)."""
    from lora_dreambooth.demo import run_demo

    run_demo(Path(out_dir), base=base, steps=steps, resolution=resolution)


@cli.command()
@click.option("--base", required=True, help="Base SD v1.x model: a local diffusers folder, an A1111/Civitai "
              ".safetensors checkpoint (.ckpt with --allow-pickle) or a hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="PATH[:WEIGHT]",
              help="Adapter folder or file, optionally with a strength (repeatable to mix; none: base model).")
@click.option("--prompt", required=True, help="What to draw; use the subject's token (e.g. 'a photo of sks dog').")
@click.option("--out", "out_dir", required=True, help="Folder for the PNGs (settings embedded) and grid.png.")
@click.option("--negative-prompt", default="", help="What to avoid.")
@click.option("--num-images", default=4, show_default=True, help="Images (seeds SEED, SEED+1, ...).")
@click.option("--steps", default=25, show_default=True, help="Denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", default=0, show_default=True, help="Seed of the first image.")
@click.option("--height", type=int, default=None, help="Image height. [the model's native size]")
@click.option("--width", type=int, default=None, help="Image width. [the model's native size]")
@click.option("--device", default=None, help="cuda, cpu, ... [cuda if available]")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle (.bin) adapters and a .ckpt base, which can run code.")
def generate(base: str, adapters: tuple[str, ...], prompt: str, out_dir: str, negative_prompt: str, num_images: int,
             steps: int, guidance: float, seed: int, height: int | None, width: int | None, device: str | None,
             allow_pickle: bool) -> None:
    """Generate images with trained adapters and write them to --out."""
    from lora_dreambooth.files.metadata import resolve_adapter_file
    from lora_dreambooth.serve.generation import GenerationRequest, save_generation
    from lora_dreambooth.serve.pipeline import ResidentPipeline, parse_adapter_spec

    specs = [parse_adapter_spec(spec) for spec in adapters]
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                                seed=seed, num_images=num_images, height=height, width=width)
    request.validated()  # fail on bad settings before loading anything
    files = [resolve_adapter_file(path, allow_pickle=allow_pickle) for path, _ in specs]  # missing, pickle, broken
    resident = ResidentPipeline.from_base(base, device=device, allow_pickle=allow_pickle)
    names = [resident.add(file) for file in files]
    result = resident.generate(dataclasses.replace(request, adapters=tuple(zip(names, (w for _, w in specs)))))
    for path in save_generation(result, out_dir):
        click.echo(f"Wrote {path}")


@cli.command()
@click.option("--base", required=True, help="Base SD v1.x model: a local diffusers folder, an A1111/Civitai "
              ".safetensors checkpoint (.ckpt with --allow-pickle) or a hub id.")
@click.option("--adapters", "adapters_dir", required=True,
              help="Library folder: sub-folders with pytorch_lora_weights.safetensors and/or .safetensors files.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=7860, show_default=True, help="Port.")
@click.option("--share", is_flag=True, help="Also make a public gradio.live link (off by default).")
@click.option("--device", default=None, help="cuda, cpu, ... [cuda if available]")
@click.option("--fuse", is_flag=True, help="Fuse the active subject into the base while it stays selected.")
@click.option("--max-queue", default=16, show_default=True, help="Requests that may wait; more are turned away.")
@click.option("--allow-pickle", is_flag=True, help="Allow a .ckpt base and pickle (.bin) adapters, which can run code.")
@click.option("--train/--no-train", "train_tab", default=True, show_default=True,
              help="A Train tab: upload photos and train new subjects from the app (one at a time, in a worker).")
@click.option("--train-config", type=click.Path(), default=None,
              help="TOML of train options for jobs started from the app (e.g. resolution, lr, num_class_images).")
def serve(base: str, adapters_dir: str, host: str, port: int, share: bool, device: str | None, fuse: bool,
          max_queue: int, allow_pickle: bool, train_tab: bool, train_config: str | None) -> None:
    """Web app: pick a trained subject from a dropdown and generate (base loaded once); train new ones."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserInputError("the app needs gradio: pip install 'lora-dreambooth[app]' "
                             "(or pip install gradio)") from None
    from lora_dreambooth.serve.app import serve as run_server

    defaults = read_toml(train_config) if train_config else None
    run_server(base, adapters_dir, host=host, port=port, share=share, device=device, fuse=fuse, max_queue=max_queue,
               allow_pickle=allow_pickle, train=train_tab, train_defaults=defaults)


@cli.command()
@click.option("--base", required=True, help="Base SD v1.x model: a local diffusers folder, an A1111/Civitai "
              ".safetensors checkpoint (.ckpt with --allow-pickle) or a hub id.")
@click.option("--adapter", required=True, help="Adapter folder or .safetensors file to evaluate.")
@click.option("--real-dir", required=True, help="Folder of real photos of the subject (the DINO / CLIP-I reference).")
@click.option("--kind", type=click.Choice(["object", "live"]), required=True, help="DreamBench prompt set.")
@click.option("--out", "out_dir", required=True, help="Where scores.json, per_prompt.csv and the contact sheet go.")
@click.option("--images-per-prompt", default=4, show_default=True, help="Images per prompt (the paper uses 4).")
@click.option("--prompts", "prompts_file", default=None, help="Own prompt file ({unique_token}/{class_token}).")
@click.option("--clip", default="openai/clip-vit-base-patch32", show_default=True, help="CLIP model (folder or hub id).")
@click.option("--dino", default="facebook/dino-vits16", show_default=True, help="DINO ViT-S/16 model (folder or hub id).")
@click.option("--seed", default=0, show_default=True, help="Image k of a prompt uses seed + k.")
@click.option("--steps", default=50, show_default=True, help="Denoising steps per image.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--size", default=None, type=int, help="Image size. [the adapter's training resolution]")
@click.option("--compare-base", is_flag=True, help="Also score the base model without the adapter.")
@click.option("--token", default=None, help="Override the token from the adapter's metadata.")
@click.option("--class-noun", default=None, help="Override the class noun from the adapter's metadata.")
@click.option("--device", default=None, help="cuda, cpu, ... [cuda if available]")
@click.option("--allow-pickle", is_flag=True, help="Allow a .ckpt base, which can run code.")
def evaluate(**options: Any) -> None:
    """DreamBench scores (DINO, CLIP-I, CLIP-T) of an adapter, comparable with the DreamBooth paper."""
    from lora_dreambooth.evaluation.run import evaluate_adapter

    click.echo(evaluate_adapter(**options))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"Error: {message}"
        if record.levelno >= logging.WARNING:
            return f"Warning: {message}"
        return message


def setup_logging(level: int = logging.INFO) -> None:
    """Our messages on stderr, one line each; library chatter stays quiet."""
    logger = logging.getLogger("lora_dreambooth")
    if not any(getattr(h, "_lora_dreambooth", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        handler._lora_dreambooth = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def quiet_third_party_logs() -> None:
    """Keep the terminal to our own messages: transformers' torchvision notice, bitsandbytes' `kernels` notice."""
    import os

    verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:3])
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps our errors to exit codes and one-line messages."""
    quiet_third_party_logs()
    try:
        cli.main(args=argv, prog_name="lora-dreambooth", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserInputError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except TrainingDiverged as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def run() -> None:
    """The `lora-dreambooth` console script and `python -m lora_dreambooth`: `main`, then a quick exit.

    Before the interpreter exits, every object alive is frozen out of the garbage collector (`gc.freeze`): its
    last collection would otherwise walk all the objects torch, diffusers and transformers created, which took
    1.0-1.2 s after a finished `train` on a 2-core host (0.2 s frozen). Exit handlers, log flushing and thread
    joins still run, objects without reference cycles are still freed, and the rest of the memory goes back to the
    system with the process. Not in `main`, which tests and the app call in a process that goes on.
    """
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    run()
