"""Similarity measures on embeddings (DINO, CLIP-I, CLIP-T are means of these cosines)."""
from __future__ import annotations

import torch


# ------------------------------------------------------------------------------------ metrics on embeddings
def l2_normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (float32)."""
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` cosine similarities between the rows of ``a`` and of ``b``."""
    return l2_normalize(a) @ l2_normalize(b).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all ``len(a) * len(b)`` pairs: the paper's DINO / CLIP-I (a = generated, b = real)."""
    return float(cosine_matrix(a, b).mean())


def mean_distinct_pair_cosine(a: torch.Tensor) -> float:
    """Mean cosine over pairs of distinct rows (i != j) of one set: the paper's "real images" reference."""
    n = a.shape[0]
    if n < 2:
        raise ValueError("need at least two embeddings for distinct pairs")
    sims = cosine_matrix(a, a)
    return float((sims.sum() - sims.diagonal().sum()) / (n * n - n))


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``a`` with row i of ``b`` (CLIP-T: image i against its own prompt)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_cosine needs equal row counts, got {a.shape[0]} and {b.shape[0]}")
    return (l2_normalize(a) * l2_normalize(b)).sum(dim=-1)


