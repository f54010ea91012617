"""Every prompt of a run (captions, instance and class prompts) tokenized once, as the rows of one table.

Batches carry row indices, so the training step is a function of tensors only (what a CUDA graph needs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptTable:
    """`texts[i]` is tokenized as `ids[i]`; `row[text] == i`."""

    texts: list[str]
    ids: torch.Tensor
    row: dict[str, int]

    @classmethod
    def build(cls, tokenizer, prompts: set[str], device: torch.device | str) -> "PromptTable":
        texts = sorted(prompts)
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        return cls(texts, ids, {p: i for i, p in enumerate(texts)})

    def rows(self, texts: list[str]) -> torch.Tensor:
        """The row indices of `texts`, on the table's device."""
        return torch.tensor([self.row[t] for t in texts], dtype=torch.long, device=self.ids.device)

    @torch.no_grad()
    def encode(self, text_encoder: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """Hidden states of every row from a frozen text encoder (all prompts in one batch)."""
        return text_encoder(self.ids)[0].to(dtype)
