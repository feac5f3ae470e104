"""Inference optimisation that keeps outputs within float rounding (<= 1e-4 of the eager model).

``optimize_for_inference(model, example)`` returns an eval-only copy of a ResNet/Res2Net in inference form
(``models/backbones/fuse.py``: BN folded, ReLU fused, Res2Net stage-block convs grouped) and then binds each
conv to the kernel and memory layout that are fastest *for its own input shape on this machine*, measured once
("kernel selection"), and runs each stage in the activation layout (NCHW or channels-last) that is faster for
it. Res2Net's many narrow 3x3 convs (26..208 channels) gain most: they are latency-bound, and PyTorch's
default dispatch sends several of them to slow paths.

The choices depend on shapes, so the result is meant for inputs shaped like ``example``; other shapes still
give correct outputs, possibly more slowly.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

from .models.backbones import ResNet
from .models.backbones.fuse import CL, FusedConv2d, _layout, fuse_backbone

NCHW = torch.contiguous_format


class ToLayout(nn.Module):
    """Converts activations to one memory layout (inserted at the start of a stage)."""

    def __init__(self, layout: torch.memory_format):
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.layout)


class ChannelsLastMaxPool(nn.Module):
    """Max-pool computed channels-last (PyTorch's NCHW CPU max-pool is ~10x slower); output in input's layout."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.contiguous(memory_format=CL)).contiguous(memory_format=_layout(x))


def _best_time(fn: Callable[[], object], budget_s: float) -> float:
    """Best-of timing within about ``budget_s`` (at least one timed call after a warm-up): the minimum is the
    least noisy estimate of a kernel's cost on a shared machine, and large layers need few repeats."""
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 20 and (runs == 0 or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def _record_inputs(model: nn.Module, example: torch.Tensor, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            seen.setdefault(name, args[0])
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _select_conv(conv: FusedConv2d, x: torch.Tensor, budget_s: float, min_gain: float) -> tuple[str, object]:
    other = NCHW if _layout(x) == CL else CL
    conv.bind("aten", None, x.shape)
    ref = conv(x)
    tol = 1e-5 * float(ref.abs().max()) + 1e-6
    timings = {}
    for kernel in conv.candidates():
        for layout in (None, other):
            try:
                conv.bind(kernel, layout, x.shape)
                if (conv(x) - ref).abs().max().item() > tol:
                    continue
            except RuntimeError:
                continue  # kernel not available for this shape, device or build
            timings[(kernel, layout)] = _best_time(lambda: conv(x), budget_s)
    best = min(timings, key=timings.get)
    if timings[best] > timings[("aten", None)] * (1 - min_gain):
        best = ("aten", None)
    conv.bind(best[0], best[1], x.shape)
    return best


@torch.inference_mode()
def select_kernels(model: nn.Module, example: torch.Tensor, *, within: nn.Module | None = None,
                   budget_s: float = 0.02, min_gain: float = 0.05) -> dict:
    """Bind every ``FusedConv2d`` in ``within`` (default: all of ``model``) to its fastest (kernel, layout) for
    the input it sees when ``model`` runs on ``example``; convs of identical shape and input share one
    measurement. Returns the choices by name."""
    convs = {n: m for n, m in (model if within is None else within).named_modules() if isinstance(m, FusedConv2d)}
    inputs = _record_inputs(model, example, convs)
    cache: dict[tuple, tuple] = {}
    chosen = {}
    for name, conv in convs.items():
        if name not in inputs:
            continue
        x = inputs[name]
        key = (tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups, conv.relu,
               tuple(x.shape), _layout(x))
        if key not in cache:
            cache[key] = _select_conv(conv, x, budget_s, min_gain)
        else:
            conv.bind(cache[key][0], cache[key][1], x.shape)
        kernel, layout = cache[key]
        chosen[name] = kernel + ("" if layout is None else f"/{'cl' if layout == CL else 'nchw'}")
    return chosen


@torch.inference_mode()
def select_stage_layouts(model: ResNet, example: torch.Tensor, *, budget_s: float = 0.05, **kwargs) -> list[str]:
    """For each stage in turn, keep the activation layout (NCHW or channels-last) under which the stage, with
    its kernels selected for that layout, runs faster."""
    choices = []
    for stage in model.stages():
        stage.insert(0, ToLayout(NCHW))
        timings = {}
        for layout in (NCHW, CL):
            stage[0].layout = layout
            select_kernels(model, example, within=stage, **kwargs)
            x = _record_inputs(model, example, {"stage": stage[0]})["stage"]
            timings[layout] = _best_time(lambda: stage(x), budget_s)
        best = min(timings, key=timings.get)
        stage[0].layout = best
        if best != CL:  # the kernels bound last were selected for channels-last
            select_kernels(model, example, within=stage, **kwargs)
        choices.append("channels_last" if best == CL else "nchw")
    select_kernels(model, example, within=model.conv1, **kwargs)
    return choices


def _fuse_head_convs(module: nn.Module) -> None:
    """Replace the plain convs of a neck or head by ``FusedConv2d`` (same maths, selectable kernel)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Conv2d:
            setattr(module, name, FusedConv2d(child))
        else:
            _fuse_head_convs(child)


@torch.inference_mode()
def optimize_for_inference(model: nn.Module, example: torch.Tensor, *, select: bool = True) -> nn.Module:
    """An optimised, eval-only equivalent of ``model`` for inputs shaped like ``example``.

    ``model`` is a ResNet/Res2Net (classifier or backbone) or a detector with a ``backbone`` attribute (its
    other convs, in the neck and heads, get kernel selection too). ``select=False`` applies only the inference
    form (BN folding etc.)."""
    if isinstance(model, ResNet):
        optimised = fuse_backbone(model)
        optimised.maxpool = ChannelsLastMaxPool(optimised.maxpool)
        if select:
            optimised.stage_layouts = select_stage_layouts(optimised, example)
        return optimised
    if not isinstance(getattr(model, "backbone", None), ResNet):
        raise TypeError(f"cannot optimise {type(model).__name__}: expected a ResNet or a detector with one")
    optimised = copy.deepcopy(model).eval()
    backbone_input = _record_inputs(model, example, {"backbone": model.backbone})["backbone"]
    optimised.backbone = optimize_for_inference(model.backbone, backbone_input, select=select)
    for name, child in optimised.named_children():
        if name != "backbone":
            _fuse_head_convs(child)
    if select:
        for name, child in optimised.named_children():
            if name != "backbone":
                select_kernels(optimised, example, within=child)
    return optimised
