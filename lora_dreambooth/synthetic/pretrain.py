"""Pretrain a tiny Stable Diffusion v1-layout base on the synthetic world, from scratch, on CPU.

Two stages, both plain PyTorch over diffusers / transformers classes:

1. an :class:`~diffusers.AutoencoderKL` (by default one downsampling: 32 px -> 16 x 16 x 4 latents, nearly
   deterministic posterior) learns to reconstruct *generic* renders — random RGB colours, stripes and dots — so
   it can represent pictures the captioned world never shows (the subject among them);
2. a :class:`~diffusers.UNet2DConditionModel` and a :class:`~transformers.CLIPTextModel` learn together, from
   scratch, to denoise latents of captioned class-world pictures (DDPM epsilon loss, 10 % empty captions for
   classifier-free guidance).

The result is saved with ``save_pretrained`` as an ordinary ``StableDiffusionPipeline`` folder, cached under a
key derived from the configuration (:func:`pretrained_base`), so it is built once per machine and config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lora_dreambooth.synthetic.world import (RARE_TAGS, VOCABULARY, make_class_dataset, random_class_spec,
                                             random_generic_spec, render, to_tensor)
from lora_dreambooth.tiny import build_tiny_tokenizer

logger = logging.getLogger(__name__)

#: Bump when the world or the recipe changes in a way the config does not capture (invalidates caches).
RECIPE_VERSION = 3
MARKER = "synthetic_base.json"
#: Where the package keeps its pretrained copy of the default base (see :func:`shipped_base`).
SHIPPED_ROOT = Path(__file__).resolve().parent.parent / "assets" / "synthetic"
# Against a per-pixel mean squared error, SD's KL weight (1e-6 against a per-pixel *sum*) is ~3000x smaller.
VAE_KL_WEIGHT = 1e-9
# The posterior starts nearly deterministic (std e^-5): trainers sample latents from it, and with a KL weight this
# small an encoder that starts at std 1 spends most of a short training learning to switch the noise off.
VAE_INITIAL_LOGVAR = -10.0


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained base (its hash is the cache key)."""

    seed: int = 0
    resolution: int = 32
    dataset_size: int = 3024  # class-world pictures (a multiple of the 54 shape x colour x position combinations)
    vae_steps: int = 1500  # small batches, many updates: the autoencoder is update-bound, not data-bound
    vae_batch: int = 8
    vae_lr: float = 3e-3
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 2e-3
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    unnamed_color_share: float = 0.3  # class-world shapes of a random colour that captions do not name
    # share of captions that carry one rare tag word (sks, zwx) at a random place, meaning nothing: like a real
    # base, which has met the rare identifier DreamBooth borrows in unrelated contexts, so its embedding is trained
    rare_tag_share: float = 0.1
    snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023); None: plain epsilon MSE
    text_hidden: int = 64
    text_layers: int = 2
    text_length: int = 77  # tokens per prompt (captions here are at most 8; SD v1 pads to 77)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers: int = 1  # resnets per UNet block
    # where the UNet cross-attends: "low" (every level but the full latent resolution), "high" (SD v1: every level
    # but the lowest, plus the mid block), "all"
    unet_attention: str = "low"
    vae_channels: tuple[int, ...] = (16, 32)  # one downsampling: 32 px -> 16 x 16 latents

    def key(self) -> str:
        """Short stable hash of the config and :data:`RECIPE_VERSION`."""
        payload = json.dumps({"recipe": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    """``$LORA_DREAMBOOTH_CACHE/synthetic`` or ``~/.cache/lora-dreambooth/synthetic``."""
    root = os.environ.get("LORA_DREAMBOOTH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lora-dreambooth") / "synthetic"


def build_components(cfg: PretrainConfig) -> dict:
    """Untrained tokenizer, text encoder, VAE, UNet and scheduler in the SD v1 layout (tiny widths)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    tokenizer = build_tiny_tokenizer(words=VOCABULARY)
    tokenizer.model_max_length = cfg.text_length
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 2,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="quick_gelu", projection_dim=cfg.text_hidden,
    ))
    blocks = len(cfg.vae_channels)  # the VAE downsamples blocks - 1 times
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=cfg.vae_channels, layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=cfg.resolution, mid_block_add_attention=False,
    )
    attends = _attention_levels(cfg.unet_attention, len(cfg.unet_channels))
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (blocks - 1), in_channels=4, out_channels=4,
        block_out_channels=cfg.unet_channels, layers_per_block=cfg.unet_layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        cross_attention_dim=cfg.text_hidden, attention_head_dim=4, norm_num_groups=16,
    )
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def _attention_levels(where: str, levels: int) -> list[bool]:
    """Which UNet levels (full latent resolution first) get cross-attention blocks."""
    if where == "low":
        return [False] + [True] * (levels - 1)
    if where == "high":
        return [True] * (levels - 1) + [False]
    if where == "all":
        return [True] * levels
    raise ValueError(f"unet_attention must be low, high or all, not {where!r}")


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train_vae(vae, cfg: PretrainConfig, log: Callable[[str], None], device: str = "cpu") -> float:
    """Fit the autoencoder to half generic, half class-world renders; returns the latents' scaling factor."""
    rng = random.Random(cfg.seed + 1)
    pool = [random_generic_spec(rng) if i % 2 else random_class_spec(rng) for i in range(2048)]
    images = to_tensor(np.stack([np.asarray(render(s, cfg.resolution)) for s in pool])).to(device)
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = VAE_INITIAL_LOGVAR
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.vae_steps))
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    vae.train()
    for step in range(cfg.vae_steps):
        batch = images[torch.randint(len(images), (cfg.vae_batch,), generator=generator).to(device)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + VAE_KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: reconstruction mse {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        std = vae.encode(images[:512]).latent_dist.mean.std().item()
    return 1.0 / std


def encode_class_world(vae, cfg: PretrainConfig, device: str = "cpu") -> tuple[torch.Tensor, list]:
    """Latents (already scaled) and specs of the captioned class-world dataset."""
    dataset = make_class_dataset(cfg.dataset_size, cfg.resolution, seed=cfg.seed + 3,
                                 unnamed_share=cfg.unnamed_color_share)
    pixels = to_tensor(dataset.images).to(device)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    return latents * vae.config.scaling_factor, dataset.specs


def _encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def with_rare_tag(caption: str, rng: random.Random, share: float) -> str:
    """``caption`` with one of :data:`RARE_TAGS` inserted at a random word boundary, with probability ``share``."""
    if share <= 0 or rng.random() >= share:
        return caption
    words = caption.split()
    words.insert(rng.randint(0, len(words)), rng.choice(RARE_TAGS))
    return " ".join(words)


def train_denoiser(parts: dict, latents: torch.Tensor, specs: list, cfg: PretrainConfig,
                   log: Callable[[str], None]) -> None:
    """Train UNet + text encoder from scratch with the DDPM epsilon loss on captioned latents (on their device)."""
    from diffusers import DDPMScheduler

    from lora_dreambooth.synthetic.world import caption_for

    unet, text_encoder, tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    alphas = noise_scheduler.alphas_cumprod.to(latents.device)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    rng = random.Random(cfg.seed + 4)
    generator = torch.Generator().manual_seed(cfg.seed + 5)
    unet.train()
    text_encoder.train()
    running = None
    for step in range(cfg.unet_steps):
        index = torch.randint(len(latents), (cfg.unet_batch,), generator=generator)
        captions = ["" if rng.random() < cfg.caption_dropout else with_rare_tag(caption_for(specs[i], rng), rng,
                                                                                 cfg.rare_tag_share)
                    for i in index.tolist()]
        clean = latents[index.to(latents.device)]
        noise = torch.randn(clean.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(clean),),
                                  generator=generator).to(latents.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, _encode_text(tokenizer, text_encoder, captions)).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.snr_gamma is not None:  # epsilon target: weight min(SNR, gamma) / SNR
            per_sample = per_sample * (snr[timesteps].clamp(max=cfg.snr_gamma) / snr[timesteps])
        loss = per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == cfg.unet_steps - 1:
            log(f"denoiser step {step}: loss {running:.4f}")
    unet.eval()
    text_encoder.eval()


def build_base(cfg: PretrainConfig, out_dir: str | Path, log: Callable[[str], None] = logger.info,
               device: str = "cpu") -> Path:
    """Pretrain from scratch and ``save_pretrained`` a StableDiffusionPipeline to ``out_dir``."""
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    parts = build_components(cfg)
    for name in ("vae", "unet", "text_encoder"):
        parts[name].to(device)
    scaling = train_vae(parts["vae"], cfg, log, device)
    parts["vae"].register_to_config(scaling_factor=scaling)
    log(f"vae done in {time.perf_counter() - started:.0f} s (scaling factor {scaling:.3f})")
    latents, specs = encode_class_world(parts["vae"], cfg, device)
    train_denoiser(parts, latents, specs, cfg, log)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to("cpu")
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    seconds = time.perf_counter() - started
    marker = {"config": asdict(cfg), "recipe": RECIPE_VERSION, "seconds": round(seconds, 1)}
    (out / MARKER).write_text(json.dumps(marker, indent=2))
    log(f"base pretrained in {seconds:.0f} s")
    return out


def shipped_base(cfg: PretrainConfig = PretrainConfig()) -> Path | None:
    """The copy of ``cfg``'s base that ships inside the package (the default config's only), or None.

    It is an ordinary cache entry built by :func:`build_base` on a 2-core CPU (its marker records the config, the
    recipe version and how long it took); it saves a fresh clone the ~5 minutes of pretraining, so the CI variant
    fits the test budget. ``scripts/synthetic_dreambench.py --from-scratch`` rebuilds it.
    """
    folder = SHIPPED_ROOT / cfg.key()
    return folder if (folder / MARKER).is_file() else None


def pretrained_base(cfg: PretrainConfig = PretrainConfig(), cache_root: str | Path | None = None,
                    log: Callable[[str], None] = logger.info, device: str = "cpu", *,
                    from_scratch: bool = False) -> Path:
    """The base for ``cfg``: from the cache (``<cache_root>/<cfg.key()>``), else the package's shipped copy, else
    pretrained now and cached. ``from_scratch`` ignores both copies and pretrains again (replacing the cached one).

    The folder appears atomically (built in a sibling temp folder, then renamed), so an interrupted build
    never leaves a half-written base behind.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / cfg.key()
    if not from_scratch:
        if (target / MARKER).is_file():
            return target
        shipped = shipped_base(cfg)
        if shipped is not None:
            log(f"using the base shipped with the package ({shipped.name}); --from-scratch pretrains it again")
            return shipped
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.key()}-", dir=root))
    try:
        build_base(cfg, staging, log, device)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        log(f"base saved to {target}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
