"""One training step read back term by term: the named losses of a detector's training forward and the gradient
each parameter gets from their sum. This is what the training-fidelity tests compare with mmdetection's step,
and the same forward and sum the ``Trainer`` runs (``detector_losses``), so there is one set of rules.

With ``exhaustive_sampling`` every sampler takes every positive and every negative anchor / proposal (no random
draw), which makes the step a deterministic function of weights, image and targets.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from ..models.heads import RandomSampler
from ..models.losses import total_loss

EXHAUSTIVE = 10**8  # above any anchor or proposal count, so a sampler keeps all of them


def exhaustive_sampling(config: Any) -> Any:
    """``config`` (any detector config) with every sampler's ``num`` set to 10^8: the RPN's and every R-CNN
    stage's. ``pos_fraction`` and the rest stay; with ``num`` above the candidate count the random sampler keeps
    every positive and every negative, in index order, as mmdetection's does."""
    if isinstance(config, RandomSampler):
        return dataclasses.replace(config, num=EXHAUSTIVE)
    if isinstance(config, tuple):
        return tuple(exhaustive_sampling(c) for c in config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        changes = {}
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            new = exhaustive_sampling(value)
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(config, **changes) if changes else config
    return config


def detector_losses(model: nn.Module, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
                    image_sizes: Sequence[tuple[int, int]] | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """(every named term, the total to back-propagate) of one training forward; the ``Trainer`` and
    ``training_step`` both call this (``model`` may be wrapped in DistributedDataParallel)."""
    losses = model(images, image_sizes=image_sizes, targets=targets)
    return losses, total_loss(losses)


@dataclass
class StepResult:
    """What one training step computed. ``losses``: every term the model returns, as floats (``acc`` terms are
    the box classifier's accuracy in percent, not losses); ``total``: the back-propagated sum of the terms named
    ``*loss*``; ``grads``: the gradient of every parameter that received one (res2det names); ``frozen``: the
    parameters with ``requires_grad=False``."""

    losses: dict[str, float]
    total: float
    grads: dict[str, Tensor]
    frozen: tuple[str, ...]

    def grad_norms(self) -> dict[str, float]:
        """The L2 norm of each gradient (float64 reduction)."""
        return {k: float(g.double().norm()) for k, g in self.grads.items()}


def training_step(model: nn.Module, images: Tensor, targets: Sequence[Mapping[str, Tensor]],
                  image_sizes: Sequence[tuple[int, int]] | None = None) -> StepResult:
    """Run one forward/backward in train mode (frozen stages stay frozen and frozen BN keeps its statistics, as
    the model's own ``train()`` arranges) and return the losses and gradients; the weights are not updated.

    ``images``: normalised, zero-padded ``[B, 3, H, W]``; ``targets`` per image as ``model(images, targets)``
    takes them (``boxes``, ``labels``, ``masks`` for mask models, ``semantic`` for HTC's semantic branch);
    ``image_sizes``: the unpadded ``(h, w)`` of each image (default: the padded size)."""
    model.train()
    model.zero_grad(set_to_none=True)
    losses, total = detector_losses(model, images, targets, image_sizes)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    frozen = tuple(n for n, p in model.named_parameters() if not p.requires_grad)
    model.zero_grad(set_to_none=True)
    return StepResult(losses={k: float(v.detach()) for k, v in losses.items()}, total=float(total.detach()),
                      grads=grads, frozen=frozen)


__all__ = ["EXHAUSTIVE", "exhaustive_sampling", "detector_losses", "StepResult", "training_step"]
