#!/usr/bin/env python
"""Write a diffusers folder with the real Stable Diffusion v1.4 architecture and random weights, offline.

    python scripts/make_random_sd.py OUT_DIR [--vocab bpe_simple_vocab_16e6.txt.gz] [--device cuda] [--seed 0]

Same configs as CompVis/stable-diffusion-v1-4 (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M, PNDM
scheduler), so speed and memory measured on it are those of the real model. With `--vocab` (the CLIP BPE file
shipped inside the open_clip_torch wheel: `pip download --no-deps open_clip_torch`) the tokenizer is the real
49,408-token CLIP tokenizer; without it, the tiny byte-level tokenizer of `lora_dreambooth.tiny` padded to the
same vocabulary size. Building on a GPU (`--device cuda`) takes seconds; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408

UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as in SD v1.4's text_encoder config
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)


def _bytes_to_unicode() -> list[str]:
    from lora_dreambooth.tiny import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def clip_tokenizer_from_bpe(bpe_path: str | Path):
    """The real CLIP tokenizer, derived from open_clip's `bpe_simple_vocab_16e6.txt.gz` as open_clip does."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise SystemExit(f"{bpe_path}: expected {CLIP_VOCAB_SIZE} tokens, derived {len(vocab)}")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_random_sd14(seed: int = 0, vocab: str | None = None, device: str = "cpu"):
    """A StableDiffusionPipeline with SD v1.4's architecture and random weights (fp32, on the CPU)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_dreambooth.tiny import build_tiny_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    tokenizer = clip_tokenizer_from_bpe(vocab) if vocab else build_tiny_tokenizer()
    pipe = StableDiffusionPipeline(vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer,
                                   unet=unet.cpu(), scheduler=PNDMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write (a normal diffusers pipeline folder)")
    parser.add_argument("--vocab", help="open_clip's bpe_simple_vocab_16e6.txt.gz for the real CLIP tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run the random initialisation (cuda is much faster)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    start = time.perf_counter()
    pipe = build_random_sd14(args.seed, args.vocab, args.device)
    pipe.save_pretrained(args.out, safe_serialization=True)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
              for name in ("unet", "vae", "text_encoder")}
    ids = pipe.tokenizer("a photo of a dog").input_ids
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{k} {v:.1f}M" for k, v in counts.items())
          + f"; tokenizer {'CLIP BPE' if args.vocab else 'byte-level'}: 'a photo of a dog' -> {ids}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
