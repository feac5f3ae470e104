"""Hybrid Task Cascade (Chen et al., CVPR 2019), as mmdetection 3.3.0's ``HybridTaskCascadeRoIHead``.

On top of Cascade Mask R-CNN:

* **interleaved** training: each stage's mask branch is trained on the boxes its own box branch regressed
  (re-assigned and re-sampled);
* **mask information flow**: mask head ``s`` adds ``ReLU(conv_res(f))`` of the previous head's conv features
  ``f`` to its RoI features (at test all heads run in a chain on the final detections; as in mmdet 3.3.0 the
  final masks are the last head's, not the average of the stages);
* an optional **semantic branch** (``FusedSemanticHead``): a stride-8 segmentation head over all FPN levels whose
  embedding is RoIAligned (14x14, avg-pooled to 7x7 for boxes) and added to the box and mask RoI features.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import MultiLevelRoIAlign, at_least_fp32
from .. import weight_init
from .cascade_roi_head import CascadeRoIHead
from .mask_head import FCNMaskHead


class HTCMaskHead(FCNMaskHead):
    """``FCNMaskHead`` that also returns its last conv features (``[N, C, 14, 14]``, the information flowing to
    the next stage) and, with ``with_conv_res``, adds ``ReLU(conv_res(previous features))`` to its input."""

    def __init__(self, *, with_conv_res: bool = True, in_channels: int = 256, conv_channels: int = 256,
                 num_convs: int = 4, num_classes: int = 80):
        super().__init__(in_channels=in_channels, conv_channels=conv_channels, num_convs=num_convs,
                         num_classes=num_classes)
        # mmdet: conv_out -> conv_out channels; to the input width here so that in_channels may differ
        self.conv_res = nn.Conv2d(conv_channels, in_channels, 1) if with_conv_res else None
        weight_init.kaiming_([self.conv_res] if with_conv_res else [])

    def forward(self, x: Tensor, res_feat: Tensor | None = None, *, return_logits: bool = True,
                return_feat: bool = True) -> Any:
        if res_feat is not None:
            if self.conv_res is None:
                raise ValueError("this mask head has no conv_res to take the previous stage's features")
            x = x + F.relu(self.conv_res(res_feat))
        for conv in self.convs:
            x = F.relu(conv(x))
        feat = x
        outs = []
        if return_logits:
            outs.append(at_least_fp32(self.conv_logits(F.relu(self.upsample(x)))))
        if return_feat:
            outs.append(feat)
        return tuple(outs) if len(outs) > 1 else outs[0]


class FusedSemanticHead(nn.Module):
    """All FPN levels resized (bilinear, ``align_corners=True``) to level ``fusion_level``, each through a 1x1
    conv + ReLU and summed; ``num_convs`` x (3x3 conv + ReLU); then ``conv_logits`` (``num_classes`` stuff and
    thing classes) and ``conv_embedding`` (1x1 conv + ReLU, the features fused into the RoI heads).

    ``loss``: cross entropy against the label map downsampled by nearest ``1 / stride`` (255 = ignore, mmdet's
    mean over all pixels, ignored ones included), times ``loss_weight``."""

    def __init__(self, *, num_ins: int = 5, fusion_level: int = 1, num_convs: int = 4, in_channels: int = 256,
                 conv_channels: int = 256, num_classes: int = 183, ignore_index: int = 255,
                 loss_weight: float = 0.2, stride: int = 8):
        super().__init__()
        self.fusion_level = fusion_level
        self.ignore_index = ignore_index
        self.loss_weight = loss_weight
        self.stride = stride
        self.lateral_convs = nn.ModuleList(nn.Conv2d(in_channels, in_channels, 1) for _ in range(num_ins))
        chans = [in_channels] + [conv_channels] * num_convs
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1) for i, o in zip(chans[:-1], chans[1:]))
        self.conv_embedding = nn.Conv2d(conv_channels, conv_channels, 1)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)
        weight_init.kaiming_([*self.lateral_convs, *self.convs, self.conv_embedding, self.conv_logits])

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(segmentation logits ``[B, num_classes, h, w]``, embedding ``[B, C, h, w]``) at the fusion level."""
        x = F.relu(self.lateral_convs[self.fusion_level](feats[self.fusion_level]))
        size = tuple(x.shape[-2:])
        for i, feat in enumerate(feats):
            if i != self.fusion_level:
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=True)
                x = x + F.relu(self.lateral_convs[i](feat))
        for conv in self.convs:
            x = F.relu(conv(x))
        return at_least_fp32(self.conv_logits(x)), F.relu(self.conv_embedding(x))

    def loss(self, seg_pred: Tensor, labels: Tensor) -> Tensor:
        """``labels [B, H, W]`` (the padded input's size) -> weighted cross entropy."""
        labels = F.interpolate(labels[:, None].float(), scale_factor=1.0 / self.stride, mode="nearest")
        labels = labels[:, 0].long()
        if labels.shape[-2:] != seg_pred.shape[-2:]:
            raise ValueError(f"semantic labels downsample to {tuple(labels.shape[-2:])}, the semantic head predicts "
                             f"{tuple(seg_pred.shape[-2:])}: pad the label maps like the images")
        loss = F.cross_entropy(seg_pred, labels, ignore_index=self.ignore_index, reduction="none")
        return loss.mean() * self.loss_weight


class HybridTaskCascadeRoIHead(CascadeRoIHead):
    """``CascadeRoIHead`` with HTC's interleaving, mask information flow and optional semantic fusion
    (``semantic_head`` / ``semantic_roi_extractor`` are ``None`` without the semantic branch)."""

    def __init__(self, *, semantic_head: FusedSemanticHead | None = None, semantic_roi_size: int = 14,
                 semantic_stride: int = 8, interleaved: bool = True, mask_info_flow: bool = True, **kwargs):
        super().__init__(**kwargs)
        if self.mask_head is None:
            raise ValueError("HTC needs mask heads")
        self.semantic_head = semantic_head
        self.semantic_roi_extractor = None
        if semantic_head is not None:
            self.semantic_roi_extractor = MultiLevelRoIAlign(output_size=semantic_roi_size,
                                                             featmap_strides=(semantic_stride,), sampling_ratio=0,
                                                             aligned=True)
        self.interleaved = interleaved
        self.mask_info_flow = mask_info_flow
        self._semantic_calls = 0

    @property
    def with_semantic(self) -> bool:
        return self.semantic_head is not None

    @property
    def _refine_before_mask(self) -> bool:  # type: ignore[override]
        return self.interleaved

    # --------------------------------------------------------------------------------- semantic fusion
    def _semantic(self, feats: Sequence[Tensor], capture: dict[str, Tensor] | None) -> Tensor | None:
        self._semantic_calls = 0
        if not self.with_semantic:
            return None
        seg_pred, semantic_feat = self.semantic_head(feats)
        if capture is not None:
            capture["roi_head.semantic_head.call0.seg_pred"] = seg_pred
            capture["roi_head.semantic_head.call0.semantic_feat"] = semantic_feat
        return semantic_feat

    def _fuse(self, roi_feats: Tensor, rois: Tensor, semantic: Tensor | None,
              capture: dict[str, Tensor] | None, out_size: int) -> Tensor:
        if semantic is None:
            return roi_feats
        sem = self.semantic_roi_extractor([semantic], rois)
        if capture is not None:
            capture[f"roi_head.semantic_roi_extractor.call{self._semantic_calls}.rois"] = rois
        self._semantic_calls += 1
        size = self.semantic_roi_extractor.output_size
        if size != out_size:  # 14x14 -> 7x7 for the box heads: mmdet's adaptive pooling, which between sizes
            # that divide is plain average pooling (the same floats; and it exports to ONNX)
            sem = F.avg_pool2d(sem, size // out_size) if size % out_size == 0 else F.adaptive_avg_pool2d(sem, out_size)
        return roi_feats + sem

    def semantic_loss(self, feats: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]],
                      pad_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(semantic features for fusion, weighted segmentation loss). Every target needs ``semantic``: an
        ``[H, W]`` int64 label map of its image (padded here with the ignore label to ``pad_shape``)."""
        if any("semantic" not in t for t in targets):
            raise ValueError("HTC with the semantic branch needs 'semantic' ([H, W] label maps, 255 = ignore) in "
                             "every target; build the model with with_semantic=False to train without them")
        ph, pw = int(pad_shape[0]), int(pad_shape[1])
        labels = []
        for t in targets:
            m = t["semantic"].to(feats[0].device, torch.long)
            if m.ndim == 3:
                m = m[0]
            if m.shape[0] > ph or m.shape[1] > pw:
                raise ValueError(f"semantic map {tuple(m.shape)} is larger than the input {(ph, pw)}")
            labels.append(F.pad(m, (0, pw - m.shape[1], 0, ph - m.shape[0]), value=self.semantic_head.ignore_index))
        seg_pred, semantic_feat = self.semantic_head(feats)
        return semantic_feat, self.semantic_head.loss(seg_pred, torch.stack(labels))

    # ------------------------------------------------------------------------------------------- box
    def _bbox_forward(self, stage, feats, rois, semantic, capture=None):
        x = self._fuse(self.bbox_roi_extractor(feats, rois), rois, semantic, capture,
                       self.bbox_roi_extractor.output_size)
        return self.bbox_head[stage](x)

    # ------------------------------------------------------------------------------------------ mask
    def _mask_probs(self, feats, rois, semantic, capture) -> list[Tensor]:
        """All mask heads chained on the same (semantic-fused) RoI features of the final detections."""
        x = self.mask_roi_extractor(feats, rois)
        if capture is not None:
            capture[f"roi_head.mask_roi_extractor.{self.num_stages - 1}.call0.rois"] = rois
        x = self._fuse(x, rois, semantic, capture, self.mask_roi_extractor.output_size)
        preds, last = [], None
        for stage in range(self.num_stages):
            if self.mask_info_flow:
                pred, last = self.mask_head[stage](x, last)
            else:
                pred, last = self.mask_head[stage](x)
            if capture is not None:
                capture[f"roi_head.mask_head.{stage}.call0.mask_pred"] = pred
                capture[f"roi_head.mask_head.{stage}.call0.mask_feat"] = last
            preds.append(pred)
        return preds

    def _merge_mask_probs(self, preds: Sequence[Tensor]) -> Tensor:
        """mmdetection 3.3.0's HTC keeps only the LAST stage's mask (its test-time ``_mask_forward`` appends to
        the list after the stage loop), unlike Cascade Mask R-CNN's average; checked against the fixture: the
        last stage's masks are identical to mmdet's, the stage average has mean IoU 0.44."""
        return preds[-1].sigmoid()

    def _mask_forward_train(self, stage, feats, rois, semantic) -> Tensor:
        x = self._fuse(self.mask_roi_extractor(feats, rois), rois, semantic, None,
                       self.mask_roi_extractor.output_size)
        last = None
        if self.mask_info_flow:
            for i in range(stage):
                last = self.mask_head[i](x, last, return_logits=False)
        return self.mask_head[stage](x, last, return_feat=False)


def build_htc_roi_head(h: Any, in_channels: int, bbox_heads, *, num_ins: int = 5, **common) -> HybridTaskCascadeRoIHead:
    """The HTC RoI head from a ``RoIHeadConfig`` whose ``htc`` is set."""
    if not h.with_mask:
        raise ValueError("HTC needs with_mask=True")
    t = h.htc
    n = len(bbox_heads)
    mask_heads = [HTCMaskHead(with_conv_res=t.mask_info_flow and s > 0, in_channels=in_channels,
                              conv_channels=h.mask_channels, num_convs=h.mask_num_convs, num_classes=h.num_classes)
                  for s in range(n)]
    semantic = None
    stride = h.featmap_strides[t.semantic_fusion_level]
    if t.with_semantic:
        semantic = FusedSemanticHead(num_ins=num_ins, fusion_level=t.semantic_fusion_level,
                                     num_convs=t.semantic_num_convs, in_channels=in_channels,
                                     conv_channels=in_channels, num_classes=t.semantic_num_classes,
                                     ignore_index=t.semantic_ignore_index, loss_weight=t.semantic_loss_weight,
                                     stride=stride)
    return HybridTaskCascadeRoIHead(bbox_heads=bbox_heads, mask_heads=mask_heads, semantic_head=semantic,
                                    semantic_roi_size=t.semantic_roi_size, semantic_stride=stride,
                                    interleaved=t.interleaved, mask_info_flow=t.mask_info_flow, **common)


__all__ = ["HTCMaskHead", "FusedSemanticHead", "HybridTaskCascadeRoIHead", "build_htc_roi_head"]
