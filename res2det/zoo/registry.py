"""The model table: one ``ModelSpec`` per named model (a model-zoo row), with its typed config, the
published weights it can load and how their keys map onto res2det's."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..structures import Preprocess

StateDict = dict[str, torch.Tensor]
KeyMap = Callable[[StateDict], StateDict]

@dataclass(frozen=True)
class PublishedWeights:
    """A released checkpoint. The file name carries the first hex digits of its sha256 where the publisher
    did so; ``download`` verifies them."""

    source: str  # 'official', 'timm', 'torchvision', 'mmdet', 'paddle': also the key-map format
    url: str
    metrics: dict[str, float] = field(default_factory=dict)  # as published (top1, box_ap, mask_ap, ...)
    notes: str = ""
    # Published cost figures, where the publisher gave them (None: not given). mmdetection's 'Mem (GB)' is the
    # training memory (max torch.cuda.max_memory_allocated over its 8 GPUs, 2 images each); fps is the
    # publisher's inference speed on ``hardware``.
    train_memory_gb: float | None = None
    fps: float | None = None
    hardware: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str  # 'classification' | 'detection' | 'instance_segmentation'
    config: Any  # a dataclass; create_model(**overrides) replaces its fields
    build: Callable[[Any], nn.Module]
    key_maps: dict[str, KeyMap]  # format name -> rename into res2det keys
    detect_format: Callable[[StateDict], str | None]
    weights: tuple[PublishedWeights, ...] = ()
    preprocess: Preprocess = Preprocess()
    description: str = ""
    # The model zoo the row comes from ('Res2Net official', 'torchvision', 'mmdetection', 'PaddleDetection');
    # 'res2det' for res2det's own presets.
    origin: str = "res2det"
    # Releases of this model in a format res2det does not read (PaddleDetection's static-graph .tar files),
    # listed by ``res2det zoo`` for their published figures only; ``create_model(weights=...)`` ignores them.
    other_releases: tuple[PublishedWeights, ...] = ()


def rename_by_rules(state: StateDict, rules: list[tuple[re.Pattern, str]], source: str) -> StateDict:
    """Rename every key by the first (pattern, replacement) rule that matches it in full. Strict: a key that no
    rule matches is an error listing the keys, never silently dropped."""
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            m = pattern.fullmatch(key)
            if m:
                out[m.expand(repl)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        from ..errors import CheckpointError

        shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown) - 12} more)" if len(unknown) > 12 else "")
        raise CheckpointError(f"{source} checkpoint has {len(unknown)} key(s) with no res2det counterpart: {shown}")
    return out


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a row. A detector's config carries its own ``preprocess``; the row's is that one (one source)."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} registered twice")
    if hasattr(spec.config, "preprocess"):
        spec = dataclasses.replace(spec, preprocess=spec.config.preprocess)
    MODELS[spec.name] = spec
    return spec
