"""Region Proposal Network head (Ren et al., NeurIPS 2015) with mmdetection's test-time proposal selection."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import at_least_fp32
from ...ops.onnx_ops import exporting
from .. import weight_init
from .anchors import AnchorGenerator
from .bbox_head import l1_loss
from .box_coder import DeltaXYWHBBoxCoder
from .post_processing import batched_nms
from .targets import MaxIoUAssigner, RandomSampler

EPS = torch.finfo(torch.float32).eps  # mmdet adds it to every loss normaliser


@dataclass(frozen=True)
class ProposalConfig:
    """How proposals are picked: the ``nms_pre`` best anchors per level, boxes with a side <= ``min_bbox_size``
    dropped, NMS at ``iou_threshold`` within each level, then the ``max_per_img`` best overall."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0


@dataclass(frozen=True)
class RPNTrainConfig:
    assigner: MaxIoUAssigner = field(default_factory=lambda: MaxIoUAssigner(
        pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True))
    sampler: RandomSampler = field(default_factory=lambda: RandomSampler(
        num=256, pos_fraction=0.5, add_gt_as_proposals=False))
    proposals: ProposalConfig = field(default_factory=lambda: ProposalConfig(nms_pre=2000, max_per_img=1000))
    size_divisor: int = 32  # images are padded to a multiple of this; anchors beyond it are ignored
    # Anchors reaching more than this many pixels outside the unpadded image are ignored in training; -1 keeps
    # them all (mmdet's Faster / Mask R-CNN); Cascade R-CNN and HTC use 0: only anchors wholly inside the image.
    allowed_border: int = -1
    smooth_l1_beta: float = 0.0  # 0: L1 box loss (Faster/Mask R-CNN); Cascade R-CNN / HTC: smooth L1, beta 1/9


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then per anchor one objectness logit (sigmoid) and 4 box deltas, on every level."""

    def __init__(self, *, in_channels: int = 256, feat_channels: int = 256,
                 anchor_generator: AnchorGenerator | None = None,
                 target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 test_cfg: ProposalConfig | None = None, train_cfg: RPNTrainConfig | None = None):
        super().__init__()
        self.anchor_generator = anchor_generator or AnchorGenerator()
        self.bbox_coder = DeltaXYWHBBoxCoder(stds=target_stds)
        self.test_cfg = test_cfg or ProposalConfig()
        self.train_cfg = train_cfg or RPNTrainConfig()
        a = self.anchor_generator.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, a, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, a * 4, 1)
        weight_init.normal_([self.rpn_conv, self.rpn_cls, self.rpn_reg], std=0.01)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits ``[B, A, H, W]`` and deltas ``[B, 4A, H, W]``."""
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            # fp32 under autocast: decoding and losses need it (bf16 resolves ~4 px at x = 1000)
            cls_scores.append(at_least_fp32(self.rpn_cls(x)))
            bbox_preds.append(at_least_fp32(self.rpn_reg(x)))
        return cls_scores, bbox_preds

    # ----------------------------------------------------------------------------------------------- proposals
    @torch.no_grad()
    def predict_proposals(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor],
                          image_sizes: Sequence[tuple[int, int]], cfg: ProposalConfig | None = None
                          ) -> list[tuple[Tensor, Tensor]]:
        """Per image (boxes ``[K, 4]``, objectness ``[K]``) sorted by decreasing score, K <= ``max_per_img``."""
        cfg = cfg or self.test_cfg
        anchors = self.anchor_generator.grid_anchors([c.shape[-2:] for c in cls_scores], cls_scores[0].device)
        results = []
        for b, image_size in enumerate(image_sizes):
            scores, deltas, priors, levels = [], [], [], []
            for lvl, (cls, reg, anc) in enumerate(zip(cls_scores, bbox_preds, anchors)):
                s = cls[b].permute(1, 2, 0).reshape(-1).sigmoid()
                d = reg[b].permute(1, 2, 0).reshape(-1, 4)
                if cfg.nms_pre > 0 and (exporting() or cfg.nms_pre < s.shape[0]):
                    # mmdet ranks by a full sort (not topk); same call, same order of ties. (The exported
                    # graph always sorts: a slice past the end is the whole level, whatever the input size.)
                    s, order = s.sort(descending=True)
                    s, order = s[:cfg.nms_pre], order[:cfg.nms_pre]
                    d, anc = d[order], anc[order]
                scores.append(s)
                deltas.append(d)
                priors.append(anc)
                levels.append(torch.full_like(s, lvl, dtype=torch.long))
            boxes = self.bbox_coder.decode(torch.cat(priors), torch.cat(deltas), max_shape=image_size)
            scores, levels = torch.cat(scores), torch.cat(levels)
            if cfg.min_bbox_size >= 0:
                # Even with min_bbox_size 0 this drops boxes clipped to zero width or height.
                w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                valid = (w > cfg.min_bbox_size) & (h > cfg.min_bbox_size)
                if exporting() or not bool(valid.all()):
                    valid = torch.nonzero(valid).flatten()
                    boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
            # Levels are NMS'd independently (level id as the "class").
            keep = batched_nms(boxes, scores, levels, cfg.iou_threshold, cfg.max_per_img)
            results.append((boxes[keep], scores[keep]))
        return results

    # ---------------------------------------------------------------------------------------------------- loss
    def loss(self, cls_scores: Sequence[Tensor], bbox_preds: Sequence[Tensor], gt_boxes: Sequence[Tensor],
             image_sizes: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
        """Sigmoid BCE on sampled anchors and L1 on the positives' deltas, both averaged over the sampled anchors
        of the batch (mmdet's ``avg_factor``)."""
        cfg = self.train_cfg
        sizes = [c.shape[-2:] for c in cls_scores]
        device = cls_scores[0].device
        anchors = torch.cat(self.anchor_generator.grid_anchors(sizes, device))
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(c.shape[0], -1) for c in cls_scores], dim=1)
        deltas = torch.cat([r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, 4) for r in bbox_preds], dim=1)
        # "* 0" keeps an image without positives (or a batch without gts) connected to the graph.
        loss_cls, loss_bbox, num_sampled = logits.sum() * 0, deltas.sum() * 0, 0
        d = cfg.size_divisor
        for b, (gt, (h, w)) in enumerate(zip(gt_boxes, image_sizes)):
            pad_shape = (-(-h // d) * d, -(-w // d) * d)  # the image's own padding, not the batch's
            valid = torch.cat(self.anchor_generator.valid_flags(sizes, pad_shape, device))
            if cfg.allowed_border >= 0:  # against the image's own unpadded size, as mmdet's img_shape
                m = cfg.allowed_border
                valid &= ((anchors[:, 0] >= -m) & (anchors[:, 1] >= -m) & (anchors[:, 2] < w + m)
                          & (anchors[:, 3] < h + m))
            valid = torch.nonzero(valid).flatten()
            gt = gt.to(anchors.dtype).reshape(-1, 4)
            assign = cfg.assigner.assign(anchors[valid], gt, torch.zeros(gt.shape[0], dtype=torch.long, device=device))
            pos, neg = cfg.sampler.sample(assign)
            sampled = valid[torch.cat([pos, neg])]
            target = torch.cat([logits.new_ones(pos.numel()), logits.new_zeros(neg.numel())])
            loss_cls = loss_cls + F.binary_cross_entropy_with_logits(logits[b, sampled], target, reduction="sum")
            if pos.numel():
                pos_anchors = anchors[valid[pos]]
                targets = self.bbox_coder.encode(pos_anchors, gt[assign.gt_inds[pos] - 1])
                loss_bbox = loss_bbox + l1_loss(deltas[b, valid[pos]] - targets, cfg.smooth_l1_beta).sum()
            num_sampled += sampled.numel()
        return {"loss_rpn_cls": loss_cls / (num_sampled + EPS), "loss_rpn_bbox": loss_bbox / (num_sampled + EPS)}
