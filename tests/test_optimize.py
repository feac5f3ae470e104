"""Inference optimisations keep outputs within 1e-4 of the eager model, whatever kernels are selected."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import res2det
from res2det.models.backbones import BackboneConfig, build_backbone
from res2det.models.backbones.fuse import FusedConv2d, fuse_backbone
from res2det.optimize import optimize_for_inference, select_kernels


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Kernel plans go to a fresh cache folder, so every test measures (or reads only what it wrote)."""
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path))


def _with_bn_statistics(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "res2net50_v1b_26w_4s", "res2next50", "resnet50"])
@pytest.mark.slow
def test_optimised_classifier_matches_eager(name):
    torch.manual_seed(0)
    model = _with_bn_statistics(res2det.create_model(name))
    x = torch.randn(2, 3, 64, 96)
    opt = optimize_for_inference(model, x)
    assert len(opt.stage_layouts) == 4
    with torch.no_grad():
        ref = model(x)
        # float rounding grows with the logits (up to 103 here): eager float32 itself is up to 0.8e-6 of the
        # largest logit (7.8e-5) from float64 on these models, the optimised kernels (picked by timing) were up
        # to 1.1e-6 of it (1.1e-4) from eager; 3e-6 leaves a margin
        assert (opt(x) - ref).abs().max().item() <= 3e-6 * ref.abs().max().item()
        # another shape still gives the right answer
        y = torch.randn(1, 3, 96, 64)
        ref = model(y)
        assert (opt(y) - ref).abs().max().item() <= 3e-6 * ref.abs().max().item()


@pytest.mark.parametrize("style", ["official", "mmdet", "paddle"])
def test_inference_form_matches_for_every_stage_block_style(style):
    model = _with_bn_statistics(build_backbone(BackboneConfig(stem="deep", shortcut="avg", stage_block=style)))
    fused = fuse_backbone(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):  # folding BN reorders float sums: 1e-5 of the largest value
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("stride", [1, 2])  # stride 1 adds the Winograd kernel
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_every_kernel_gives_the_same_conv(layout, stride):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(26, 52, 3, stride=stride, padding=1)
    bn = _with_bn_statistics(torch.nn.BatchNorm2d(52))
    x = torch.randn(2, 26, 15, 17).contiguous(memory_format=layout)
    ref = torch.relu(bn(conv(x)))
    fused = FusedConv2d(conv, bn, relu=True)
    assert ("winograd" in fused.candidates()) == (stride == 1)
    for kernel in fused.candidates():
        for conv_layout in (None, torch.channels_last, torch.contiguous_format):
            fused.bind(kernel, conv_layout, x.shape)
            with torch.no_grad():
                y = fused(x)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            assert y.is_contiguous(memory_format=layout)  # neighbours never see a layout change


def test_select_kernels_reports_a_choice_per_conv():
    model = fuse_backbone(_with_bn_statistics(res2det.create_model("res2net50_26w_4s")))
    choices = select_kernels(model, torch.randn(1, 3, 64, 64), budget_s=0.0)
    assert len(choices) == sum(isinstance(m, FusedConv2d) for m in model.modules())
    assert all(c.split("/")[0] in ("aten", "onednn", "prepacked", "gemm", "winograd") for c in choices.values())


def test_dcn_blocks_are_left_unfused_but_still_correct():
    model = _with_bn_statistics(build_backbone(BackboneConfig(dcn_stages=(False, False, True, True))))
    fused = fuse_backbone(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):  # folding BN reorders float sums: 1e-5 of the largest value
            assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


@pytest.fixture()
def fake_clock(monkeypatch):
    """Every later-measured candidate is 'faster', so selection binds non-default kernels deterministically;
    ``calls`` counts measurements."""
    import itertools

    from res2det import optimize

    ticks, calls = itertools.count(1), []

    def best_time(fn, budget_s):
        calls.append(1)
        return 1.0 / next(ticks)

    monkeypatch.setattr(optimize, "_best_time", best_time)
    return calls


def test_optimised_detector_gives_the_same_detections(fake_clock):
    """Kernel choice is pinned by the fake clock, however busy the machine is."""
    from res2det.models.detectors import build_detector
    from test_det_units import tiny_config

    torch.manual_seed(0)
    model = build_detector(tiny_config(with_mask=True)).eval()
    _with_bn_statistics(model)
    x = torch.randn(1, 3, 96, 128)
    opt = optimize_for_inference(model, x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in opt.modules())
    kernels = {m.kernel for m in opt.modules() if hasattr(m, "kernel")}
    assert kernels - {"aten"}, kernels  # the selection did bind other kernels
    with torch.no_grad():
        (a,), (b,) = model(x), opt(x)
    assert torch.equal(a["labels"], b["labels"])
    assert (a["boxes"] - b["boxes"]).abs().max().item() <= 2e-3  # px, on ~60 px boxes: kernels reorder sums
    assert (a["scores"] - b["scores"]).abs().max().item() <= 1e-4
    # pixels at the 0.5 threshold may flip with the rounding of the boxes and probabilities
    differ = (a["masks"] ^ b["masks"]).flatten(1).sum(1)
    union = (a["masks"] | b["masks"]).flatten(1).sum(1)
    assert (differ <= (0.02 * union).clamp(min=4)).all(), differ.max()


# ------------------------------------------------------------------------------------- cached kernel plans
def _bindings(model) -> dict:
    return {n: (m.kernel, m.layout) for n, m in model.named_modules() if isinstance(m, FusedConv2d)}


def test_kernel_plan_is_measured_once_per_machine_and_shape(tmp_path, fake_clock):
    from res2det.optimize import plan_file

    torch.manual_seed(0)
    model = _with_bn_statistics(res2det.create_model("res2net50_26w_4s"))
    x = torch.randn(1, 3, 64, 96)
    first = optimize_for_inference(model, x)
    assert fake_clock and not first.kernel_plan["cached"]
    path = plan_file(first, x)
    assert first.kernel_plan["file"] == str(path) and path.is_file() and path.parent == tmp_path / "kernel_plans"
    assert set(_bindings(first).values()) - {("aten", None)}  # the fake clock made it pick other kernels

    fake_clock.clear()
    again = optimize_for_inference(model, x)
    assert not fake_clock, "a cached plan must not be measured again"
    assert again.kernel_plan["cached"] and again.kernel_plan["file"] == str(path)
    assert _bindings(again) == _bindings(first) and again.stage_layouts == first.stage_layouts
    with torch.no_grad():
        ref = model(x)
        assert (again(x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()  # kernels reorder float sums

    optimize_for_inference(model, torch.randn(1, 3, 96, 64))  # another input shape: measured, a second plan
    assert fake_clock and len(list(path.parent.iterdir())) == 2


@pytest.mark.parametrize("damage", ["not json", "wrong kernel", "wrong names"])
def test_a_damaged_or_stale_plan_is_measured_again(fake_clock, damage):
    import json

    model = _with_bn_statistics(res2det.create_model("res2net50_26w_4s"))
    x = torch.randn(1, 3, 64, 64)
    path = Path(optimize_for_inference(model, x).kernel_plan["file"])
    plan = json.loads(path.read_text())
    if damage == "not json":
        path.write_text('{"stage_layouts": [')
    elif damage == "wrong kernel":
        plan["convs"][next(iter(plan["convs"]))][0] = "no-such-kernel"
        path.write_text(json.dumps(plan))
    else:
        plan["convs"] = {f"x.{n}": v for n, v in plan["convs"].items()}
        path.write_text(json.dumps(plan))
    fake_clock.clear()
    opt = optimize_for_inference(model, x)
    assert fake_clock and not opt.kernel_plan["cached"]
    assert json.loads(path.read_text())["convs"] == json.loads(json.dumps(opt.kernel_plan["convs"]))  # rewritten
    with torch.no_grad():
        ref = model(x)
        assert (opt(x) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_split_of_a_channels_last_tensor_counts_as_channels_last():
    """Res2Net's splits of a channels-last activation must stay channels-last (a copy back to NCHW per split
    conv cost 20% of a detector's time)."""
    from res2det.models.backbones.fuse import _layout

    x = torch.randn(1, 104, 20, 30).contiguous(memory_format=torch.channels_last)
    assert _layout(x) == torch.channels_last and _layout(x[:, 26:52]) == torch.channels_last
    assert _layout(x.contiguous()) == torch.contiguous_format
    assert _layout(x.contiguous()[:, 26:52]) == torch.contiguous_format
    assert _layout(torch.randn(8, 256, 1, 1)) == torch.contiguous_format  # ambiguous: left as it is


# --------------------------------------------------------------------------------------------- bf16 form
def _conversions(run) -> int:
    """How many dtype conversions (``aten::_to_copy``) one call of ``run`` makes."""
    from torch.profiler import profile

    with profile() as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


@pytest.fixture()
def native_bf16(monkeypatch):
    """Claim native bf16 (oneDNN emulates it on a CPU without: slower, same arithmetic)."""
    import res2det.inference as inference

    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))


@pytest.mark.slow
def test_bf16_form_converts_weights_once_and_keeps_sensitive_steps_fp32(tiny_seeded, native_bf16):
    from conftest import PHOTO
    from res2det.ops import box_iou

    form = optimize_for_inference(tiny_seeded, str(PHOTO), precision="bf16")
    assert form.inference_precision == "bf16" and next(tiny_seeded.parameters()).dtype == torch.float32
    convs = [m for m in form.modules() if isinstance(m, (FusedConv2d, torch.nn.Conv2d, torch.nn.Linear))]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in form.backbone.modules())  # folded first
    (ref,) = tiny_seeded.predict(str(PHOTO))
    (got,) = form.predict(str(PHOTO))
    assert got.boxes.dtype == got.scores.dtype == torch.float32 and got.masks is not None
    keep = ref.scores >= 0.3
    assert int(keep.sum()) > 20
    hit = (box_iou(ref.boxes, got.boxes) >= 0.5) & (ref.labels[:, None] == got.labels[None])
    assert float(hit[keep].any(1).float().mean()) >= 0.85  # as bf16 autocast (tests/test_inference.py)
    # what autocast converts on every call (weights, activations around each layer) is gone
    fp32 = _conversions(lambda: tiny_seeded.predict(str(PHOTO)))
    autocast = _conversions(lambda: tiny_seeded.predict(str(PHOTO), precision="bf16"))
    form_calls = _conversions(lambda: form.predict(str(PHOTO)))
    assert autocast - fp32 > 50 and form_calls - fp32 < (autocast - fp32) / 3, (fp32, autocast, form_calls)
    with pytest.raises(res2det.errors.Res2DetError, match="converted to bf16"):
        form.predict(str(PHOTO), precision="fp32")


def test_bf16_form_falls_back_to_fp32_with_one_warning(tiny_seeded, monkeypatch):
    import res2det.inference as inference
    from conftest import PHOTO

    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(inference.PrecisionFallback, match="no native bf16"):
        form = optimize_for_inference(tiny_seeded, str(PHOTO), precision="bf16", select=False)
    assert getattr(form, "inference_precision", "fp32") == "fp32"
    assert all(p.dtype == torch.float32 for p in form.parameters())
    with pytest.raises(res2det.errors.Res2DetError, match="precision must be fp32 or bf16"):
        optimize_for_inference(tiny_seeded, str(PHOTO), precision="fp16")
