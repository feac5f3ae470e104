"""Backbones: one ResNet skeleton, the Res2Net and plain bottlenecks, and a typed config to build them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .res2net import STAGE_BLOCK_STYLES, Bottle2neck
from .resnet import Bottleneck, ResNet


@dataclass(frozen=True)
class BackboneConfig:
    """Everything that defines a Res2Net/ResNet backbone.

    ``stage_block`` picks the published behaviour of the first block of each stage (see
    ``STAGE_BLOCK_STYLES``); ``dcn_stages`` one flag per stage for DCNv2 3x3 convs; ``frozen_stages`` 0 freezes
    the stem, k also layer1..k; ``norm_eval`` keeps BN statistics frozen in train mode; ``with_cp`` trades
    compute for memory with activation checkpointing.
    """

    block: Literal["res2net", "resnet"] = "res2net"
    depth: Literal[50, 101, 152] = 50
    # Scaled-down variants (not published; for small data and fast CPU training): blocks per stage instead of
    # ``depth``'s (3, 4, 6, 3) etc., and the stem/stage width (stage planes base, 2x, 4x, 8x; output 4x that).
    stage_blocks: tuple[int, int, int, int] | None = None
    base_channels: int = 64
    base_width: int = 26
    scale: int = 4
    cardinality: int = 1
    stem: Literal["original", "deep"] = "original"
    shortcut: Literal["conv", "avg"] = "conv"
    stage_block: Literal["official", "mmdet", "paddle"] = "official"
    dcn_stages: tuple[bool, bool, bool, bool] = (False, False, False, False)
    frozen_stages: int = -1
    norm_eval: bool = False
    with_cp: bool = False
    out_indices: tuple[int, ...] = (0, 1, 2, 3)


def build_backbone(cfg: BackboneConfig, *, num_classes: int = 0) -> ResNet:
    """A ``ResNet`` from ``cfg``: a classifier when ``num_classes > 0``, else a C2..C5 feature extractor."""
    if cfg.block == "res2net":
        block = Bottle2neck
        kwargs = dict(base_width=cfg.base_width, scale=cfg.scale, cardinality=cfg.cardinality, stage_block=cfg.stage_block)
    elif cfg.block == "resnet":
        block = Bottleneck
        kwargs = dict(base_width=cfg.base_width, cardinality=cfg.cardinality)
    else:
        raise ValueError(f"block must be 'res2net' or 'resnet', got {cfg.block!r}")
    return ResNet(
        block=block,
        depth=cfg.depth,
        stage_blocks=cfg.stage_blocks,
        base_channels=cfg.base_channels,
        block_kwargs=kwargs,
        stem=cfg.stem,
        shortcut=cfg.shortcut,
        num_classes=num_classes,
        out_indices=cfg.out_indices,
        dcn_stages=tuple(cfg.dcn_stages),
        frozen_stages=cfg.frozen_stages,
        norm_eval=cfg.norm_eval,
        with_cp=cfg.with_cp,
    )


__all__ = ["BackboneConfig", "build_backbone", "ResNet", "Bottle2neck", "Bottleneck", "STAGE_BLOCK_STYLES"]
