"""PaddleDetection's static-graph (Fluid) Res2Net R-CNN checkpoints: their variable names -> res2det keys.

The four static-graph releases (``.tar`` parameter folders, read by ``res2det.fluid.read_fluid``) name every
variable after its layer (``../shared/reference/PADDLE_STATIC.md``): backbone convs ``{conv}_weights`` with BN
``bn{conv[3:]}_{scale,offset,mean,variance}`` (``bn_conv1`` for the 7x7 stem, ``bnv1_1`` .. ``bnv1_3`` for the
deep stem's ``conv1_1`` .. ``conv1_3``), blocks ``res{2..5}{a,b,..}`` with
``_branch2a``, ``_branch2b_{1,2,3}`` (the split 3x3 convs, DCNv2 offsets ``{conv}_conv_offset.{w,b}_0``),
``_branch2c`` and ``_branch1``; FPN ``fpn_inner_res5_sum``, ``fpn_inner_res{4,3,2}_sum_lateral``,
``fpn_res{5..2}_sum``; RPN ``conv_rpn_fpn2``, ``rpn_cls_logits_fpn2``, ``rpn_bbox_pred_fpn2`` (shared by all
levels); box head ``fc6``, ``fc7``, ``cls_score``, ``bbox_pred`` (fc weights [in, out]); mask head
``mask_inter_feat_{1..4}``, ``conv5_mask``, ``mask_fcn_logits``.

They predict 81 classes with background = class 0; res2det's heads have background last in ``fc_cls`` and 80
classes in ``fc_reg`` / ``conv_logits``: column 0 of ``cls_score`` moves to the end, the first 4 outputs of
``bbox_pred`` and the first channel of ``mask_fcn_logits`` (background's) are dropped.

The zoo rows ``*_static`` run them with the inference rules of that era (``conventions='paddle_static'``:
``models.heads.paddle_static_conventions``; pre-processing ``Preprocess(pipeline='paddle_static')``).
Their 'vd' backbones differ from the dygraph 'vd' rows: ResNet-D avg-pool shortcuts in res3-res5 (the static
``ResNet._shortcut`` with ``variant='d'``), not strided 1x1 convs.
"""
from __future__ import annotations

import functools
import re
import string

import torch

from ..errors import CheckpointError
from ..models.backbones import BackboneConfig
from ..models.detectors import DetectorConfig, RoIHeadConfig, build_detector
from .mmdetection import COCO_CLASSES
from .registry import ModelSpec, Preprocess, PublishedWeights, StateDict, register

_BN_LEAF = {"scale": "weight", "offset": "bias", "mean": "running_mean", "variance": "running_var"}
_STEM_VD = {"1_1": ("conv1.0", "conv1.1"), "1_2": ("conv1.3", "conv1.4"), "1_3": ("conv1.6", "bn1")}
_BRANCH = {"branch2a": ("conv1", "bn1"), "branch2c": ("conv3", "bn3")}
_FPN = {**{f"fpn_inner_res{s}_sum{'' if s == 5 else '_lateral'}": f"neck.lateral_convs.{s - 2}" for s in range(2, 6)},
        **{f"fpn_res{s}_sum": f"neck.fpn_convs.{s - 2}" for s in range(2, 6)},
        "conv_rpn_fpn2": "rpn_head.rpn_conv", "rpn_cls_logits_fpn2": "rpn_head.rpn_cls",
        "rpn_bbox_pred_fpn2": "rpn_head.rpn_reg",
        "fc6": "roi_head.bbox_head.shared_fcs.0", "fc7": "roi_head.bbox_head.shared_fcs.1",
        "cls_score": "roi_head.bbox_head.fc_cls", "bbox_pred": "roi_head.bbox_head.fc_reg",
        **{f"mask_inter_feat_{i}": f"roi_head.mask_head.convs.{i - 1}" for i in range(1, 5)},
        "conv5_mask": "roi_head.mask_head.upsample", "mask_fcn_logits": "roi_head.mask_head.conv_logits"}


def _block(conv: str, avg_shortcut: bool) -> str | None:
    """'res3b_branch2b_2' -> 'backbone.layer2.1.convs.1' (the module; BN names map through ``_bn_module``)."""
    m = re.fullmatch(r"res([2-5])([a-z])_(branch2a|branch2b_[1-9]|branch2c|branch1)", conv)
    if m is None:
        return None
    prefix = f"backbone.layer{int(m[1]) - 1}.{string.ascii_lowercase.index(m[2])}"
    branch = m[3]
    if branch.startswith("branch2b_"):
        return f"{prefix}.convs.{int(branch[9:]) - 1}"
    if branch == "branch1":  # [AvgPool2d,] conv, BN
        return f"{prefix}.downsample.{1 if avg_shortcut else 0}"
    return f"{prefix}.{_BRANCH[branch][0]}"


def _bn_module(bn: str, avg_shortcut: bool) -> str | None:
    if bn == "bn_conv1":
        return "backbone.bn1"
    m = re.fullmatch(r"bnv(1_[1-3])", bn)  # "bn" + "conv1_1"[3:]: Paddle's rule, applied to the deep stem
    if m:
        return f"backbone.{_STEM_VD[m[1]][1]}"
    m = re.fullmatch(r"bn([2-5][a-z])_(branch2a|branch2b_[1-9]|branch2c|branch1)", bn)
    if m is None:
        return None
    conv = _block(f"res{m[1]}_{m[2]}", avg_shortcut)
    if conv is None:
        return None
    if m[2].startswith("branch2b_"):
        return conv.replace(".convs.", ".bns.")
    if m[2] == "branch1":
        return conv[: -1] + str(int(conv[-1]) + 1)
    return conv.rsplit(".", 1)[0] + "." + _BRANCH[m[2]][1]


def _rename(name: str, avg_shortcut: bool) -> str | None:
    m = re.fullmatch(r"(.+)_conv_offset\.([wb])_0", name)
    if m:
        conv = _block(m[1], avg_shortcut)
        return None if conv is None else f"{conv}.conv_offset.{'weight' if m[2] == 'w' else 'bias'}"
    if name.endswith("_weights"):
        conv = name[: -len("_weights")]
        if conv == "conv1":
            return "backbone.conv1.weight"
        m = re.fullmatch(r"conv(1_[1-3])", conv)
        module = f"backbone.{_STEM_VD[m[1]][0]}" if m else _block(conv, avg_shortcut)
        return None if module is None else f"{module}.weight"
    m = re.fullmatch(r"(bn.+)_(scale|offset|mean|variance)", name)
    if m:
        module = _bn_module(m[1], avg_shortcut)
        return None if module is None else f"{module}.{_BN_LEAF[m[2]]}"
    m = re.fullmatch(r"(.+)_([wb])", name)
    if m and m[1] in _FPN:
        return f"{_FPN[m[1]]}.{'weight' if m[2] == 'w' else 'bias'}"
    return None


def _predictor(key: str, value: torch.Tensor) -> torch.Tensor:
    """81-class (background 0) predictor outputs -> res2det's (background last in fc_cls, none elsewhere)."""
    if key.startswith("roi_head.bbox_head.fc_cls"):
        return torch.cat([value[1:], value[:1]])
    if key.startswith("roi_head.bbox_head.fc_reg"):
        return value[4:]
    if key.startswith("roi_head.mask_head.conv_logits"):
        return value[1:]
    return value


def fluid_to_res2det(state: StateDict, *, avg_shortcut: bool) -> StateDict:
    """Rename a static-graph PaddleDetection Res2Net R-CNN's variables into res2det keys (strict: an unknown
    name raises). ``avg_shortcut``: the 'vd' rows' shortcuts (avg-pool, then a stride-1 conv; their module
    index differs). fc weights are transposed from [in, out]; the predictors lose the background class."""
    out, unknown = {}, []
    for name, value in state.items():
        key = _rename(name, avg_shortcut)
        if key is None:
            unknown.append(name)
            continue
        if re.fullmatch(r"roi_head\.bbox_head\.(shared_fcs\.\d|fc_cls|fc_reg)\.weight", key):
            if value.dim() != 2:
                raise CheckpointError(f"Fluid fc weight {name} should be 2-D [in, out], got {tuple(value.shape)}")
            value = value.t()
        out[key] = _predictor(key, value).contiguous()
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (f", ... ({len(unknown) - 12} more)" if len(unknown) > 12 else "")
        raise CheckpointError(f"static-graph Paddle checkpoint has {len(unknown)} variable(s) with no res2det "
                              f"counterpart: {shown}")
    return out


def _detect(state: StateDict) -> str | None:
    return "paddle-static" if any(k.endswith("_weights") or k.startswith("fpn_inner_res") for k in state) else None


STATIC_URL = "https://paddlemodels.bj.bcebos.com/object_detection/"
# The era's NormalizeImage on x / 255 with these in 0..1 units; held as 0..255 statistics (equal to 1-2 ulp)
STATIC_PREPROCESS = Preprocess(mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                               std=(0.229 * 255, 0.224 * 255, 0.225 * 255), input_size=(800, 1333), crop_pct=None,
                               pipeline="paddle_static")

_ROWS = [  # file stem, variant, mask, dcn, published figures, published fps (V100, batch 1)
    ("faster_rcnn_res2net50_vb_26w_4s_fpn_1x", "vb", False, False, {"box_ap": 39.5}, 20.320),
    ("mask_rcnn_res2net50_vb_26w_4s_fpn_2x", "vb", True, False, {"box_ap": 40.7, "mask_ap": 36.2}, 16.069),
    ("mask_rcnn_res2net50_vd_26w_4s_fpn_2x", "vd", True, False, {"box_ap": 40.9, "mask_ap": 36.2}, 15.816),
    ("mask_rcnn_res2net50_vd_26w_4s_fpn_dcnv2_1x", "vd", True, True, {"box_ap": 43.5, "mask_ap": 38.4}, 14.478),
]

for _stem, _variant, _mask, _dcn, _metrics, _fps in _ROWS:
    _avg = _variant == "vd"
    register(
        ModelSpec(
            name=f"{_stem}_static",
            task="instance_segmentation" if _mask else "detection",
            config=DetectorConfig(
                backbone=BackboneConfig(depth=50, base_width=26, scale=4, stem="deep" if _avg else "original",
                                        shortcut="avg" if _avg else "conv", stage_block="paddle",
                                        dcn_stages=(False, _dcn, _dcn, _dcn), frozen_stages=1, norm_eval=True),
                roi_head=RoIHeadConfig(with_mask=_mask),
                class_names=COCO_CLASSES,
                conventions="paddle_static",
                preprocess=STATIC_PREPROCESS,
            ),
            build=build_detector,
            key_maps={"paddle-static": functools.partial(fluid_to_res2det, avg_shortcut=_avg)},
            detect_format=_detect,
            weights=(PublishedWeights("paddle-static", f"{STATIC_URL}{_stem}.tar", dict(_metrics), fps=_fps,
                                      hardware="V100, batch 1",
                                      notes="static-graph (Fluid) release: a .tar of variable files"),),
            description=(f"{'Mask' if _mask else 'Faster'} R-CNN, Res2Net-50 {_variant} 26w4s"
                         f"{' + DCNv2 (res3-res5)' if _dcn else ''} + FPN, COCO (PaddleDetection static-graph "
                         "release, run with that era's inference rules)"),
            origin="PaddleDetection",
        )
    )

__all__ = ["fluid_to_res2det", "STATIC_PREPROCESS"]
