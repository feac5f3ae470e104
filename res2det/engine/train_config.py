"""Typed training configuration: the mmdetection recipes and one preset per model-zoo row.

A config is plain Python: ``TrainConfig(model=..., recipe=RECIPES["2x"], ...)``. ``res2det train`` takes a preset
name or a ``.py`` file that defines ``config``, and ``--set dotted.key=value`` edits single fields
(``recipe.epochs=1``, ``data.root=/data/coco``, ``model.frozen_stages=0`` for a model option)."""
from __future__ import annotations

import ast
import dataclasses
import functools
import math
import os
import re
import runpy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import Res2DetError
from ..overrides import apply_overrides, coerce


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_types(config: Any) -> None:
    """Every field holds its annotation's type, as ``--set`` checks it (ints do for floats, lists for tuples,
    path objects for strings): a ``.py`` config builds its dataclasses directly."""
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), _hints(type(config))[f.name]
        if isinstance(value, os.PathLike):
            continue
        try:
            coerce(value, hint, f.name)
        except Res2DetError:
            raise Res2DetError(f"{type(config).__name__}.{f.name}: {value!r} is not a valid value (expected "
                               f"{hint})") from None


def _check(config: Any, **valid: bool) -> None:
    """One clear error for the first field whose check failed (run whenever a config is built or edited, after
    ``_check_types``)."""
    for name, ok in valid.items():
        if not ok:
            raise Res2DetError(f"{type(config).__name__}.{name}: {getattr(config, name)!r} is not a valid value "
                               f"({_RULES.get(name, 'see the field comment')})")


_RULES = {"epochs": "at least 1", "gamma": "finite, above 0", "base_lr": "finite, above 0",
          "optimizer": "'sgd' or 'adamw'",
          "base_batch_size": "at least 1", "momentum": "in [0, 1)", "weight_decay": "finite, at least 0",
          "warmup_iters": "0 (no warm-up) or at least 2: mmengine's LinearLR over [0, 1) never leaves its start "
                          "factor",
          "warmup_ratio": "in (0, 1]", "milestones": "epochs numbered from 1", "flip_prob": "a probability in [0, 1]",
          "num_workers": "at least 0", "scale": "None or two positive integers (long, short)",
          "train_scale_range": "None or (low, high) positive integers, low <= high", "on_bad": "'fail' or 'skip'",
          "format": "'auto', 'coco', 'voc' or 'yolo'", "classes": "None or a non-empty list of class names",
          "batch_size": "at least 1", "amp": "'none', 'bf16' or 'fp16'", "grad_clip": "None or above 0",
          "on_nonfinite": "'stop' or 'skip'", "eval_every": "at least 0 (0: after the last epoch only)",
          "checkpoint_every": "at least 0 (0: at epoch ends only)", "keep_last": "at least 1",
          "log_every": "at least 1", "draw": "at least 0", "max_iters": "None or at least 1",
          "device": "'auto', 'cpu', 'cuda' or 'cuda:N'", "seed": "an integer in [-2**63, 2**63)",
          "backbone_init": "None or (classifier name, weights)",
          "class_map": "'NEW=OLD' pairs: a class of the data = a class of the checkpoint"}


@dataclass(frozen=True)
class Recipe:
    """SGD with momentum, linear warm-up, step decay at epoch milestones (mmdetection's schedules).
    The learning rate is ``base_lr`` per ``base_batch_size`` images, scaled linearly to the actual total batch."""

    epochs: int = 12
    milestones: tuple[int, ...] = (8, 11)  # the lr is multiplied by ``gamma`` when these epochs start (1-based: after)
    gamma: float = 0.1
    base_lr: float = 0.02
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # mmengine's LinearLR(begin=0, end=warmup_iters): full rate from iteration warmup_iters - 1; 0 = no warm-up
    warmup_iters: int = 500
    warmup_ratio: float = 0.001  # the first iteration runs at base_lr * warmup_ratio, rising linearly
    optimizer: Literal["sgd", "adamw"] = "sgd"  # adamw: momentum is beta1, weight decay decoupled

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, epochs=self.epochs >= 1, gamma=0 < self.gamma < math.inf, base_lr=0 < self.base_lr < math.inf,
               base_batch_size=self.base_batch_size >= 1, momentum=0 <= self.momentum < 1,
               weight_decay=0 <= self.weight_decay < math.inf,
               warmup_iters=self.warmup_iters == 0 or self.warmup_iters >= 2,
               warmup_ratio=0 < self.warmup_ratio <= 1, optimizer=self.optimizer in ("sgd", "adamw"),
               milestones=all(isinstance(m, int) and m >= 1 for m in self.milestones))


RECIPES: dict[str, Recipe] = {
    "1x": Recipe(epochs=12, milestones=(8, 11)),
    "2x": Recipe(epochs=24, milestones=(16, 22)),
    "20e": Recipe(epochs=20, milestones=(16, 19)),
    # Fine-tuning a COCO-trained row on a small data set (`res2det train ROW --init mmdet --recipe finetune`).
    # mmdetection's fine-tuning guide (docs/en/user_guides/finetune.md): SGD at lr 0.01 for a batch of 8 (the
    # COCO schedules' lr per image), linear warm-up from 0.001, 8 epochs with one x0.1 decay after the 7th; the
    # row's own frozen stem + first stage and fixed BN statistics (mmdet frozen_stages=1, norm_eval; detectron2's
    # FREEZE_AT=2 is the same layers). Warm-up 100 iterations instead of mmdetection's 500: those assume its
    # Cityscapes example (2975 images repeated 8 times per epoch); on a few hundred images 500 iterations would
    # be most of the run (detectron2's balloon example never leaves its 1000-iteration warm-up in 300 iterations).
    "finetune": Recipe(epochs=8, milestones=(7,), base_lr=0.01, base_batch_size=8, warmup_iters=100),
}


@dataclass(frozen=True)
class DataConfig:
    """Where the data is: a folder in one of ``res2det.data.layouts``' layouts (COCO json:
    ``root/annotations/instances_{split}.json`` and ``root/{split}/``; Pascal VOC; YOLO), found from its files or
    forced with ``format``. ``root=None`` is the embedded shapes set (generated on first use)."""

    root: str | None = "data/coco"
    format: Literal["auto", "coco", "voc", "yolo"] = "auto"
    train_split: str = "auto"  # 'auto': the layout's usual name (COCO train2017, VOC and YOLO train)
    val_split: str = "auto"  # 'auto': COCO val2017, VOC and YOLO val
    classes: tuple[str, ...] | None = None  # Pascal VOC: the classes, in this order (default: as first seen)
    stuff_dir: str | None = None  # HTC's semantic maps, relative to root (e.g. 'stuffthingmaps/train2017')
    scale: tuple[int, int] | None = None  # (long, short) resize bounds; None: the model's own (e.g. 1333x800)
    train_scale_range: tuple[int, int] | None = None  # short side drawn from this range in training (multi-scale)
    flip_prob: float = 0.5
    # False: every epoch the same batches of consecutive images in the annotation file's order (no shuffling, no
    # aspect grouping), to replay a reference run batch by batch
    shuffle: bool = True
    on_bad: Literal["fail", "skip"] = "fail"
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_types(self)
        pair = lambda v: v is None or (len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v))  # noqa: E731
        _check(self, flip_prob=0 <= self.flip_prob <= 1, num_workers=self.num_workers >= 0, scale=pair(self.scale),
               train_scale_range=pair(self.train_scale_range) and (
                   self.train_scale_range is None or self.train_scale_range[0] <= self.train_scale_range[1]),
               on_bad=self.on_bad in ("fail", "skip"), format=self.format in ("auto", "coco", "voc", "yolo"),
               classes=self.classes is None or (len(self.classes) > 0 and all(self.classes)))


@dataclass(frozen=True)
class TrainConfig:
    model: str  # a zoo name; num_classes and class_names come from the dataset
    model_options: dict[str, Any] = field(default_factory=dict)  # create_model overrides
    # a detector checkpoint to start from (fine-tuning): a file or a published source ('mmdet'); trained on other
    # classes, its class-dependent rows are transferred by class name (res2det.zoo.transfer)
    init_weights: str | None = None
    class_map: tuple[str, ...] = ()  # 'NEW=OLD' pairs: a class of the data takes a checkpoint class's rows
    # (ImageNet classifier name, its weights: a file or a published source such as 'official'): the backbone's
    # initialisation, as the published recipes start from ImageNet weights (ignored with init_weights)
    backbone_init: tuple[str, str] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Recipe = field(default_factory=Recipe)
    batch_size: int = 2  # images per process (mmdetection's 2 per GPU x 8 GPUs = 16)
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 uses loss scaling
    grad_clip: float | None = None  # max total gradient norm
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    sync_bn: bool = False  # BatchNorm statistics across processes (only where BN is trained)
    eval_every: int = 1  # epochs between evaluations (0: only after the last epoch)
    checkpoint_every: int = 0  # iterations between extra checkpoints (0: at the end of each epoch only)
    keep_last: int = 3  # checkpoints kept besides best.pth
    log_every: int = 20  # iterations between log lines
    draw: int = 6  # validation images drawn after training
    out_dir: str = "runs"
    max_iters: int | None = None  # stop early (smoke runs); the schedule still follows ``recipe``
    # every sampler (RPN and R-CNN stages) keeps every positive and negative: no random draw, so a step is a
    # function of weights and batch (to replay a reference run; mmdetection's sampler ``num`` = 10^8)
    exhaustive_sampling: bool = False
    device: str = "auto"  # 'auto' = cuda (the local rank's GPU) when available, else cpu

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, batch_size=self.batch_size >= 1, amp=self.amp in ("none", "bf16", "fp16"),
               grad_clip=self.grad_clip is None or self.grad_clip > 0,
               on_nonfinite=self.on_nonfinite in ("stop", "skip"), eval_every=self.eval_every >= 0,
               checkpoint_every=self.checkpoint_every >= 0, keep_last=self.keep_last >= 1,
               log_every=self.log_every >= 1, draw=self.draw >= 0,
               max_iters=self.max_iters is None or self.max_iters >= 1,
               device=re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)) is not None,
               seed=-2**63 <= self.seed < 2**63,  # what torch.manual_seed takes
               class_map=all(isinstance(m, str) and m.partition("=")[0].strip() and m.partition("=")[2].strip()
                             for m in self.class_map),
               backbone_init=self.backbone_init is None or (
                   len(self.backbone_init) == 2 and isinstance(self.backbone_init[0], str)
                   and isinstance(self.backbone_init[1], (str, os.PathLike))))


# ----------------------------------------------------------------------------------------------------- presets
def _zoo_presets() -> dict[str, TrainConfig]:
    from ..zoo import MODELS

    presets = {}
    for name, spec in MODELS.items():
        if spec.task == "classification" or name.endswith("_tiny_fpn") or spec.config.conventions == "paddle_static":
            continue
        recipe = next((RECIPES[k] for k in ("20e", "2x", "1x") if f"_{k}_" in f"{name}_"), RECIPES["1x"])
        data = DataConfig()
        htc = spec.config.roi_head.htc
        if htc is not None and htc.with_semantic:
            data = DataConfig(stuff_dir="stuffthingmaps/train2017")
        presets[name] = TrainConfig(model=name, recipe=recipe, data=data, backbone_init=_imagenet_init(name, spec))
    return presets


def _imagenet_init(name: str, spec: Any) -> tuple[str, str] | None:
    """The ImageNet weights a zoo row's recipe starts from. mmdetection's Res2Net rows load the official v1b
    (= its 'v1d') weights. PaddleDetection starts from its own ImageNet .pdparams (Res2Net50_vb/vd_26w_4s),
    whose classifier key map res2det does not have: those presets start from scratch unless
    ``backbone_init`` or ``init_weights`` is set."""
    if spec.config.conventions == "paddle":
        return None
    return (f"res2net{spec.config.backbone.depth}_v1b_26w_4s", "official")


# The README's main job: a small Res2Net Mask R-CNN trained from scratch on the embedded shapes set on a CPU.
# AdamW rather than SGD: from scratch and in 600 iterations, SGD's result varied with the seed (box AP 0.50 to
# 0.66 over seeds with this schedule, 0.41 to 0.54 with the former 4 epochs); AdamW lands within about 0.03 of
# 0.72 (README).
SHAPES = TrainConfig(
    model="mask_rcnn_r2_tiny_fpn",
    data=DataConfig(root=None, train_split="train", val_split="val", num_workers=1),
    recipe=Recipe(epochs=6, milestones=(5,), optimizer="adamw", base_lr=0.001, base_batch_size=4,
                  weight_decay=0.05, warmup_iters=50),
    batch_size=4,
    grad_clip=10.0,
    eval_every=3,
    log_every=10,
    seed=0,
)


def presets() -> dict[str, TrainConfig]:
    return {"shapes": SHAPES, **_zoo_presets()}


def load_config(name_or_path: str) -> TrainConfig:
    """A preset name, or a Python file defining ``config = TrainConfig(...)``."""
    if name_or_path.endswith(".py"):
        path = Path(name_or_path)
        if not path.is_file():
            raise Res2DetError(f"{path}: config file not found")
        try:
            config = runpy.run_path(str(path)).get("config")
        except SyntaxError as e:
            line = f":{e.lineno}" if e.lineno else ""
            raise Res2DetError(f"{path}{line}: syntax error in the config file: {e.msg}") from None
        except SystemExit as e:
            raise Res2DetError(f"{path}: the config file exited (sys.exit({e.code!r})) instead of defining "
                               "`config`") from None
        except Res2DetError as e:
            raise Res2DetError(f"{path}: {e}") from None
        except Exception as e:  # the file is the user's code: any error it raises is its problem to report
            raise Res2DetError(f"{path}: running the config file raised {type(e).__name__}: {e}") from None
        if not isinstance(config, TrainConfig):
            raise Res2DetError(f"{path}: must define `config = TrainConfig(...)`")
        return config
    known = presets()
    if name_or_path not in known:
        import difflib

        from ..zoo import MODELS

        spec = MODELS.get(name_or_path)
        if spec is not None and getattr(spec.config, "conventions", None) == "paddle_static":
            raise Res2DetError(f"{name_or_path} runs PaddleDetection's static-graph inference rules, for which "
                               "res2det has no training (inference only)")
        close = difflib.get_close_matches(name_or_path, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; presets: {', '.join(sorted(known))}"
        raise Res2DetError(f"unknown config {name_or_path!r}{hint}")
    return known[name_or_path]


def apply_settings(config: TrainConfig, settings: list[str]) -> TrainConfig:
    """Apply ``dotted.key=value`` edits. Values are Python literals (``4``, ``0.01``, ``(1333, 800)``, ``None``);
    anything else is taken as a string. ``model.PATH=value`` sets a ``create_model`` override (``PATH`` as
    ``res2det.overrides`` takes it: ``model.frozen_stages=0``, ``model.backbone.frozen_stages=0``)."""
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise Res2DetError(f"--set expects key=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        if key.startswith("model."):  # a create_model override, checked when the model is built
            config = dataclasses.replace(config, model_options={**config.model_options, key[len("model."):]: value})
            continue
        config = apply_overrides(config, {key: value}, what="--set")
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A JSON-able view (saved in the run folder and in checkpoints)."""
    out = dataclasses.asdict(config)
    out["model_options"] = {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v)
                            for k, v in config.model_options.items()}
    return out
