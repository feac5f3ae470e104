"""Backbone options: the three published stage-block behaviours, DCNv2, freezing, checkpointing, outputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import res2det
from res2det.models.backbones import BackboneConfig, Bottle2neck, build_backbone


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _reference_block(block, x, *, accumulate, pool):
    """Res2Net block written out step by step; ``pool`` is None or (stride, count_include_pad)."""
    bn = lambda m, t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    out = F.relu(bn(block.bn1, F.conv2d(x, block.conv1.weight)))
    w = block.width
    xs = [out[:, i * w:(i + 1) * w] for i in range(block.scale)]
    ys, prev = [], None
    for i in range(block.scale - 1):
        inp = xs[i] if (i == 0 or not accumulate) else prev + xs[i]
        conv = block.convs[i]
        prev = F.relu(bn(block.bns[i], F.conv2d(inp, conv.weight, stride=conv.stride, padding=1, groups=conv.groups)))
        ys.append(prev)
    last = xs[-1]
    if pool is not None:
        last = F.avg_pool2d(last, 3, pool[0], 1, count_include_pad=pool[1])
    ys.append(last)
    y = bn(block.bn3, F.conv2d(torch.cat(ys, 1), block.conv3.weight))
    identity = block.downsample(x) if block.downsample is not None else x
    return F.relu(y + identity)


# (style, stage_first, stride) -> (accumulate, pool)
EXPECTED = {
    ("official", True, 1): (False, (1, True)),
    ("official", True, 2): (False, (2, True)),
    ("official", False, 1): (True, None),
    ("mmdet", True, 1): (False, None),
    ("mmdet", True, 2): (False, (2, True)),
    ("mmdet", False, 1): (True, None),
    ("paddle", True, 1): (True, None),
    ("paddle", True, 2): (False, (2, False)),
    ("paddle", False, 1): (True, None),
}


@pytest.mark.parametrize("style,stage_first,stride", list(EXPECTED))
def test_stage_block_behaviours(style, stage_first, stride):
    torch.manual_seed(0)
    inplanes = 64 if stage_first else 256
    downsample = None
    if stage_first:
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, 256, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(256))
    block = Bottle2neck(inplanes, 64, stride=stride, downsample=downsample, stage_first=stage_first, stage_block=style).eval()
    _randomise_bn(block)
    # odd size so that padding-excluded and padding-included pools differ at the borders
    x = torch.randn(2, inplanes, 15, 13)
    accumulate, pool = EXPECTED[(style, stage_first, stride)]
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference_block(block, x, accumulate=accumulate, pool=pool), rtol=1e-5, atol=1e-5)


def test_styles_differ_only_where_documented():
    """With shared weights, official and mmdet differ in layer1 (stride-1 pool) but paddle differs too."""
    cfgs = {s: BackboneConfig(stem="deep", shortcut="avg", stage_block=s) for s in ("official", "mmdet", "paddle")}
    models = {s: build_backbone(c).eval() for s, c in cfgs.items()}
    state = models["official"].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = {s: m(x) for s, m in models.items()}
    assert not torch.allclose(outs["official"][0], outs["mmdet"][0])
    assert not torch.allclose(outs["mmdet"][0], outs["paddle"][0])


def test_unknown_stage_block_is_a_clear_error():
    with pytest.raises(res2det.Res2DetError, match="stage_block"):
        res2det.create_model("res2net50_26w_4s", stage_block="detectron")


def test_out_indices_channels_strides_and_shapes():
    model = build_backbone(BackboneConfig(out_indices=(1, 2, 3))).eval()
    assert model.out_channels == [512, 1024, 2048] and model.out_strides == [8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 12, 16), (1, 1024, 6, 8), (1, 2048, 3, 4)]


def test_paddle_vd_keeps_conv_shortcut_with_deep_stem():
    sd = build_backbone(BackboneConfig(stem="deep", shortcut="conv", stage_block="paddle")).state_dict()
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (512, 256, 1, 1)
    assert "conv1.6.weight" in sd and "layer2.0.downsample.2.weight" not in sd


def test_frozen_stages_and_norm_eval():
    model = build_backbone(BackboneConfig(frozen_stages=1, norm_eval=True)).train()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "bn1", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("layer2", "layer3", "layer4")))
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = model.layer3[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, model.layer3[0].bn1.running_mean)


def test_norm_eval_off_updates_statistics():
    model = build_backbone(BackboneConfig()).train()
    before = model.layer3[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, model.layer3[0].bn1.running_mean)


def test_gradient_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    plain = build_backbone(BackboneConfig(norm_eval=True)).train()
    cp = copy.deepcopy(plain)
    cp.with_cp = True
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for model in (plain, cp):
        model.zero_grad()
        sum(f.square().mean() for f in model(x)).backward()
        grads.append(model.layer2[0].convs[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_dcn_stages_with_zero_offsets_match_plain_convs():
    """Fresh DCNv2 has zero offsets and mask sigmoid(0) = 0.5, so doubled weights reproduce the plain model."""
    torch.manual_seed(0)
    plain = build_backbone(BackboneConfig()).eval()
    _randomise_bn(plain)
    dcn = build_backbone(BackboneConfig(dcn_stages=(False, True, True, True))).eval()
    state = plain.state_dict()
    dcn_state = dcn.state_dict()
    assert "layer2.0.convs.0.conv_offset.weight" in dcn_state and "layer1.0.convs.0.conv_offset.weight" not in dcn_state
    assert tuple(dcn_state["layer2.0.convs.0.conv_offset.weight"].shape) == (27, 52, 3, 3)
    for k, v in state.items():
        doubled = ".convs." in k and not k.startswith("layer1.")
        dcn_state[k] = v * 2 if doubled else v
    dcn.load_state_dict(dcn_state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), dcn(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resnet_baseline_matches_torchvision_layout():
    sd = res2det.create_model("resnet50").state_dict()
    assert tuple(sd["layer1.0.conv2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)
