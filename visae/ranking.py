"""Ranks and top-k hits of the true class among logits, with ties broken to the lower class index.

Shared by zero-shot evaluation (:mod:`visae.zeroshot`) and spliced scoring (:mod:`visae.splice`);
it imports nothing from the package, so both can use it without an import cycle.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["rank_of_label", "topk_hits", "discordant"]


def rank_of_label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rank of the true class under "higher logit first, ties to the lower class index" (exact, O(B*C)).

    logits: [..., B, C]; labels: [B] -> [..., B] long. Top-k correct iff rank < k.
    """
    ly = logits.gather(-1, labels.expand(*logits.shape[:-1]).unsqueeze(-1))  # [..., B, 1]
    gt = (logits > ly).sum(-1)
    cls = torch.arange(logits.shape[-1], device=logits.device)
    before = (logits == ly) & (cls < labels.unsqueeze(-1))
    return gt + before.sum(-1)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per k, a bool [..., B]: is the label within the top k (ties to the lower class index)?

    Fast path from ``topk`` values ``v_1 >= v_2 >= ...`` (k_max + 1 of them): where the label's
    logit ``l_y`` is unique in its row, it is in the top k iff ``l_y >= v_k``. A tie can only
    matter when ``l_y == v_k`` for some k and another of the top k_max + 1 values equals
    ``l_y`` (an equal value further down forces one there too); only those rows (e.g. all
    logits equal) go through the exact count of :func:`rank_of_label`.
    """
    kmax = max(ks)
    C = logits.shape[-1]
    ly = logits.gather(-1, labels.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # [..., B]
    vals = logits.topk(min(kmax + 1, C), dim=-1, sorted=True).values  # [..., B, kmax+1]
    hits = {k: ly >= vals[..., k - 1] for k in ks}
    at_boundary = torch.zeros_like(ly, dtype=torch.bool)
    for k in ks:
        at_boundary |= ly == vals[..., k - 1]
    ambiguous = at_boundary & ((vals == ly.unsqueeze(-1)).sum(-1) >= 2)
    if bool(ambiguous.any()):
        flat_a = ambiguous.reshape(-1, ambiguous.shape[-1])
        flat_l = logits.reshape(-1, *logits.shape[-2:])
        for m in range(flat_a.shape[0]):
            rows = flat_a[m].nonzero().squeeze(-1)
            if rows.numel():
                rank = rank_of_label(flat_l[m, rows], labels[rows])
                for k in ks:
                    hits[k].view(-1, ambiguous.shape[-1])[m, rows] = rank < k
    return hits


def discordant(ref: torch.Tensor, now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paired comparison's discordant counts of two hit masks over the same examples (bool ``[..., N]``, the
    last axis the examples): ``(lost, gained)`` = (right in ``ref`` and wrong in ``now``, the reverse), summed over
    the last axis (shape ``[...]``). What :func:`visae.select.drop_standard_error` takes."""
    return (ref & ~now).sum(-1), (~ref & now).sum(-1)
