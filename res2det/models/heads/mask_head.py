"""The Mask R-CNN mask head (He et al., ICCV 2017) and mmdetection's way of pasting masks into the image."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ...structures import InstanceMasks
from .. import weight_init


class FCNMaskHead(nn.Module):
    """RoI features ``[N, C, 14, 14]`` -> ``num_convs`` x (3x3 conv + ReLU) -> 2x2 stride-2 transposed conv + ReLU
    -> 1x1 conv: one ``28x28`` logit map per class (no background)."""

    def __init__(self, *, in_channels: int = 256, conv_channels: int = 256, num_convs: int = 4, num_classes: int = 80):
        super().__init__()
        chans = [in_channels] + [conv_channels] * num_convs
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(chans[:-1], chans[1:]))
        self.upsample = nn.ConvTranspose2d(chans[-1], conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        weight_init.kaiming_([*self.convs, self.upsample, self.conv_logits])

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return ops.at_least_fp32(self.conv_logits(F.relu(self.upsample(x))))  # fp32 under autocast

    @staticmethod
    def targets(pos_boxes: Tensor, pos_gt_inds: Tensor, gt_masks: Tensor, size: int) -> Tensor:
        """Binary ``[P, size, size]`` targets: each gt mask RoIAligned (aligned, adaptive sampling) over its
        positive box, then thresholded at 0.5 (mmdet's ``mask_target``)."""
        if pos_boxes.shape[0] == 0:
            return pos_boxes.new_zeros(0, size, size)
        # The gt index is the roi's "batch" index, so no per-roi copy of the full-size masks is made.
        rois = torch.cat([pos_gt_inds.to(pos_boxes.dtype)[:, None], pos_boxes], dim=1)
        masks = gt_masks.to(pos_boxes.dtype)[:, None]
        return (ops.roi_align(masks, rois, size, 1.0, 0, True)[:, 0] >= 0.5).to(pos_boxes.dtype)

    @staticmethod
    def loss(mask_pred: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
        """Per-pixel BCE on the gt class's logits, averaged over all pixels of all positive rois."""
        if mask_pred.shape[0] == 0:
            return mask_pred.sum() * 0
        logits = mask_pred[torch.arange(mask_pred.shape[0], device=mask_pred.device), labels]
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="mean")


def paste_masks(probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5) -> Tensor:
    """``paste_mask_crops`` at full size: a ``[K, H, W]`` bool tensor."""
    return paste_mask_crops(probs, boxes, image_size, threshold).to_tensor()


def paste_mask_crops(probs: Tensor, boxes: Tensor, image_size: Sequence[int], threshold: float = 0.5
                     ) -> InstanceMasks:
    """Paste ``probs [K, m, m]`` (probabilities in box coordinates) into an ``H x W`` image, each kept as the crop
    of its box's window.

    As mmdet's ``_do_paste_mask``: each image pixel centre ``(x + 0.5, y + 0.5)`` is mapped into its box,
    ``grid_sample``d (bilinear, zero padding, ``align_corners=False``) and compared ``>= threshold``. Only the
    box's window (+1 px) is sampled; pixels further out cannot reach the threshold.
    """
    h, w = int(image_size[0]), int(image_size[1])
    crops, origins = [], []
    for k in range(probs.shape[0]):
        box = boxes[k]
        x0i = max(int(torch.floor(box[0])) - 1, 0)
        y0i = max(int(torch.floor(box[1])) - 1, 0)
        x1i = min(int(torch.ceil(box[2])) + 1, w)
        y1i = min(int(torch.ceil(box[3])) + 1, h)
        origins.append((min(x0i, w), min(y0i, h)))
        if x1i <= x0i or y1i <= y0i:
            crops.append(torch.zeros(0, 0, dtype=torch.bool, device=probs.device))
            continue
        xs = torch.arange(x0i, x1i, device=probs.device).to(torch.float32) + 0.5
        ys = torch.arange(y0i, y1i, device=probs.device).to(torch.float32) + 0.5
        xs = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        ys = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        # A zero-width box divides by zero; mmdet samples its centre column instead of inf.
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=-1)
        pasted = F.grid_sample(probs[k][None, None].float(), grid[None], align_corners=False)
        crops.append(pasted[0, 0] >= threshold)
    return InstanceMasks(crops, origins, h, w)
