"""Rules shared by every detector's training losses."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The sum that is back-propagated: every term whose name contains ``loss`` (mmdetection's rule); other
    terms, such as the box classifier's ``acc``, are only reported."""
    terms = [v for k, v in losses.items() if "loss" in k]
    if not terms:
        raise ValueError(f"no loss terms among {sorted(losses)}")
    return sum(terms[1:], terms[0])


@torch.no_grad()
def accuracy(cls_score: Tensor, labels: Tensor) -> Tensor:
    """Top-1 accuracy in percent over all rows (background included), as mmdetection logs ``acc``."""
    if labels.numel() == 0:
        return cls_score.new_zeros(())
    return (cls_score.argmax(dim=1) == labels).float().mean() * 100.0
