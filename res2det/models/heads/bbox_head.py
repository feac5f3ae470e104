"""The Fast R-CNN box head: two shared FC layers, then classification (softmax, background last) and
class-specific box regression."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import at_least_fp32
from .. import weight_init
from ..losses import accuracy
from .box_coder import DeltaXYWHBBoxCoder
from .post_processing import multiclass_nms
from .targets import SamplingResult

EPS = torch.finfo(torch.float32).eps


class Shared2FCBBoxHead(nn.Module):
    """RoI features ``[N, C, 7, 7]`` -> flatten -> ``num_shared_fcs`` x (Linear + ReLU) -> ``fc_cls``
    (``num_classes + 1`` logits, background is the LAST column) and ``fc_reg`` (4 deltas per class, no
    background box), decoded with ``target_stds``.

    ``reg_class_agnostic`` (Cascade R-CNN / HTC stages): one box ``[N, 4]`` shared by all classes.
    ``smooth_l1_beta`` > 0 trains the deltas with smooth L1 of that beta (Cascade R-CNN: 1.0) instead of L1."""

    def __init__(self, *, in_channels: int = 256, roi_size: int = 7, fc_channels: int = 1024, num_shared_fcs: int = 2,
                 num_classes: int = 80, target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                 reg_class_agnostic: bool = False, smooth_l1_beta: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.reg_class_agnostic = bool(reg_class_agnostic)
        self.smooth_l1_beta = float(smooth_l1_beta)
        dims = [in_channels * roi_size * roi_size] + [fc_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.fc_cls = nn.Linear(dims[-1], num_classes + 1)
        self.fc_reg = nn.Linear(dims[-1], 4 if self.reg_class_agnostic else 4 * num_classes)
        weight_init.xavier_(self.shared_fcs)
        weight_init.normal_([self.fc_cls], std=0.01)
        weight_init.normal_([self.fc_reg], std=0.001)
        self.bbox_coder = DeltaXYWHBBoxCoder(stds=target_stds)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        # fp32 under autocast (decoding, softmax, losses)
        return at_least_fp32(self.fc_cls(x)), at_least_fp32(self.fc_reg(x))

    def predict(self, rois: Tensor, cls_score: Tensor, bbox_pred: Tensor, image_size: tuple[int, int], *,
                score_thr: float, iou_threshold: float, max_per_img: int) -> tuple[Tensor, Tensor, Tensor]:
        """Detections of one image: (boxes ``[K, 4]``, scores ``[K]``, labels ``[K]``) by decreasing score."""
        scores = F.softmax(cls_score, dim=-1)
        boxes = self.bbox_coder.decode(rois[:, 1:], bbox_pred, max_shape=image_size)
        boxes, scores, labels, _ = multiclass_nms(boxes, scores, score_thr=score_thr, iou_threshold=iou_threshold,
                                                  max_num=max_per_img)
        return boxes, scores, labels

    def loss(self, cls_score: Tensor, bbox_pred: Tensor, samples: Sequence[SamplingResult]) -> dict[str, Tensor]:
        """Softmax CE over all sampled rois and L1 on the gt class's deltas of the positives; both are divided
        by the number of sampled rois (mmdet normalises the box loss by all rois, not the positives). ``acc``
        (the classifier's accuracy in percent) is reported beside them, not a loss."""
        labels, targets = [], []
        for s in samples:
            labels += [s.pos_gt_labels, s.pos_gt_labels.new_full((s.neg_boxes.shape[0],), self.num_classes)]
            targets.append(self.bbox_coder.encode(s.pos_boxes, s.pos_gt_boxes))
        labels, targets = torch.cat(labels), torch.cat(targets)
        n = max(labels.numel(), 1)
        loss_cls = F.cross_entropy(cls_score, labels, reduction="sum") / (n + EPS)
        pos = torch.nonzero(labels < self.num_classes).flatten()
        if pos.numel():
            if self.reg_class_agnostic:
                pred = bbox_pred.view(bbox_pred.shape[0], 4)[pos]
            else:
                pred = bbox_pred.view(bbox_pred.shape[0], -1, 4)[pos, labels[pos]]
            loss_bbox = l1_loss(pred - targets, self.smooth_l1_beta).sum() / (labels.numel() + EPS)
        else:
            loss_bbox = bbox_pred.sum() * 0
        return {"loss_cls": loss_cls, "acc": accuracy(cls_score, labels), "loss_bbox": loss_bbox}


def l1_loss(diff: Tensor, beta: float = 0.0) -> Tensor:
    """Element-wise L1 (``beta <= 0``) or mmdet's smooth L1: ``0.5 d^2 / beta`` below ``beta``, else
    ``|d| - beta / 2``."""
    d = diff.abs()
    if beta <= 0:
        return d
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
