"""COCO detectors: mmdetection's Res2Net-101 Faster / Mask R-CNN (FPN, 2x schedule) and the Res2Net-50 DCNv2 Mask R-CNN preset."""
from __future__ import annotations

import dataclasses
import re

from ..models.backbones import BackboneConfig
from ..models.detectors import DetectorConfig, FPNConfig, RoIHeadConfig, RPNConfig, StageConfig, build_detector
from ..models.heads import MaxIoUAssigner, ProposalConfig, RandomSampler, RCNNTrainConfig, RPNTrainConfig
from ..structures import DETECTION_PREPROCESS
from .registry import ModelSpec, PublishedWeights, StateDict, register, rename_by_rules

MMDET_URL = "https://download.openmmlab.com/mmdetection/v2.0/res2net/"

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# COCO's category ids of those classes, in order (the 2017 annotation files skip 11 of 1..90)
COCO_CATEGORY_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
                     *range(84, 91))


# mmdet -> res2det renames. Every key must match exactly one rule; anything else is an error, never dropped.
_MMDET_RULES = [
    # mmdet's deep stem is stem.0..6 + the BN stem.7; res2det keeps the official conv1.0..6 + bn1.
    (re.compile(r"backbone\.stem\.7\.(.+)"), r"backbone.bn1.\1"),
    (re.compile(r"backbone\.stem\.([0-6])\.(.+)"), r"backbone.conv1.\1.\2"),
    # every layer key keeps its name, including the DCNv2 offsets (``convs.i.conv_offset.{weight,bias}``)
    (re.compile(r"backbone\.layer[1-4]\..+"), r"\g<0>"),
    # mmdet wraps FPN and mask-head convs in ConvModule (.conv); res2det uses plain Conv2d.
    (re.compile(r"neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)"), r"neck.\1.\2.\3"),
    (re.compile(r"rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.(weight|bias)"), r"\g<0>"),
    (re.compile(r"roi_head\.bbox_head\.(shared_fcs\.\d+|fc_cls|fc_reg)\.(weight|bias)"), r"\g<0>"),
    (re.compile(r"roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)"), r"roi_head.mask_head.convs.\1.\2"),
    (re.compile(r"roi_head\.mask_head\.(upsample|conv_logits)\.(weight|bias)"), r"\g<0>"),
]


def mmdet_to_res2det(state: StateDict) -> StateDict:
    """Rename an mmdetection two-stage checkpoint into res2det keys (strict: unknown keys raise)."""
    return rename_by_rules(state, _MMDET_RULES, "mmdet")


def _detect(state: StateDict) -> str | None:
    return "mmdet" if "backbone.stem.0.weight" in state else None


_R2_101 = BackboneConfig(depth=101, base_width=26, scale=4, stem="deep", shortcut="avg", stage_block="mmdet",
                         frozen_stages=1, norm_eval=True)

# mmdet's Mask R-CNN base config (unlike Faster R-CNN's) lets each gt claim its best proposal in the R-CNN
# assigner (match_low_quality=True); the gts are also added as proposals, so this rarely changes anything.
_MASK_RCNN_TRAIN = RCNNTrainConfig(assigner=MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                                          match_low_quality=True))
_MASK_RCNN_STAGES = (StageConfig(train=_MASK_RCNN_TRAIN),)

_ROWS = [
    ("faster_rcnn_r2_101_fpn_2x_coco", "detection", False, "faster_rcnn_r2_101_fpn_2x_coco-175f1da6.pth",
     {"box_ap": 43.0}),
    ("mask_rcnn_r2_101_fpn_2x_coco", "instance_segmentation", True, "mask_rcnn_r2_101_fpn_2x_coco-17f061e8.pth",
     {"box_ap": 43.6, "mask_ap": 38.7}),
]
# mmdetection's res2net README: 'Mem (GB)' (training); its 'Inf time (fps)' is '-' for every Res2Net row
MMDET_TRAIN_MEMORY_GB = {"faster_rcnn_r2_101_fpn_2x_coco": 7.4, "mask_rcnn_r2_101_fpn_2x_coco": 7.9,
                         "cascade_rcnn_r2_101_fpn_20e_coco": 7.8, "cascade_mask_rcnn_r2_101_fpn_20e_coco": 9.5}

for _name, _task, _mask, _file, _metrics in _ROWS:
    register(
        ModelSpec(
            name=_name,
            task=_task,
            config=DetectorConfig(
                backbone=_R2_101,
                roi_head=RoIHeadConfig(with_mask=True, stages=_MASK_RCNN_STAGES) if _mask else RoIHeadConfig(),
                class_names=COCO_CLASSES,
            ),
            build=build_detector,
            key_maps={"mmdet": mmdet_to_res2det},
            detect_format=_detect,
            weights=(PublishedWeights("mmdet", f"{MMDET_URL}{_name}/{_file}", dict(_metrics),
                                      train_memory_gb=MMDET_TRAIN_MEMORY_GB[_name]),),
            description=f"{'Mask' if _mask else 'Faster'} R-CNN, Res2Net-101 26w4s + FPN, COCO 2x (mmdetection)",
            origin="mmdetection",
        )
    )

# mmdet's Res2Net-50 Mask R-CNN with DCNv2 (modulated deformable 3x3 convs in layer2..layer4), as in
# configs/dcn with a Res2Net backbone; no released checkpoint (a preset to train or to load your own weights).
_R2_50_DCN = dataclasses.replace(_R2_101, depth=50, dcn_stages=(False, True, True, True))

register(
    ModelSpec(
        name="mask_rcnn_r2_50_dcnv2_fpn_2x_coco",
        task="instance_segmentation",
        config=DetectorConfig(
            backbone=_R2_50_DCN,
            roi_head=RoIHeadConfig(with_mask=True, stages=_MASK_RCNN_STAGES),
            class_names=COCO_CLASSES,
        ),
        build=build_detector,
        key_maps={"mmdet": mmdet_to_res2det},
        detect_format=_detect,
        weights=(),
        description="Mask R-CNN, Res2Net-50 26w4s + DCNv2 (c3-c5) + FPN, COCO 2x (mmdetection preset, no weights)",
        origin="mmdetection config",
    )
)

# res2det's own small Mask R-CNN: the same structure (Res2Net 26w4s with deep stem and avg shortcuts, FPN, RPN,
# two-FC box head, FCN mask head) at a fraction of the width and depth, trained from scratch with BN, for small
# data sets and CPU training (the README's main job trains it on the embedded shapes set in minutes).
register(
    ModelSpec(
        name="mask_rcnn_r2_tiny_fpn",
        task="instance_segmentation",
        config=DetectorConfig(
            backbone=BackboneConfig(stage_blocks=(1, 1, 2, 1), base_channels=16, stem="deep", shortcut="avg",
                                    stage_block="mmdet"),
            neck=FPNConfig(out_channels=64),
            rpn=RPNConfig(feat_channels=64, test_proposals=ProposalConfig(nms_pre=500, max_per_img=300),
                          rpn_train=RPNTrainConfig(proposals=ProposalConfig(nms_pre=1000, max_per_img=500))),
            roi_head=RoIHeadConfig(num_classes=3, fc_channels=256, with_mask=True, mask_num_convs=2,
                                   mask_channels=64, stages=(StageConfig(train=dataclasses.replace(
                                       _MASK_RCNN_TRAIN, sampler=RandomSampler(num=128, pos_fraction=0.25))),)),
            preprocess=dataclasses.replace(DETECTION_PREPROCESS, input_size=(320, 320)),
        ),
        build=build_detector,
        key_maps={},
        detect_format=lambda state: None,
        description="Mask R-CNN, scaled-down Res2Net (1-1-2-1 blocks, 16 base channels) + FPN 64; res2det's own, "
                    "to train on small data (no published weights)",
    )
)

__all__ = ["COCO_CLASSES", "COCO_CATEGORY_IDS", "DETECTION_PREPROCESS", "mmdet_to_res2det"]
