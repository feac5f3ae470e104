"""Optimiser and learning-rate schedule of the recipes (stepped once per iteration)."""
from __future__ import annotations

import bisect

import torch
from torch import nn

from .train_config import Recipe


def scaled_lr(recipe: Recipe, total_batch_size: int) -> float:
    """The linear scaling rule: ``base_lr`` per ``base_batch_size`` images."""
    return recipe.base_lr * total_batch_size / recipe.base_batch_size


def build_optimizer(model: nn.Module, recipe: Recipe, total_batch_size: int) -> torch.optim.Optimizer:
    """``recipe.optimizer``: SGD with momentum (the published recipes), or AdamW (betas (momentum, 0.999),
    decoupled weight decay) for training from scratch."""
    params = [p for p in model.parameters() if p.requires_grad]  # frozen stages take no step
    lr = scaled_lr(recipe, total_batch_size)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def lr_factor(iteration: int, iters_per_epoch: int, recipe: Recipe) -> float:
    """Multiplier of the scaled lr at a 0-based global iteration, as mmdetection's two schedulers give it:
    mmengine's ``LinearLR(start_factor=warmup_ratio, by_epoch=False, begin=0, end=warmup_iters)`` times its
    ``MultiStepLR(milestones, gamma, by_epoch=True)``.

    ``LinearLR`` over ``[0, W)`` spans ``W - 1`` steps (its ``total_iters = end - begin - 1``): the factor at
    iteration ``t`` is ``start + (1 - start) * min(t, W - 1) / (W - 1)``, so the full rate is reached at iteration
    ``W - 1`` (499 for the published 500), not ``W``; ``W = 0`` is no warm-up (``Recipe`` refuses 1, with which
    mmengine's ``LinearLR`` would keep the start factor for the whole run). ``MultiStepLR`` by epoch multiplies
    by ``gamma`` at iteration ``m * iters_per_epoch`` for each milestone ``m``, i.e. from the first iteration of
    epoch ``m + 1``."""
    epoch = iteration // max(iters_per_epoch, 1)
    factor = recipe.gamma ** bisect.bisect_right(sorted(recipe.milestones), epoch)
    span = recipe.warmup_iters - 1
    if iteration < span:
        factor *= recipe.warmup_ratio + (1 - recipe.warmup_ratio) * iteration / span
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, iters_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, iters_per_epoch, recipe))
