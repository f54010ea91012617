"""Per-photo captions: `photo.txt` or `photo.caption` beside `photo.jpg`, with `{token}`/`{class}` placeholders.

A photo without a caption file is trained with the instance prompt. Caption dropout replaces a captioned
photo's caption by the instance prompt with a fixed probability; the choice is a pure function of
(seed, micro-batch, rank), so a resumed run drops exactly the captions an uninterrupted one would.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from lora_dreambooth.config import fill_prompt
from lora_dreambooth.errors import UserInputError

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")
_DROPOUT_STREAM = 0xCA97  # keeps the dropout coins independent of the sampler's and the noise's generators


def caption_file(image_path: str | Path) -> Path | None:
    """The caption file of a photo (`photo.txt`, else `photo.caption`), or None."""
    path = Path(image_path)
    for suffix in CAPTION_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def read_caption(image_path: str | Path) -> str | None:
    """The photo's caption as one line (whitespace collapsed), or None when it has none or it is empty."""
    file = caption_file(image_path)
    if file is None:
        return None
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserInputError(f"caption '{file}' is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserInputError(f"cannot read caption '{file}': {exc.strerror or exc}") from None
    line = " ".join(text.split())
    if not line:
        log.warning("caption '%s' is empty; that photo uses the instance prompt", file)
        return None
    return line


def mentions(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def photo_prompts(paths: list[Path], instance_prompt: str, token: str, class_noun: str, *,
                  use_captions: bool = True) -> list[str]:
    """The prompt of each photo: its caption with placeholders filled, or `instance_prompt`.

    Warns once when captions do not name the token: those photos teach the token nothing.
    """
    prompts, captioned, without_token = [], 0, []
    for path in paths:
        caption = read_caption(path) if use_captions else None
        if caption is None:
            prompts.append(instance_prompt)
            continue
        filled = fill_prompt(caption, token, class_noun)
        captioned += 1
        if not mentions(filled, token):
            without_token.append(caption_file(path).name)
        prompts.append(filled)
    if captioned:
        log.info("captions: %d of %d photos have their own caption; the others use '%s'", captioned, len(paths),
                 instance_prompt)
    if without_token:
        shown = ", ".join(without_token[:3]) + (f" and {len(without_token) - 3} more" if len(without_token) > 3 else "")
        log.warning("%d caption(s) do not mention the token '%s' (%s): write {token} where the subject is named",
                    len(without_token), token, shown)
    return prompts


def dropout_mask(seed: int, micro_index: int, count: int, probability: float, *, rank: int = 0,
                 world_size: int = 1) -> torch.Tensor:
    """Which of this rank's `count` photos use the instance prompt instead of their caption in this micro-batch.

    Coins are drawn for the whole global batch from a generator seeded by (seed, micro-batch), and each rank
    takes its slice, so N processes with batch B drop the same captions as one process with batch N*B.
    """
    if probability <= 0:
        return torch.zeros(count, dtype=torch.bool)
    g = torch.Generator().manual_seed((seed + _DROPOUT_STREAM) * 2_000_029 + micro_index)
    coins = torch.rand(world_size * count, generator=g)
    return coins[rank * count:(rank + 1) * count] < probability
