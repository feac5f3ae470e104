"""PaddleDetection's Res2Net-50 Faster / Mask R-CNN (FPN, COCO), run with Paddle's conventions.

Paddle's Res2Net differs from mmdetection's (see ``STAGE_BLOCK_STYLES['paddle']``): every stride-1 block
accumulates its splits (also res2's first), the strided blocks avg-pool their last split with the padding
excluded, and the shortcuts are strided 1x1 conv + BN; 'vb' has the 7x7 stem, 'vd' the deep 3x3 stem (and
nothing else of ResNet-D). The heads use Paddle's test-time rules (``DetectorConfig(conventions='paddle')``).

``.pdparams`` files are read by ``res2det.pdparams.read_pdparams`` (restricted unpickler) and renamed by
``paddle_to_res2det`` (strict: a key it does not know is an error).
"""
from __future__ import annotations

import re

from ..errors import CheckpointError
from ..models.backbones import BackboneConfig
from ..models.detectors import DetectorConfig, RoIHeadConfig, build_detector
from .mmdetection import COCO_CLASSES
from .registry import ModelSpec, Preprocess, PublishedWeights, StateDict, register

PADDLE_URL = "https://paddledet.bj.bcebos.com/models/"
# Paddle's NormalizeImage (is_scale, mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)) on 0..255 pixels:
# x / 255 then (x - mean) / std, which equals (p - 255 mean) / (255 std) to 1-2 ulp (<= 4.8e-7 on the fixture).
# Resize keep_ratio to fit (800, 1333), pad to 32. (Paddle resizes with cv2 INTER_CUBIC, interp 2; predict
# resizes bilinearly, which only matters for images that are not already at the model's scale.)
PADDLE_PREPROCESS = Preprocess(mean=(0.485 * 255, 0.456 * 255, 0.406 * 255), std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
                               input_size=(800, 1333), crop_pct=None)

_BN_LEAF = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var"}
_STEM_VB = {"conv1.conv": "conv1", "conv1.norm": "bn1"}
_STEM_VD = {"conv1_1.conv": "conv1.0", "conv1_1.norm": "conv1.1", "conv1_2.conv": "conv1.3",
            "conv1_2.norm": "conv1.4", "conv1_3.conv": "conv1.6", "conv1_3.norm": "bn1"}


def _block_part(part: str) -> str | None:
    """branch2a/2b.j/2c/1 sub-module of a Paddle block -> the res2det Bottle2neck module."""
    m = re.fullmatch(r"branch2a\.(conv|norm)", part)
    if m:
        return "conv1" if m[1] == "conv" else "bn1"
    m = re.fullmatch(r"branch2b\.(\d+)\.(conv|norm|conv_offset)", part)
    if m:
        return {"conv": f"convs.{m[1]}", "norm": f"bns.{m[1]}", "conv_offset": f"convs.{m[1]}.conv_offset"}[m[2]]
    m = re.fullmatch(r"branch2c\.(conv|norm)", part)
    if m:
        return "conv3" if m[1] == "conv" else "bn3"
    m = re.fullmatch(r"branch1\.(conv|norm)", part)
    if m:
        return "downsample.0" if m[1] == "conv" else "downsample.1"
    return None


def _rename(key: str) -> tuple[str, bool] | None:
    """(res2det key, whether it is a Linear weight to transpose), or None for an unknown key."""
    module, _, leaf = key.rpartition(".")
    m = re.fullmatch(r"backbone\.res1\.(.+)", module)
    if m:
        stem = _STEM_VB.get(m[1]) or _STEM_VD.get(m[1])
        if stem is None:
            return None
        is_norm = m[1].endswith(".norm")
        if (is_norm and leaf not in _BN_LEAF) or (not is_norm and leaf != "weight"):
            return None
        return f"backbone.{stem}.{_BN_LEAF[leaf] if is_norm else leaf}", False
    m = re.fullmatch(r"backbone\.res([2-5])\.blocks\.(\d+)\.(.+)", module)
    if m:
        part = _block_part(m[3])
        if part is None:
            return None
        if m[3].endswith(".norm"):
            if leaf not in _BN_LEAF:
                return None
            leaf = _BN_LEAF[leaf]
        elif m[3].endswith(".conv_offset"):
            if leaf not in ("weight", "bias"):
                return None
        elif leaf != "weight":
            return None
        return f"backbone.layer{int(m[1]) - 1}.{m[2]}.{part}.{leaf}", False
    if leaf not in ("weight", "bias"):
        return None
    m = re.fullmatch(r"neck\.fpn_inner_res([2-5])_sum(_lateral)?", module)
    if m and (m[2] is None) == (m[1] == "5"):  # the top level has no '_lateral' suffix
        return f"neck.lateral_convs.{int(m[1]) - 2}.{leaf}", False
    m = re.fullmatch(r"neck\.fpn_res([2-5])_sum", module)
    if m:
        return f"neck.fpn_convs.{int(m[1]) - 2}.{leaf}", False
    rpn = {"rpn_head.rpn_feat.rpn_conv": "rpn_conv", "rpn_head.rpn_rois_score": "rpn_cls",
           "rpn_head.rpn_rois_delta": "rpn_reg"}
    if module in rpn:
        return f"rpn_head.{rpn[module]}.{leaf}", False
    fcs = {"bbox_head.head.fc6": "shared_fcs.0", "bbox_head.head.fc7": "shared_fcs.1",
           "bbox_head.bbox_score": "fc_cls", "bbox_head.bbox_delta": "fc_reg"}
    if module in fcs:
        return f"roi_head.bbox_head.{fcs[module]}.{leaf}", leaf == "weight"
    m = re.fullmatch(r"mask_head\.head\.upsample\.mask_inter_feat_([1-9])", module)
    if m:
        return f"roi_head.mask_head.convs.{int(m[1]) - 1}.{leaf}", False
    if module == "mask_head.head.upsample.conv5_mask":  # Conv2DTranspose [Cin, Cout, 2, 2], as torch
        return f"roi_head.mask_head.upsample.{leaf}", False
    if module == "mask_head.mask_fcn_logits":
        return f"roi_head.mask_head.conv_logits.{leaf}", False
    return None


def paddle_to_res2det(state: StateDict) -> StateDict:
    """Rename a PaddleDetection Res2Net R-CNN state dict into res2det keys (strict: unknown keys raise).

    Linear weights are stored [in, out] by Paddle and transposed; BN ``_mean`` / ``_variance`` become
    ``running_mean`` / ``running_var``; DCNv2 ``conv_offset`` keeps mmcv's layout (18 interleaved offsets + 9
    modulation channels), so it is copied as is."""
    out, unknown = {}, []
    for key, value in state.items():
        renamed = _rename(key)
        if renamed is None:
            unknown.append(key)
            continue
        new, transpose = renamed
        if transpose:
            if value.dim() != 2:
                raise CheckpointError(f"Paddle Linear weight {key} should be 2-D [in, out], got {tuple(value.shape)}")
            value = value.t().contiguous()
        out[new] = value
    if unknown:
        shown = ", ".join(unknown[:12]) + (f", ... ({len(unknown) - 12} more)" if len(unknown) > 12 else "")
        raise CheckpointError(f"Paddle checkpoint has {len(unknown)} key(s) with no res2det counterpart: {shown}")
    return out


def _detect(state: StateDict) -> str | None:
    return "paddle" if any(k.endswith("._variance") or k.startswith("backbone.res1.") for k in state) else None


def _backbone(variant: str, dcn: bool) -> BackboneConfig:
    # freeze_at 0 + freeze_norm in the configs: the stem and res2 are frozen, BN statistics fixed
    return BackboneConfig(depth=50, base_width=26, scale=4, stem="deep" if variant == "vd" else "original",
                          shortcut="conv", stage_block="paddle", dcn_stages=(False, dcn, dcn, dcn),
                          frozen_stages=1, norm_eval=True)


_ROWS: list[tuple[str, str, bool, bool, dict[str, float] | None]] = [
    # name, variant, mask, dcn, published box/mask AP of the released dygraph weights (None: no weights)
    ("faster_rcnn_res2net50_vb_26w_4s_fpn_1x_coco", "vb", False, False, {"box_ap": 40.6}),
    ("mask_rcnn_res2net50_vb_26w_4s_fpn_2x_coco", "vb", True, False, {"box_ap": 42.4, "mask_ap": 38.1}),
    ("mask_rcnn_res2net50_vd_26w_4s_fpn_2x_coco", "vd", True, False, {"box_ap": 42.6, "mask_ap": 38.1}),
    ("mask_rcnn_res2net50_vd_26w_4s_fpn_dcnv2_1x_coco", "vd", True, True, None),
]

for _name, _variant, _mask, _dcn, _metrics in _ROWS:
    _kind = "Mask" if _mask else "Faster"
    register(
        ModelSpec(
            name=_name,
            task="instance_segmentation" if _mask else "detection",
            config=DetectorConfig(
                backbone=_backbone(_variant, _dcn),
                roi_head=RoIHeadConfig(with_mask=_mask),
                class_names=COCO_CLASSES,
                conventions="paddle",
                preprocess=PADDLE_PREPROCESS,
            ),
            build=build_detector,
            key_maps={"paddle": paddle_to_res2det},
            detect_format=_detect,
            weights=(PublishedWeights("paddle", f"{PADDLE_URL}{_name}.pdparams", dict(_metrics)),) if _metrics else (),
            description=(f"{_kind} R-CNN, Res2Net-50 {_variant} 26w4s{' + DCNv2 (res3-res5)' if _dcn else ''} + FPN, "
                         f"COCO (PaddleDetection{'; no released dygraph weights' if not _metrics else ''})"),
            origin="PaddleDetection",
        )
    )

__all__ = ["PADDLE_PREPROCESS", "paddle_to_res2det"]
