"""Training targets: max-IoU assignment of boxes to ground truth and random positive/negative sampling
(mmdetection's ``MaxIoUAssigner`` and ``RandomSampler`` semantics)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...ops import box_iou


@dataclass
class AssignResult:
    """Per box: ``gt_inds`` 0 = negative, -1 = ignored, k > 0 = matched to gt k-1; ``labels`` -1 unless positive."""

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def add_gt(self, gt_labels: Tensor) -> None:
        """Prepend the gt boxes themselves as positives (the caller prepends them to the boxes too)."""
        n = gt_labels.numel()
        self.gt_inds = torch.cat([torch.arange(1, n + 1, device=gt_labels.device), self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(n), self.max_overlaps])
        self.labels = torch.cat([gt_labels, self.labels])


@dataclass(frozen=True)
class MaxIoUAssigner:
    """Positive if the best IoU with a gt is >= ``pos_iou_thr``, negative if it is in [0, ``neg_iou_thr``), else
    ignored. With ``match_low_quality`` every gt also claims the box(es) it overlaps most (ties: all of them),
    if that IoU is >= ``min_pos_iou``, so that no gt is left without a positive."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.0
    match_low_quality: bool = True

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        n = boxes.shape[0]
        gt_inds = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
        labels = torch.full((n,), -1, dtype=torch.long, device=boxes.device)
        if gt_boxes.shape[0] == 0 or n == 0:
            return AssignResult(gt_inds.fill_(0), boxes.new_zeros(n), labels)
        overlaps = box_iou(gt_boxes, boxes)  # [G, N]
        max_overlaps, argmax = overlaps.max(dim=0)
        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        pos = max_overlaps >= self.pos_iou_thr
        gt_inds[pos] = argmax[pos] + 1
        if self.match_low_quality:
            gt_max = overlaps.max(dim=1).values
            claims = (overlaps == gt_max[:, None]) & (gt_max[:, None] >= self.min_pos_iou)
            # mmdet loops over gts in order, so the last claiming gt wins a box: take the highest index.
            ids = torch.arange(1, gt_boxes.shape[0] + 1, device=boxes.device)[:, None]
            last = (claims.long() * ids).max(dim=0).values
            gt_inds = torch.where(last > 0, last, gt_inds)
        pos = gt_inds > 0
        labels[pos] = gt_labels[gt_inds[pos] - 1]
        return AssignResult(gt_inds, max_overlaps, labels)


@dataclass(frozen=True)
class RandomSampler:
    """Draw up to ``num`` boxes, at most ``num * pos_fraction`` of them positive, filling up with negatives."""

    num: int = 512
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True

    def sample(self, assign: AssignResult) -> tuple[Tensor, Tensor]:
        """(positive indices, negative indices) into the assigned boxes."""
        pos = torch.nonzero(assign.gt_inds > 0).flatten()
        pos = _random_subset(pos, int(self.num * self.pos_fraction))
        neg = torch.nonzero(assign.gt_inds == 0).flatten()
        neg = _random_subset(neg, self.num - pos.numel())
        return pos, neg


def _random_subset(inds: Tensor, num: int) -> Tensor:
    if inds.numel() <= num:
        return inds
    return inds[torch.randperm(inds.numel(), device=inds.device)[:num]]


@dataclass
class SamplingResult:
    """The sampled boxes of one image (positives first) and the gt each positive is matched to."""

    pos_boxes: Tensor
    neg_boxes: Tensor
    pos_gt_inds: Tensor  # 0-based
    pos_gt_labels: Tensor
    pos_gt_boxes: Tensor
    pos_is_gt: Tensor | None = None  # [P] bool: the positive is a gt box added as a proposal

    @property
    def boxes(self) -> Tensor:
        return torch.cat([self.pos_boxes, self.neg_boxes])

    @property
    def num(self) -> int:
        return self.pos_boxes.shape[0] + self.neg_boxes.shape[0]


def assign_and_sample(boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, assigner: MaxIoUAssigner,
                      sampler: RandomSampler) -> SamplingResult:
    """mmdet's assign-then-sample for one image (with ``add_gt_as_proposals`` the gts become proposals too)."""
    boxes = boxes[:, :4].detach()
    assign = assigner.assign(boxes, gt_boxes, gt_labels)
    num_added = 0
    if sampler.add_gt_as_proposals and gt_boxes.shape[0] > 0:
        boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes])
        assign.add_gt(gt_labels)
        num_added = gt_boxes.shape[0]
    pos, neg = sampler.sample(assign)
    gt_inds = assign.gt_inds[pos] - 1
    pos_gt_boxes = gt_boxes[gt_inds] if gt_boxes.shape[0] else gt_boxes.new_zeros(0, 4)
    return SamplingResult(boxes[pos], boxes[neg], gt_inds, assign.labels[pos], pos_gt_boxes, pos < num_added)
