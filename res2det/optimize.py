"""Inference optimisation that keeps outputs within float rounding (<= 1e-4 of the eager model).

``optimize_for_inference(model, example)`` returns an eval-only copy of a ResNet/Res2Net in inference form
(``models/backbones/fuse.py``: BN folded, ReLU fused, Res2Net stage-block convs grouped) and then binds each
conv to the kernel and memory layout that are fastest *for its own input shape on this machine*, measured once
("kernel selection"), and runs each stage in the activation layout (NCHW or channels-last) that is faster for
it. Res2Net's many narrow 3x3 convs (26..208 channels) gain most: they are latency-bound, and PyTorch's
default dispatch sends several of them to slow paths.

The choices depend on shapes, so the result is meant for inputs shaped like ``example``; other shapes still
give correct outputs, possibly more slowly. Measuring takes minutes for a detector, so the choices (the
"kernel plan") are cached per machine, model layout and input shape (``plan_file``) and bound from there.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import atomic_write, cache_dir
from .errors import Res2DetError
from .inference import autocast_dtype
from .machine import device_name, speed_flags
from .images import ImageLike, detection_input, pad_batch, to_rgb_uint8
from .models.backbones import ResNet
from .models.backbones.fuse import CL, FusedConv2d, _layout, fuse_backbone

NCHW = torch.contiguous_format
_LAYOUT_NAMES = {NCHW: "nchw", CL: "channels_last"}
_LAYOUTS = {v: k for k, v in _LAYOUT_NAMES.items()}
PLAN_FORMAT = 1


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
    """The first input each of ``modules`` receives when ``model`` runs on ``example``."""
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
def select_kernels(model: nn.Module, example: torch.Tensor, *, within: nn.Module | list[nn.Module] | None = None,
                   budget_s: float = 0.02, min_gain: float = 0.05, memo: dict | None = None) -> dict:
    """Bind every ``FusedConv2d`` in ``within`` (default: all of ``model``) to its fastest (kernel, layout) for
    the input it sees when ``model`` runs on ``example`` (one run records them all); convs of identical shape
    and input share one measurement (across calls too, through ``memo``). Returns the choices by their names
    in ``model``."""
    parts = [model] if within is None else within if isinstance(within, list) else [within]
    members = {id(m) for part in parts for m in part.modules()}
    convs = {n: m for n, m in _convs(model).items() if id(m) in members}
    inputs = _record_inputs(model, example, convs)
    memo = {} if memo is None else memo
    chosen = {}
    for name, conv in convs.items():
        if name not in inputs:
            continue
        x = inputs[name]
        key = (tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups, conv.relu,
               tuple(x.shape), _layout(x))
        if key not in memo:
            memo[key] = _select_conv(conv, x, budget_s, min_gain)
        else:
            conv.bind(memo[key][0], memo[key][1], x.shape)
        kernel, layout = memo[key]
        chosen[name] = kernel + ("" if layout is None else f"/{_LAYOUT_NAMES[layout]}")
    return chosen


@torch.inference_mode()
def select_stage_layouts(model: ResNet, example: torch.Tensor, *, budget_s: float = 0.05, memo: dict | None = None,
                         **kwargs) -> list[str]:
    """For each stage in turn, keep the activation layout (NCHW or channels-last) under which the stage, with
    its kernels selected for that layout, runs faster. Stages are timed alone, on the input the model gives
    them (recorded once)."""
    memo = {} if memo is None else memo
    stages = _layout_stages(model)
    x = _record_inputs(model, example, {"stage": stages[0][0]})["stage"]  # stages run block by block
    choices = []
    for stage in stages:
        timings = {}
        for layout in (NCHW, CL):
            stage[0].layout = layout
            select_kernels(stage, x, memo=memo, **kwargs)
            timings[layout] = _best_time(lambda: stage(x), budget_s)
        best = min(timings, key=timings.get)
        stage[0].layout = best
        if best != CL:  # the kernels bound last were selected for channels-last
            select_kernels(stage, x, memo=memo, **kwargs)
        choices.append(_LAYOUT_NAMES[best])
        x = stage(x)
    select_kernels(model.conv1, example, memo=memo, **kwargs)
    return choices


def _layout_stages(model: ResNet) -> list[nn.Sequential]:
    """The stages, each starting with a ``ToLayout`` (inserted once)."""
    for stage in model.stages():
        if not isinstance(stage[0], ToLayout):
            stage.insert(0, ToLayout(NCHW))
    return model.stages()


def _fuse_head_convs(module: nn.Module) -> None:
    """Replace the plain convs of a neck or head by ``FusedConv2d`` (same maths, selectable kernel)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Conv2d:
            setattr(module, name, FusedConv2d(child))
        else:
            _fuse_head_convs(child)


def _machine(device: torch.device) -> dict:
    """What kernel timings depend on, besides the layer: the CPU, its vector instructions, torch, threads (and
    the GPU, for a model on one)."""
    return dict(cpu=device_name("cpu"), flags=speed_flags(), torch=torch.__version__, threads=torch.get_num_threads(),
                mkldnn=torch.backends.mkldnn.is_available(),
                device=device_name("cuda") if device.type == "cuda" else device.type)


def _convs(model: nn.Module) -> dict[str, FusedConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedConv2d)}


def plan_file(model: nn.Module, example: torch.Tensor) -> Path:
    """Where the kernel plan of the inference form ``model`` for inputs shaped like ``example`` on this
    machine is cached: named by a hash of the machine, every conv's name and shape, and the input's shape."""
    convs = [(n, list(m.weight.shape), m.stride, m.padding, m.dilation, m.groups, m.relu)
             for n, m in _convs(model).items()]
    key = json.dumps(dict(format=PLAN_FORMAT, machine=_machine(example.device), convs=convs,
                          example=list(example.shape), dtype=str(example.dtype),
                          layout=_LAYOUT_NAMES[_layout(example)]), sort_keys=True)
    return cache_dir() / "kernel_plans" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _backbone(model: nn.Module) -> ResNet:
    return model if isinstance(model, ResNet) else model.backbone


def _current_plan(model: nn.Module, device: torch.device) -> dict:
    return dict(format=PLAN_FORMAT, machine=_machine(device),
                stage_layouts=[_LAYOUT_NAMES[s[0].layout] for s in _layout_stages(_backbone(model))],
                convs={n: [m.kernel, None if m.layout is None else _LAYOUT_NAMES[m.layout], m.input_shape]
                       for n, m in _convs(model).items() if m.input_shape is not None})


def _apply_plan(model: nn.Module, plan: dict) -> bool:
    """Bind ``model``'s kernels as ``plan`` says; False (nothing bound) when the plan does not fit the model."""
    try:
        stages = _layout_stages(_backbone(model))
        layouts = [_LAYOUTS[v] for v in plan["stage_layouts"]]
        convs = _convs(model)
        bindings = [(convs[n], k, None if lay is None else _LAYOUTS[lay], tuple(shape))
                    for n, (k, lay, shape) in plan["convs"].items()]
        if plan.get("format") != PLAN_FORMAT or len(layouts) != len(stages) \
                or any(k not in conv.candidates() for conv, k, _, _ in bindings):
            return False
    except (KeyError, TypeError, ValueError):
        return False
    for stage, layout in zip(stages, layouts):
        stage[0].layout = layout
    for conv, kernel, layout, shape in bindings:
        conv.bind(kernel, layout, shape)
    return True


def _read_plan(path: Path) -> dict | None:
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or a damaged cache file: measured again and rewritten
        return None
    return plan if isinstance(plan, dict) else None


@torch.inference_mode()
def _select(optimised: nn.Module, example: torch.Tensor) -> None:
    memo: dict = {}
    backbone = _backbone(optimised)
    if backbone is optimised:
        select_stage_layouts(backbone, example, memo=memo)
        return
    backbone_input = _record_inputs(optimised, example, {"backbone": backbone})["backbone"]
    select_stage_layouts(backbone, backbone_input, memo=memo)
    heads = [child for name, child in optimised.named_children() if name != "backbone"]
    select_kernels(optimised, example, within=heads, memo=memo)


def _bf16_form(optimised: nn.Module) -> nn.Module:
    """The inference form of a detector with every conv and fc weight in bf16, converted once, and the backbone
    channels-last from the stem on (oneDNN's bf16 convolutions work on channels-last / blocked data: an NCHW
    input is reordered around every conv). ``predict`` runs it under bf16 autocast: activations stay bf16
    between layers (nothing left to convert but the image and the RoI features), while what autocast and the
    heads keep in fp32 stays so: head outputs (``ops.at_least_fp32``: scores, box decoding, NMS), RoIAlign
    sampling, mask pasting."""
    for module in optimised.modules():
        if isinstance(module, (FusedConv2d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            module.to(torch.bfloat16)
    backbone = _backbone(optimised)
    stem = backbone.conv1
    backbone.conv1 = nn.Sequential(ToLayout(CL), *(stem if isinstance(stem, nn.Sequential) else [stem]))
    for stage in _layout_stages(backbone):
        stage[0].layout = CL
    backbone.stage_layouts = [_LAYOUT_NAMES[CL]] * len(backbone.stages())
    optimised.inference_precision = "bf16"
    optimised.kernel_plan = None
    return optimised


@torch.inference_mode()
def optimize_for_inference(model: nn.Module, example: torch.Tensor | ImageLike, *, precision: str = "fp32",
                           select: bool = True, cache: bool = True) -> nn.Module:
    """An optimised, eval-only equivalent of ``model`` for inputs shaped like ``example``.

    ``model`` is a ResNet/Res2Net (classifier or backbone) or a detector with a ``backbone`` attribute (its
    other convs, in the neck and heads, get kernel selection too). ``select=False`` applies only the inference
    form (BN folding etc.). With ``cache`` the measured choices (the "kernel plan") are kept in the cache
    folder per machine, model layout and input shape (``plan_file``), so only the first call measures; the
    plan used is ``optimised.kernel_plan`` (with ``cached``, ``file`` and, when measured, ``selection_s``).
    For a detector ``example`` may also be an image (file, PIL image, array), pre-processed as ``predict``
    does.

    ``precision='bf16'`` (detectors): the inference form with its conv and fc weights converted to bf16 once
    (``_bf16_form``; no kernel selection, which measures fp32 kernels); its ``predict`` runs in bf16 (the
    model's ``inference_precision``). Where the device has no native bf16 (``inference.autocast_dtype``) this
    warns once with ``PrecisionFallback`` and returns the fp32 form instead, as ``predict(precision='bf16')``
    falls back."""
    if precision not in ("fp32", "bf16"):
        raise Res2DetError(f"optimize_for_inference: precision must be fp32 or bf16, got {precision!r}")
    if precision != "fp32":
        if not isinstance(getattr(model, "backbone", None), ResNet):
            raise Res2DetError(f"the bf16 inference form is for detectors, not {type(model).__name__}")
        if autocast_dtype(precision, next(model.parameters()).device) is not None:
            return _bf16_form(optimize_for_inference(model, example, select=False))
    if not isinstance(example, torch.Tensor):
        if not hasattr(model, "preprocess"):
            raise TypeError("optimize_for_inference: an image example needs a detector; give a tensor")
        example = pad_batch([detection_input(to_rgb_uint8(example), model.preprocess)[0]])
        example = example.to(next(model.parameters()).device)
    if isinstance(model, ResNet):
        optimised = fuse_backbone(model)
        optimised.maxpool = ChannelsLastMaxPool(optimised.maxpool)
    elif isinstance(getattr(model, "backbone", None), ResNet):
        optimised = copy.deepcopy(model).eval()
        optimised.backbone = optimize_for_inference(model.backbone, example, select=False)
        for name, child in optimised.named_children():
            if name != "backbone":
                _fuse_head_convs(child)
    else:
        raise TypeError(f"cannot optimise {type(model).__name__}: expected a ResNet or a detector with one")
    if not select:
        return optimised
    _layout_stages(_backbone(optimised))  # before naming the convs in the plan
    path = plan_file(optimised, example) if cache else None
    plan = _read_plan(path) if path is not None else None
    if plan is not None and _apply_plan(optimised, plan):
        plan.update(cached=True, file=str(path))
    else:
        start = time.perf_counter()
        _select(optimised, example)
        plan = dict(_current_plan(optimised, example.device), selection_s=round(time.perf_counter() - start, 1))
        if path is not None:
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(plan, indent=1)))
        plan.update(cached=False, file=None if path is None else str(path))
    _backbone(optimised).stage_layouts = plan["stage_layouts"]
    optimised.kernel_plan = plan
    return optimised
