"""Pivotal tuning: the identifier gets its own input embedding, trained together with the LoRA layers.

The identifier becomes one new token of the tokenizer (as diffusers' ``load_textual_inversion`` adds it, so a plain
diffusers pipeline reproduces the trained model), its embedding row starts as the mean of the ``init_token``
words' rows, and only that row trains: a :class:`TrainedTokenRow` holds it as one small fp32 parameter and a
forward hook on the embedding layer puts it in place of the token's row. Nothing else of the (large, frozen)
embedding matrix gets gradients, optimizer state or weight decay. After training :func:`TrainedTokenRow.bake`
writes the row into the matrix and removes the hook: the text encoder is then an ordinary one with one more token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_dreambooth.errors import UserInputError

#: Name of the row module under the embedding layer (parameter names containing it belong to pivotal tuning).
ROW_MODULE = "pivotal_row"


@dataclass(frozen=True)
class IdentifierToken:
    """The identifier's token: its id, and whether it was added to the tokenizer by us."""

    token: str
    token_id: int
    added: bool


def add_identifier_token(tokenizer, text_encoder: torch.nn.Module, token: str) -> IdentifierToken:
    """Add ``token`` to the tokenizer as one token (unless it is one already) and grow the embedding matrix.

    For CLIP's BPE vocabulary a word like "sks" is ``sks</w>``, so ``sks`` itself is new, exactly what
    ``pipe.load_textual_inversion(file, token="sks")`` will add when the adapter is loaded elsewhere.
    """
    added = token not in tokenizer.get_vocab()
    if added:
        tokenizer.add_tokens([token])
        text_encoder.resize_token_embeddings(len(tokenizer))
    token_id = tokenizer.convert_tokens_to_ids(token)
    pieces = tokenizer(token, add_special_tokens=False).input_ids
    if pieces != [token_id]:  # pragma: no cover - a tokenizer that normalises the text differently
        raise UserInputError(f"--pivotal: the tokenizer does not read '{token}' as one token ({pieces})")
    return IdentifierToken(token, token_id, added)


def init_vector(tokenizer, text_encoder: torch.nn.Module, init_token: str) -> torch.Tensor:
    """The mean input embedding of the words of ``init_token`` (e.g. the class noun)."""
    ids = tokenizer(init_token, add_special_tokens=False).input_ids
    if not ids:
        raise UserInputError(f"--init-token '{init_token}' has no tokens")
    weight = text_encoder.get_input_embeddings().weight
    return weight[ids].detach().float().mean(0)


class TrainedTokenRow(torch.nn.Module):
    """One trainable embedding row, swapped in for ``token_id`` by a forward hook on the embedding layer."""

    def __init__(self, embedding: torch.nn.Embedding, token_id: int, initial: torch.Tensor):
        super().__init__()
        self.token_id = token_id
        self.vector = torch.nn.Parameter(initial.detach().clone().float().to(embedding.weight.device))
        self._embedding = [embedding]  # a list: not a submodule (the row is the embedding's child, not its parent)
        self._handle = embedding.register_forward_hook(self._replace_row)

    def _replace_row(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        where = (ids == self.token_id).unsqueeze(-1)
        return torch.where(where, self.vector.to(output.dtype), output)

    @torch.no_grad()
    def bake(self) -> torch.Tensor:
        """Write the trained row into the embedding matrix, remove the hook and this module; return the row."""
        embedding = self._embedding[0]
        embedding.weight[self.token_id] = self.vector.to(embedding.weight.dtype)
        self._handle.remove()
        if getattr(embedding, ROW_MODULE, None) is self:
            delattr(embedding, ROW_MODULE)
        return self.vector.detach().float().cpu().clone()


def attach_trained_row(tokenizer, text_encoder: torch.nn.Module, identifier: IdentifierToken,
                       init_token: str) -> TrainedTokenRow:
    """Start the identifier's row from ``init_token`` and make that row, and only it, trainable. Call it after the
    adapters are injected (peft freezes every non-adapter parameter it finds).

    The row module becomes a child of the embedding layer, so it travels with the text encoder (devices, DDP,
    accelerate) and its parameter is the text encoder's only trainable one besides a text-encoder LoRA.
    """
    initial = init_vector(tokenizer, text_encoder, init_token)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[identifier.token_id] = initial.to(embedding.weight.dtype)
    row = TrainedTokenRow(embedding, identifier.token_id, initial)
    embedding.add_module(ROW_MODULE, row)
    return row


def find_trained_row(text_encoder: torch.nn.Module | None) -> TrainedTokenRow | None:
    """The text encoder's trained row, if pivotal tuning attached one."""
    if text_encoder is None:
        return None
    return getattr(text_encoder.get_input_embeddings(), ROW_MODULE, None)


def row_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The pivotal row parameters of ``model`` by name (for checkpoints; empty without pivotal tuning)."""
    return {name: p for name, p in model.named_parameters() if ROW_MODULE in name}
