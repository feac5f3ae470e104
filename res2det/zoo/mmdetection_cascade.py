"""COCO cascade detectors: mmdetection's Res2Net-101 Cascade R-CNN, Cascade Mask R-CNN and HTC (FPN, 20e)."""
from __future__ import annotations

import re

import dataclasses

from ..models.detectors import (CASCADE_ROI_HEAD, CASCADE_RPN, HTC_STAGES, DetectorConfig, HTCConfig,
                                build_detector)
from ..models.heads import RCNNTestConfig
from .mmdetection import _MMDET_RULES, _R2_101, _detect, COCO_CLASSES, MMDET_TRAIN_MEMORY_GB, MMDET_URL
from .registry import ModelSpec, PublishedWeights, StateDict, register, rename_by_rules

# Cascade / HTC heads on top of the Faster/Mask R-CNN rules (the backbone, FPN and RPN rules are shared).
_CASCADE_RULES = [r for r in _MMDET_RULES if not r[0].pattern.startswith(r"roi_head\.")] + [
    (re.compile(r"roi_head\.bbox_head\.(\d+)\.(shared_fcs\.\d+|fc_cls|fc_reg)\.(weight|bias)"), r"\g<0>"),
    # mmdet wraps mask-head, conv_res and semantic-head convs in ConvModule (.conv); res2det uses plain Conv2d.
    (re.compile(r"roi_head\.mask_head\.(\d+)\.(convs\.\d+|conv_res)\.conv\.(weight|bias)"),
     r"roi_head.mask_head.\1.\2.\3"),
    (re.compile(r"roi_head\.mask_head\.(\d+)\.(upsample|conv_logits)\.(weight|bias)"), r"\g<0>"),
    (re.compile(r"roi_head\.semantic_head\.(lateral_convs\.\d+|convs\.\d+|conv_embedding)\.conv\.(weight|bias)"),
     r"roi_head.semantic_head.\1.\2"),
    (re.compile(r"roi_head\.semantic_head\.conv_logits\.(weight|bias)"), r"\g<0>"),
]


def mmdet_cascade_to_res2det(state: StateDict) -> StateDict:
    """Rename an mmdetection Cascade / HTC checkpoint into res2det keys (strict: unknown keys raise)."""
    return rename_by_rules(state, _CASCADE_RULES, "mmdet")


_ROWS = [
    ("cascade_rcnn_r2_101_fpn_20e_coco", "detection", CASCADE_ROI_HEAD,
     "cascade_rcnn_r2_101_fpn_20e_coco-f4b7b7db.pth", {"box_ap": 45.7}, "Cascade R-CNN"),
    ("cascade_mask_rcnn_r2_101_fpn_20e_coco", "instance_segmentation",
     dataclasses.replace(CASCADE_ROI_HEAD, with_mask=True),
     "cascade_mask_rcnn_r2_101_fpn_20e_coco-8a7b41e1.pth", {"box_ap": 46.4, "mask_ap": 40.0}, "Cascade Mask R-CNN"),
    # htc_r50_fpn_1x_coco: interleaved, mask information flow, the semantic branch; test score_thr 0.001
    ("htc_r2_101_fpn_20e_coco", "instance_segmentation",
     dataclasses.replace(CASCADE_ROI_HEAD, with_mask=True, htc=HTCConfig(), stages=HTC_STAGES,
                         rcnn_test=RCNNTestConfig(score_thr=0.001)),
     "htc_r2_101_fpn_20e_coco-3a8d2112.pth", {"box_ap": 47.5, "mask_ap": 41.6}, "Hybrid Task Cascade"),
]

for _name, _task, _head, _file, _metrics, _what in _ROWS:
    register(
        ModelSpec(
            name=_name,
            task=_task,
            config=DetectorConfig(backbone=_R2_101, rpn=CASCADE_RPN, roi_head=_head, class_names=COCO_CLASSES),
            build=build_detector,
            key_maps={"mmdet": mmdet_cascade_to_res2det},
            detect_format=_detect,
            weights=(PublishedWeights("mmdet", f"{MMDET_URL}{_name}/{_file}", dict(_metrics),
                                      train_memory_gb=MMDET_TRAIN_MEMORY_GB.get(_name)),),  # HTC: '-'
            description=f"{_what}, Res2Net-101 26w4s + FPN, COCO 20e (mmdetection)",
            origin="mmdetection",
        )
    )

__all__ = ["mmdet_cascade_to_res2det"]
