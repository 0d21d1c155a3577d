"""Ensembles of the k fold models' outputs: mean (regression), majority vote and soft vote (classes).

Small pure functions on tensors shaped ``(K, N, C)``: K models, N samples, C outputs.
"""

from __future__ import annotations

import torch


def mean(outputs: torch.Tensor) -> torch.Tensor:
    """The models' mean output, ``(N, C)``."""
    return outputs.mean(dim=0)


def soft_vote(logits: torch.Tensor) -> torch.Tensor:
    """The models' mean class probability, ``(N, C)`` (each row sums to 1)."""
    return torch.softmax(logits, dim=-1).mean(dim=0)


def vote_shares(logits: torch.Tensor) -> torch.Tensor:
    """The share of models voting for each class, ``(N, C)`` (each row sums to 1)."""
    k, _, c = logits.shape
    return torch.nn.functional.one_hot(logits.argmax(dim=-1), c).sum(dim=0).float() / k


def majority_vote(logits: torch.Tensor, *, tie_breaker: int) -> torch.Tensor:
    """The class most models predict, ``(N,)``.

    Ties go to the tied class that model ``tie_breaker`` (the best on validation) scores highest,
    which is its own prediction whenever that is one of the tied classes.
    """
    k = logits.shape[0]
    if not 0 <= tie_breaker < k:
        raise ValueError(f"tie_breaker must be a model index in 0..{k - 1}, got {tie_breaker}")
    votes = vote_shares(logits)
    tied = votes == votes.max(dim=-1, keepdim=True).values
    preference = logits[tie_breaker].masked_fill(~tied, float("-inf"))
    return preference.argmax(dim=-1)

