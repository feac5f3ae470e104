"""Detectors start from mmdetection's initialisation (what its recipes, and so the published training results,
assume): the distributions of every layer kind, checked on full-size zoo models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import res2det
from res2det.ops import ModulatedDeformConv2d


def fans(w: torch.Tensor) -> tuple[int, int]:
    return nn.init._calculate_fan_in_and_fan_out(w)


def assert_std(w: torch.Tensor, std: float) -> None:
    """The sample std of ``w`` is ``std`` within 5 standard errors (about 1 / sqrt(2n) relative)."""
    rel = 5 / math.sqrt(2 * w.numel())
    assert abs(w.float().std().item() / std - 1) < rel, (tuple(w.shape), w.std().item(), std)


def assert_zero_bias(m: nn.Module) -> None:
    assert m.bias is None or not m.bias.any()


@pytest.fixture(scope="module")
def dcn_mask_rcnn():
    torch.manual_seed(0)
    return res2det.create_model("mask_rcnn_r2_50_dcnv2_fpn_2x_coco")


def test_backbone_kaiming_fan_out_and_dcn_keeps_zero_offsets(dcn_mask_rcnn):
    backbone = dcn_mask_rcnn.backbone
    convs = [m for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and "conv_offset" not in name]
    checked = 0
    for conv in convs:
        if conv.weight.numel() >= 20000:
            assert_std(conv.weight, math.sqrt(2 / fans(conv.weight)[1]))
            checked += 1
    assert checked > 30
    dcns = [m for m in backbone.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert dcns and all(not d.conv_offset.weight.any() and not d.conv_offset.bias.any() for d in dcns)
    # mmcv's own DCN weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(fans(dcns[0].weight)[0])
    assert dcns[0].weight.abs().max() <= bound and dcns[0].weight.abs().max() > 0.9 * bound
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all()) and not b.bias.any() for b in bns)


def test_neck_and_heads_follow_mmdetection(dcn_mask_rcnn):
    m = dcn_mask_rcnn
    for conv in [*m.neck.lateral_convs, *m.neck.fpn_convs]:  # Xavier uniform
        fan_in, fan_out = fans(conv.weight)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.99 * bound
        assert_zero_bias(conv)
    head = m.rpn_head
    for conv in (head.rpn_conv, head.rpn_cls, head.rpn_reg):
        assert_std(conv.weight, 0.01)
        assert_zero_bias(conv)
    box = m.roi_head.bbox_head
    for fc in box.shared_fcs:
        fan_in, fan_out = fans(fc.weight)
        assert_std(fc.weight, math.sqrt(2 / (fan_in + fan_out)))
        assert_zero_bias(fc)
    assert_std(box.fc_cls.weight, 0.01)
    assert_zero_bias(box.fc_cls)
    assert_std(box.fc_reg.weight, 0.001)
    assert_zero_bias(box.fc_reg)
    mask = m.roi_head.mask_head
    for conv in [*mask.convs, mask.upsample, mask.conv_logits]:  # Kaiming normal, fan-out
        assert_std(conv.weight, math.sqrt(2 / fans(conv.weight)[1]))
        assert_zero_bias(conv)


def test_htc_heads_are_kaiming():
    torch.manual_seed(0)
    model = res2det.create_model("htc_r2_101_fpn_20e_coco")
    semantic = model.roi_head.semantic_head
    for conv in [*semantic.lateral_convs, *semantic.convs, semantic.conv_embedding, semantic.conv_logits]:
        assert_std(conv.weight, math.sqrt(2 / fans(conv.weight)[1]))
        assert_zero_bias(conv)
    conv_res = model.roi_head.mask_head[1].conv_res
    assert_std(conv_res.weight, math.sqrt(2 / fans(conv_res.weight)[1]))
