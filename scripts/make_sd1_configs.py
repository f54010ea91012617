#!/usr/bin/env python
"""Write the SD v1.x config folder shipped in `lora_dreambooth/assets/sd-v1/` (configs and tokenizer, no weights).

    python scripts/make_sd1_configs.py BPE_FILE [OUT_DIR]

BPE_FILE is the CLIP BPE table `bpe_simple_vocab_16e6.txt.gz` inside the open_clip_torch wheel (MIT, from OpenAI's
CLIP: `pip download --no-deps open_clip_torch`, then unzip `open_clip/bpe_simple_vocab_16e6.txt.gz`). The folder
is a diffusers pipeline folder without weights: diffusers' single-file loader reads it through
`from_single_file(..., config=FOLDER, local_files_only=True)` to build an SD v1.x pipeline from an A1111/Civitai
checkpoint offline. Configs are those of CompVis/stable-diffusion-v1-4 (the same as v1.5's).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "lora_dreambooth" / "assets" / "sd-v1"
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "image_encoder": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def write_sd1_configs(bpe_file: str | Path, out: Path) -> Path:
    """model_index.json, unet/vae/text_encoder/scheduler configs and the CLIP tokenizer files under `out`."""
    import diffusers
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    sys.path.insert(0, str(REPO / "scripts"))
    from make_random_sd import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, clip_tokenizer_from_bpe

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        UNet2DConditionModel(**UNET_CONFIG).save_config(out / "unet")
        AutoencoderKL(**VAE_CONFIG).save_config(out / "vae")
    text_config = CLIPTextConfig(**TEXT_CONFIG)
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(out / "text_encoder")
    PNDMScheduler(**SCHEDULER_CONFIG).save_config(out / "scheduler")
    clip_tokenizer_from_bpe(bpe_file).save_pretrained(out / "tokenizer")
    _slim_tokenizer(out / "tokenizer")
    index = {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def _slim_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt (1.5 MB, what CLIPTokenizer loads) instead of the 3.6 MB tokenizer.json."""
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    (folder / "tokenizer.json").unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bpe_file", help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    print(f"wrote {write_sd1_configs(args.bpe_file, Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
