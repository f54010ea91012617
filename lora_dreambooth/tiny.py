"""A tiny random Stable Diffusion v1 pipeline built from configs, fully offline.

Used by the offline demo, the tests and the synthetic benchmark: same classes and folder layout as a real
SD v1.x checkpoint (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPM/PNDM schedulers),
only much smaller, so every code path that serves real users runs here in seconds.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

_BYTE_ALPHABET_START = 33


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (the same mapping CLIPTokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_vocab(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP BPE vocabulary: every byte alone and with ``</w>``, plus merges for ``extra_words``.

    Any text tokenizes (one token per character at worst); every word listed in ``extra_words`` becomes a single
    token whatever the order of the list, which keeps prompts short and makes the tiny text encoder see whole
    words. Each word first gets its merges left to right (the layout earlier versions wrote, so existing tiny
    bases keep their token ids); words that an earlier word's merge still splits get completing merges after.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in extra_words:
        pieces = _word_symbols(word)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    _complete_words(extra_words, vocab, merges)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _word_symbols(word: str) -> list[str]:
    """A word as CLIP's BPE starts it: one symbol per character, the last one carrying ``</w>``."""
    if not word:
        raise ValueError("tiny tokenizer words must not be empty")
    return list(word[:-1]) + [word[-1] + "</w>"]


def _complete_words(words: tuple[str, ...], vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Append merges until every word of ``words`` is one token under the BPE that CLIPTokenizer runs.

    BPE merges by rank, so an earlier word's merge can win inside a later word (with "red" before "green", the
    merge r+e turned "green" into g/re/e/n and green's own g+r chain never applied). A merge appended at the end
    has the highest rank: it only acts once no earlier merge applies, so it never undoes how any word tokenized
    before, only shortens it further. Merging the first remaining pair of a split word therefore ends, word by
    word, with every word whole.
    """
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    for word in dict.fromkeys(words):
        pieces = bpe_pieces(_word_symbols(word), ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])  # not in `ranks`, or BPE would have merged it
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = bpe_pieces(_word_symbols(word), ranks)


def bpe_pieces(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the `tokenizers` library runs it for CLIP: merge the lowest-ranked adjacent pair, leftmost first,
    one occurrence at a time, until no adjacent pair has a rank."""
    pieces = list(symbols)
    while len(pieces) > 1:
        rank, index = min((ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])))
        if rank == math.inf:
            break
        pieces[index:index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


DEFAULT_WORDS = ("a", "photo", "of", "dog", "cat", "backpack", "sks", "zwx", "person", "on", "the", "in", "beach")


def build_tiny_tokenizer(words: tuple[str, ...] = DEFAULT_WORDS):
    """A CLIPTokenizer over :func:`tiny_clip_vocab` (model_max_length 77 like SD v1); writes nothing."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_pipeline(seed: int = 0, *, sample_size: int = 32, text_hidden: int = 32, words: tuple[str, ...] = DEFAULT_WORDS):
    """A random StableDiffusionPipeline with SD v1 layout and tiny widths (~8 MB in fp32)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 4 if sample_size >= 32 else 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size,
    )
    tokenizer = build_tiny_tokenizer(words)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 2,
            num_hidden_layers=5,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="quick_gelu",
            projection_dim=text_hidden,
        )
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build :func:`build_tiny_pipeline` and ``save_pretrained`` it to ``out_dir`` (a normal diffusers folder)."""
    out = Path(out_dir)
    pipe = build_tiny_pipeline(seed, **kwargs)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
