"""Inference optimisations keep outputs within 1e-4 of the eager model."""
from __future__ import annotations

import pytest
import torch

import res2det
from res2det.models.backbones import BackboneConfig, build_backbone
from res2det.optimize import fuse_backbone, optimize_for_inference


def _with_bn_statistics(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


FLAGS = [dict(jit=False), dict(jit=True), dict(jit=True, onednn=True), dict(jit=True, channels_last=True)]
CASES = [("res2net50_26w_4s", f) for f in FLAGS] + [("res2net50_v1b_26w_4s", FLAGS[1]), ("res2next50", FLAGS[1]), ("resnet50", FLAGS[1])]


@pytest.mark.parametrize("name,flags", CASES)
def test_optimised_classifier_matches_eager(name, flags):
    torch.manual_seed(0)
    model = _with_bn_statistics(res2det.create_model(name))
    x = torch.randn(2, 3, 96, 64)
    opt = optimize_for_inference(model, x, **flags)
    with torch.no_grad():
        ref = model(x)
        assert (opt(x) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("style", ["official", "mmdet", "paddle"])
def test_fused_backbone_features_match_for_every_stage_block_style(style):
    model = _with_bn_statistics(build_backbone(BackboneConfig(stem="deep", shortcut="avg", stage_block=style)))
    fused = fuse_backbone(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert (a - b).abs().max().item() <= 1e-4


def test_dcn_blocks_are_left_unfused_but_still_correct():
    model = _with_bn_statistics(build_backbone(BackboneConfig(dcn_stages=(False, False, True, True))))
    fused = fuse_backbone(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert (a - b).abs().max().item() <= 1e-4
