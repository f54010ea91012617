"""Tiny random CLIP and DINO models for offline tests (their scores mean nothing)."""
from __future__ import annotations

from pathlib import Path

import torch


# -------------------------------------------------------------------------- tiny random scoring models
def save_tiny_metric_models(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> tuple[Path, Path]:
    """Random tiny CLIP and ViT (DINO-shaped) models with processors, saved as ``out_dir/clip`` and
    ``out_dir/dino`` folders that :func:`load_metric_models` loads offline. For tests and demos only: their
    scores mean nothing."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor,
                              ViTModel)

    from lora_dreambooth.tiny import build_tiny_tokenizer

    root = Path(out_dir)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **tower),
        vision_config=dict(image_size=image_size, patch_size=8, **tower),
        projection_dim=16,
    )
    clip_dir, dino_dir = root / "clip", root / "dino"
    CLIPModel(clip_config).save_pretrained(clip_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(clip_dir)
    ViTModel(ViTConfig(image_size=image_size, patch_size=8, **tower), add_pooling_layer=False).save_pretrained(dino_dir)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(dino_dir)
    return clip_dir, dino_dir


