"""Cascade R-CNN, Cascade Mask R-CNN and HTC: fast checks on scaled-down models (training step, inference,
the mmdet key map) and, marked slow, the R2-101 rows against the mmdetection 3.3.0 fixtures."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import res2det
from res2det.errors import CheckpointError
from res2det.models.losses import total_loss
from res2det.models.backbones import BackboneConfig
from res2det.models.detectors import (CASCADE_ROI_HEAD, CASCADE_RPN, CASCADE_STAGES, DetectorConfig, FPNConfig,
                                     HTCConfig, build_detector)
from res2det.models.heads.cascade_roi_head import CascadeRoIHead
from res2det.models.heads import ProposalConfig, RandomSampler
from res2det.zoo import get_spec
from res2det.zoo.mmdetection_cascade import mmdet_cascade_to_res2det

from conftest import REFERENCE
from test_det_parity import run_parity

NAMES = ("cascade_rcnn_r2_101_fpn_20e_coco", "cascade_mask_rcnn_r2_101_fpn_20e_coco", "htc_r2_101_fpn_20e_coco")
_RPN = CASCADE_RPN
_SMALL_STAGES = tuple(dataclasses.replace(s, train=dataclasses.replace(
    s.train, sampler=RandomSampler(num=64, pos_fraction=0.25))) for s in CASCADE_STAGES)


def tiny_config(with_mask=True, htc=False, with_semantic=False):
    return DetectorConfig(
        backbone=BackboneConfig(depth=50, base_width=8, stem="deep", shortcut="avg", stage_block="mmdet",
                                frozen_stages=1, norm_eval=True),
        neck=FPNConfig(out_channels=32),
        rpn=dataclasses.replace(_RPN, feat_channels=32, test_proposals=ProposalConfig(nms_pre=300, max_per_img=100),
                                rpn_train=dataclasses.replace(_RPN.rpn_train, proposals=ProposalConfig(
                                    nms_pre=300, max_per_img=200))),  # fewer rois: fast tests
        roi_head=dataclasses.replace(
            CASCADE_ROI_HEAD, num_classes=5, fc_channels=64, with_mask=with_mask, mask_channels=16,
            stages=_SMALL_STAGES, htc=HTCConfig(with_semantic=with_semantic, semantic_num_classes=7) if htc else None),
    )


def _targets(semantic=False):
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 20:60, 30:90] = True
    masks[1, 50:90, 5:45] = True
    t = [
        {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0], [5.0, 50.0, 45.0, 90.0]]), "labels": torch.tensor([3, 1]),
         "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "masks": torch.zeros(0, 96, 128, dtype=torch.bool)},  # an image without objects
    ]
    if semantic:
        sem = torch.full((96, 128), 255, dtype=torch.long)
        sem[:48] = 2
        sem[48:, :64] = 6
        t[0]["semantic"] = sem
        t[1]["semantic"] = torch.zeros(90, 120, dtype=torch.long)  # smaller than the input: padded with 255
    return t


@pytest.mark.parametrize("kind", ["cascade", "cascade_mask", "htc", "htc_semantic"])
def test_training_step_losses_backpropagate(kind):
    torch.manual_seed(0)
    cfg = tiny_config(with_mask=kind != "cascade", htc=kind.startswith("htc"), with_semantic=kind == "htc_semantic")
    model = build_detector(cfg).train()
    assert isinstance(model.roi_head, CascadeRoIHead)
    losses = model(torch.randn(2, 3, 96, 128), _targets(semantic=kind == "htc_semantic"))
    expected = {"loss_rpn_cls", "loss_rpn_bbox"} | {f"s{s}.{k}" for s in range(3)
                                                    for k in ("loss_cls", "acc", "loss_bbox")}
    if kind != "cascade":
        expected |= {f"s{s}.loss_mask" for s in range(3)}
    if kind == "htc_semantic":
        expected.add("loss_semantic_seg")
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    assert losses["s0.loss_bbox"] > 0
    total_loss(losses).backward()
    rh = model.roi_head
    params = [model.backbone.layer2[0].conv1.weight, model.rpn_head.rpn_cls.weight] + \
        [rh.bbox_head[s].fc_reg.weight for s in range(3)] + [rh.bbox_head[s].fc_cls.weight for s in range(3)]
    if kind != "cascade":
        params += [rh.mask_head[s].conv_logits.weight for s in range(3)]
    if kind.startswith("htc"):
        params += [rh.mask_head[1].conv_res.weight, rh.mask_head[2].conv_res.weight]
    if kind == "htc_semantic":
        params += [rh.semantic_head.conv_logits.weight, rh.semantic_head.conv_embedding.weight]
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_stage_loss_weights_and_smooth_l1():
    model = build_detector(tiny_config(with_mask=False))
    assert model.roi_head.stage_loss_weights == (1.0, 0.5, 0.25)
    assert [h.bbox_coder.stds for h in model.roi_head.bbox_head] == [
        (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]
    assert all(h.reg_class_agnostic and h.fc_reg.out_features == 4 for h in model.roi_head.bbox_head)
    assert [c.assigner.pos_iou_thr for c in model.roi_head.train_cfgs] == [0.5, 0.6, 0.7]
    assert model.rpn_head.train_cfg.smooth_l1_beta == pytest.approx(1 / 9)
    from res2det.models.heads.bbox_head import l1_loss
    d = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(l1_loss(d, 1.0), torch.tensor([1.5, 0.125, 0.0, 0.125, 1.5]))
    torch.testing.assert_close(l1_loss(d), d.abs())


def test_htc_semantic_needs_label_maps():
    model = build_detector(tiny_config(htc=True, with_semantic=True)).train()
    with pytest.raises(ValueError, match="semantic"):
        model(torch.randn(2, 3, 96, 128), _targets(semantic=False))


@pytest.mark.parametrize("kind", ["cascade", "cascade_mask", "htc_semantic"])
def test_inference_outputs(kind):
    torch.manual_seed(0)
    htc = kind.startswith("htc")
    model = build_detector(tiny_config(with_mask=kind != "cascade", htc=htc, with_semantic=htc)).eval()
    model.roi_head.test_cfg = dataclasses.replace(model.roi_head.test_cfg, score_thr=0.0)
    with torch.no_grad():
        results = model(torch.randn(2, 3, 96, 128), [(90, 128), (96, 100)])
        dets, inter = model.forward_with_intermediates(torch.randn(1, 3, 96, 128), [(90, 120)])
        raw = model.detect(torch.randn(1, 3, 96, 128), [(96, 128)], paste_masks=False)
    for r, (h, w) in zip(results, [(90, 128), (96, 100)]):
        k = r["boxes"].shape[0]
        assert 0 < k <= 100 and r["scores"].shape == (k,) and r["labels"].dtype == torch.int64
        assert (r["boxes"][:, 0::2] <= w).all() and (r["boxes"][:, 1::2] <= h).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        assert ("masks" in r) == (kind != "cascade")
        if kind != "cascade":
            assert r["masks"].shape == (k, h, w) and r["masks"].dtype == torch.bool
    for s in range(3):
        assert f"roi_head.bbox_roi_extractor.{s}.call0.rois" in inter
        assert inter[f"roi_head.bbox_head.{s}.call0.bbox_pred"].shape[1] == 4
        assert inter[f"roi_head.bbox_head.{s}.call0.cls_score"].shape[1] == 6
        if kind != "cascade":
            assert inter[f"det.mask_logits.{s}"].shape == (len(dets[0]["boxes"]), 28, 28)
    if htc:
        assert inter["roi_head.semantic_head.call0.seg_pred"].shape == (1, 7, 12, 16)
        assert {f"roi_head.semantic_roi_extractor.call{j}.rois" for j in range(4)} <= set(inter)
        assert inter["roi_head.mask_head.2.call0.mask_feat"].shape[1:] == (16, 14, 14)
    if kind != "cascade":
        probs = raw[0]["mask_probs"]
        assert probs.shape == (len(raw[0]["boxes"]), 28, 28) and 0 <= probs.min() and probs.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_zoo_rows_and_key_map_cover_the_layout(name):
    spec = get_spec(name)
    assert spec.weights[0].url.endswith(name + "/" + spec.weights[0].filename)
    assert spec.weights[0].url.startswith("https://download.openmmlab.com/mmdetection/v2.0/res2net/")
    layout = REFERENCE / "layouts" / f"{name}.json"
    if not layout.is_file():
        pytest.skip(f"{layout} not found")
    shapes = json.loads(layout.read_text())
    model = res2det.create_model(name)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = mmdet_cascade_to_res2det({k: torch.empty(0) for k in shapes})
    assert len(mapped) == len(shapes)
    renamed = dict(zip(mapped, shapes.values()))
    assert set(renamed) == set(mine)
    assert all(tuple(renamed[k]) == mine[k] for k in mine)


def test_key_map_rejects_unknown_keys():
    good = {"backbone.stem.0.weight": torch.zeros(1), "roi_head.bbox_head.2.fc_reg.weight": torch.zeros(1),
            "roi_head.mask_head.1.conv_res.conv.weight": torch.zeros(1),
            "roi_head.semantic_head.conv_embedding.conv.bias": torch.zeros(1)}
    out = mmdet_cascade_to_res2det(good)
    assert set(out) == {"backbone.conv1.0.weight", "roi_head.bbox_head.2.fc_reg.weight",
                        "roi_head.mask_head.1.conv_res.weight", "roi_head.semantic_head.conv_embedding.bias"}
    for bad in ("roi_head.bbox_head.fc_reg.weight", "roi_head.mask_head.0.conv_res.weight",
                "roi_head.semantic_head.something.weight", "roi_head.bbox_head.0.extra.weight"):
        with pytest.raises(CheckpointError, match="no res2det counterpart"):
            mmdet_cascade_to_res2det({**good, bad: torch.zeros(1)})


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_mmdet_parity(name, seeded_checkpoint, check_parity):
    result = run_parity(name, seeded_checkpoint(name), check_parity)
    assert ("masks" in result) == (name != NAMES[0])


def test_predict_user_api():
    """``predict`` (images in, ``Detections`` in each image's own pixels out) works for cascade models."""
    import numpy as np

    from res2det.structures import Preprocess

    torch.manual_seed(0)
    model = build_detector(tiny_config(with_mask=True, htc=True, with_semantic=True))
    model.roi_head.test_cfg = dataclasses.replace(model.roi_head.test_cfg, score_thr=0.0)
    model.preprocess = Preprocess(input_size=(64, 96), crop_pct=None)  # keep the resized input small
    rgb = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    (det,) = model.predict(rgb)
    assert model.training  # the mode is restored
    assert len(det.boxes) > 0 and det.masks is not None and det.masks.shape[1:] == (50, 70)
    assert (det.boxes[:, 0::2] <= 70).all() and (det.boxes[:, 1::2] <= 50).all()
