"""Two-stage detectors, fast checks: anchors, box coding, targets, NMS, mask pasting, the mmdet key map, and a
training step of a scaled-down Mask R-CNN."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import res2det
from res2det.errors import CheckpointError
from res2det.models.backbones import BackboneConfig
from res2det.models.detectors import DetectorConfig, FPNConfig, RoIHeadConfig, RPNConfig, StageConfig, build_detector
from res2det.models.heads import (AnchorGenerator, DeltaXYWHBBoxCoder, MaxIoUAssigner, RandomSampler,
                                  multiclass_nms, paste_masks)
from res2det.models.heads.roi_head import RCNNTrainConfig
from res2det.models.losses import total_loss
from res2det.zoo.mmdetection import COCO_CLASSES, mmdet_to_res2det

from conftest import REFERENCE

NAMES = ("faster_rcnn_r2_101_fpn_2x_coco", "mask_rcnn_r2_101_fpn_2x_coco")


# ----------------------------------------------------------------------------------------------- anchors, coder
def test_anchor_layout_follows_mmdet():
    gen = AnchorGenerator(strides=(4, 8), ratios=(0.5, 1.0, 2.0), scales=(8.0,))
    base = gen.base_anchors[0]
    # ratio = h / w; side stride * scale; centred on the grid point (offset 0), not rounded
    for r, (x1, y1, x2, y2) in zip((0.5, 1.0, 2.0), base.tolist()):
        w, h = 32 / math.sqrt(r), 32 * math.sqrt(r)
        assert (x1, y1, x2, y2) == pytest.approx((-w / 2, -h / 2, w / 2, h / 2), abs=1e-4)
    a4, a8 = gen.grid_anchors([(2, 3), (1, 2)])
    assert a4.shape == (2 * 3 * 3, 4) and a8.shape == (1 * 2 * 3, 4)
    # location-major (row-major grid), the 3 ratios within a location
    torch.testing.assert_close(a4[:3], base)
    torch.testing.assert_close(a4[3:6], base + torch.tensor([4.0, 0, 4.0, 0]))
    torch.testing.assert_close(a4[9:12], base + torch.tensor([0, 4.0, 0, 4.0]))
    flags = gen.valid_flags([(2, 3), (1, 2)], pad_shape=(8, 8))
    assert flags[0].view(2, 3, 3)[:, 2].any().item() is False and flags[0].view(2, 3, 3)[:, :2].all()
    assert flags[1].tolist() == [True] * 3 + [False] * 3  # ceil(8 / 8) = 1 column of 2


def test_coder_round_trip_clamp_and_clip():
    torch.manual_seed(0)
    coder = DeltaXYWHBBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    xy = torch.rand(50, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(50, 2) * 50 + 1], 1)
    gxy = torch.rand(50, 2) * 100
    gts = torch.cat([gxy, gxy + torch.rand(50, 2) * 80 + 1], 1)
    deltas = coder.encode(boxes, gts)
    torch.testing.assert_close(coder.decode(boxes, deltas), gts, rtol=0, atol=1e-3)
    # class-specific rows: [N, 4k] decode k boxes per row
    two = coder.decode(boxes, torch.cat([deltas, torch.zeros_like(deltas)], 1))
    torch.testing.assert_close(two[:, 4:], boxes, rtol=0, atol=1e-4)
    # |dw| is capped at log(1000/16) and boxes are clipped to (h, w)
    box = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    big = DeltaXYWHBBoxCoder().decode(box, torch.tensor([[0.0, 0.0, 100.0, 0.0]]))
    assert big[0, 2] - big[0, 0] == pytest.approx(10 * 1000 / 16, rel=1e-5)
    clipped = DeltaXYWHBBoxCoder().decode(box, torch.tensor([[0.0, 0.0, 3.0, 3.0]]), max_shape=(30, 25))
    assert clipped.tolist() == [[0.0, 0.0, 25.0, 30.0]]


# ------------------------------------------------------------------------------------------- targets, NMS, masks
def test_max_iou_assigner_low_quality_matches():
    anchors = torch.tensor([[0.0, 0, 12, 12], [0, 0, 20, 20], [50, 50, 60, 60], [100, 100, 110, 110]])
    gts = torch.tensor([[0.0, 0, 19, 19], [50, 50, 64, 64]])
    rpn = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
    res = rpn.assign(anchors, gts, torch.tensor([0, 0]))
    # anchor 0: IoU 0.4 (ignored); anchor 1: IoU 0.9 (positive); anchor 2: IoU 0.51 < 0.7 but the best for gt 2 (low-quality match)
    assert res.gt_inds.tolist() == [-1, 1, 2, 0]
    strict = dataclasses.replace(rpn, match_low_quality=False).assign(anchors, gts, torch.tensor([3, 4]))
    assert strict.gt_inds.tolist() == [-1, 1, -1, 0] and strict.labels.tolist() == [-1, 3, -1, -1]
    none = rpn.assign(anchors, gts[:0], torch.zeros(0, dtype=torch.long))
    assert none.gt_inds.tolist() == [0, 0, 0, 0]


def test_random_sampler_caps_positives():
    torch.manual_seed(0)
    assigner = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)
    boxes = torch.cat([torch.tensor([[0.0, 0, 10, 10]]).repeat(30, 1), torch.tensor([[50.0, 50, 60, 60]]).repeat(70, 1)])
    res = assigner.assign(boxes, torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([5]))
    pos, neg = RandomSampler(num=40, pos_fraction=0.25).sample(res)
    assert len(pos) == 10 and len(neg) == 30
    assert (res.gt_inds[pos] == 1).all() and (res.gt_inds[neg] == 0).all()


def test_multiclass_nms_is_class_aware():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]).repeat(1, 2)  # 2 classes
    scores = torch.tensor([[0.9, 0.8, 0.0], [0.85, 0.02, 0.0], [0.3, 0.6, 0.0]])  # background last
    b, s, labels, rows = multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5, max_num=100)
    # class 0: box 1 is suppressed by box 0; class 1 keeps box 0 (its own NMS); 0.02 is below threshold
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.3])
    assert labels.tolist() == [0, 1, 1, 0] and rows.tolist() == [0, 0, 2, 2]
    assert multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5, max_num=2)[1].numel() == 2


def test_paste_masks_fills_the_box():
    probs = torch.ones(2, 28, 28)
    probs[1] = 0.2
    masks = paste_masks(probs, torch.tensor([[10.0, 20.0, 30.0, 25.0], [0, 0, 5, 5]]), (40, 50))
    assert masks.shape == (2, 40, 50) and masks.dtype == torch.bool
    assert masks[0, 20:25, 10:30].all() and int(masks[0].sum()) == 5 * 20
    assert not masks[1].any()


# ----------------------------------------------------------------------------------------------------- zoo, keys
def _layout(name):
    path = REFERENCE / "layouts" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared must sit beside the repository)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def faster():
    return res2det.create_model(NAMES[0])


@pytest.mark.parametrize("name", NAMES)
def test_zoo_rows(name):
    spec = res2det.zoo.get_spec(name)
    assert spec.task == ("instance_segmentation" if name.startswith("mask") else "detection")
    assert spec.preprocess.input_size == (800, 1333) and spec.preprocess.crop_pct is None
    (pw,) = spec.weights
    assert pw.source == "mmdet" and pw.url.endswith(f"/res2net/{name}/{pw.filename}")
    assert pw.metrics["box_ap"] in (43.0, 43.6)
    assert spec.config.roi_head.with_mask == name.startswith("mask")
    # as in mmdet's base configs: only Mask R-CNN lets gts claim low-quality R-CNN matches
    assert spec.config.roi_head.stages[0].train.assigner.match_low_quality == name.startswith("mask")
    assert name in res2det.list_models(spec.task)


@pytest.mark.parametrize("name", NAMES)
def test_mmdet_key_map_covers_the_layout(name, faster):
    layout = _layout(name)
    mapped = mmdet_to_res2det({k: torch.zeros(()) for k in layout})
    model = faster if name.startswith("faster") else build_detector(res2det.zoo.get_spec(name).config)
    assert set(mapped) == set(model.state_dict())
    assert mapped.keys() >= {"backbone.conv1.6.weight", "backbone.bn1.running_var", "neck.fpn_convs.3.bias"}
    assert res2det.zoo.get_spec(name).detect_format(layout) == "mmdet"


def _mmdet_checkpoint(name):
    # Expanded zero tensors: the real key set and shapes at a tiny file size.
    return {k: torch.zeros(1).expand(s) if s else torch.zeros((), dtype=torch.long) for k, s in _layout(name).items()}


def test_mmdet_checkpoint_loads(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": _mmdet_checkpoint(NAMES[0])}, path)  # mmdet's wrapper
    model = res2det.create_model(NAMES[0], weights=str(path))
    assert not model.training and float(model.backbone.bn1.weight.abs().sum()) == 0.0


@pytest.mark.slow
def test_mmdet_key_map_rejects_unknown_and_missing_keys(tmp_path):
    state = _mmdet_checkpoint(NAMES[0])
    path = tmp_path / "extra.pth"
    torch.save(state | {"roi_head.bbox_head.fc_extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"roi_head\.bbox_head\.fc_extra\.weight"):
        res2det.create_model(NAMES[0], weights=str(path))
    del state["neck.fpn_convs.2.conv.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): neck\.fpn_convs\.2\.weight"):
        res2det.create_model(NAMES[0], weights=str(path))
    # a Mask R-CNN checkpoint has mask-head keys that a Faster R-CNN cannot take
    path = tmp_path / "mask.pth"
    torch.save(_mmdet_checkpoint(NAMES[1]), path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(12\): roi_head\.mask_head"):
        res2det.create_model(NAMES[0], weights=str(path))


def test_config_overrides():
    from res2det.models.detectors import RCNNTestConfig

    model = res2det.create_model(NAMES[1], frozen_stages=2, rcnn_test=RCNNTestConfig(score_thr=0.3))
    assert model.roi_head.test_cfg.score_thr == 0.3 and model.backbone.frozen_stages == 2
    assert model.config.roi_head.with_mask and model.roi_head.with_mask


def test_detector_attributes(faster):
    assert faster.class_names == COCO_CLASSES and len(COCO_CLASSES) == 80
    assert faster.roi_head.mask_head is None
    assert faster.backbone.out_channels == [256, 512, 1024, 2048]
    assert faster.roi_head.bbox_head.fc_cls.out_features == 81 and faster.roi_head.bbox_head.fc_reg.out_features == 320


# ------------------------------------------------------------------------------------------ small end-to-end model
def tiny_config(with_mask=True):
    """The Mask R-CNN structure at a fraction of the width, for fast CPU tests."""
    return DetectorConfig(
        backbone=BackboneConfig(depth=50, base_width=8, stem="deep", shortcut="avg", stage_block="mmdet",
                                frozen_stages=1, norm_eval=True),
        neck=FPNConfig(out_channels=32),
        rpn=RPNConfig(feat_channels=32),
        roi_head=RoIHeadConfig(num_classes=5, fc_channels=64, with_mask=with_mask, mask_channels=16,
                               stages=(StageConfig(train=RCNNTrainConfig(sampler=RandomSampler(num=64, pos_fraction=0.25))),)),
    )


def _targets():
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[0, 20:60, 30:90] = True
    masks[1, 50:90, 5:45] = True
    return [
        {"boxes": torch.tensor([[30.0, 20.0, 90.0, 60.0], [5.0, 50.0, 45.0, 90.0]]), "labels": torch.tensor([3, 1]),
         "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "masks": torch.zeros(0, 96, 128, dtype=torch.bool)},  # an image without objects
    ]


def test_training_step_losses_backpropagate():
    torch.manual_seed(0)
    model = build_detector(tiny_config()).train()
    losses = model(torch.randn(2, 3, 96, 128), _targets())  # torchvision-style positional targets
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "acc", "loss_bbox", "loss_mask"}
    assert 0 <= losses["acc"] <= 100 and not losses["acc"].requires_grad  # reported, not back-propagated
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values()), losses
    assert losses["loss_bbox"] > 0 and losses["loss_mask"] > 0
    total_loss(losses).backward()
    bb = model.backbone
    assert bb.conv1[0].weight.grad is None and bb.layer1[0].conv1.weight.grad is None  # frozen_stages=1
    for p in (bb.layer2[0].conv1.weight, bb.layer4[-1].conv3.weight, model.neck.fpn_convs[0].weight,
              model.rpn_head.rpn_cls.weight, model.roi_head.bbox_head.fc_reg.weight,
              model.roi_head.mask_head.conv_logits.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # norm_eval: BN statistics stay fixed in train mode
    assert not bb.layer3[0].bn1.training


def test_train_mode_needs_targets():
    model = build_detector(tiny_config(with_mask=False)).train()
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("with_mask", [False, True])
def test_inference_outputs(with_mask):
    torch.manual_seed(0)
    model = build_detector(tiny_config(with_mask)).eval()
    with torch.no_grad():
        # A low score threshold so that the random model returns detections.
        model.roi_head.test_cfg = dataclasses.replace(model.roi_head.test_cfg, score_thr=0.0)
        results = model(torch.randn(2, 3, 96, 128), [(90, 128), (96, 100)])
        dets, inter = model.forward_with_intermediates(torch.randn(1, 3, 96, 128), [(90, 120)])
    assert len(results) == 2
    for r, (h, w) in zip(results, [(90, 128), (96, 100)]):
        k = r["boxes"].shape[0]
        assert 0 < k <= 100 and r["scores"].shape == (k,) and r["labels"].dtype == torch.int64
        assert (r["boxes"][:, 0::2] <= w).all() and (r["boxes"][:, 1::2] <= h).all() and (r["boxes"] >= 0).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        assert ("masks" in r) == with_mask
        if with_mask:
            assert r["masks"].shape == (k, h, w) and r["masks"].dtype == torch.bool
    expected = {"input", "rpn_proposals.bboxes", "rpn_proposals.scores", "roi_head.bbox_roi_extractor.call0.rois",
                "roi_head.bbox_head.call0.cls_score", "roi_head.bbox_head.call0.bbox_pred", "det.bboxes",
                "det.scores", "det.labels"}
    expected |= {f"backbone.{i}" for i in range(4)} | {f"neck.{i}" for i in range(5)}
    expected |= {f"rpn_head.{k}.{i}" for k in ("cls_scores", "bbox_preds") for i in range(5)}
    if with_mask:
        expected |= {"roi_head.mask_roi_extractor.call0.rois", "roi_head.mask_head.call0.mask_pred",
                     "det.mask_logits.0", "det.masks"}
    assert set(inter) == expected
    assert torch.equal(inter["det.bboxes"], dets[0]["boxes"])
    assert inter["roi_head.bbox_head.call0.cls_score"].shape[1] == 6


def test_rpn_loss_with_allowed_border_uses_each_images_own_logits():
    """A padded batch of two images of different sizes with ``allowed_border=0`` (the cascade RPNs): each image's
    anchors are checked against its own unpadded size and trained with its own logits, so the batch order does
    not change the loss (the border value once overwrote the batch index: image 2 took image 1's logits)."""
    from res2det.models.heads.rpn_head import RPNHead, RPNTrainConfig

    torch.manual_seed(0)
    every = RandomSampler(num=10**8, pos_fraction=0.5, add_gt_as_proposals=False)  # no random draw
    head = RPNHead(in_channels=8, feat_channels=8, train_cfg=RPNTrainConfig(allowed_border=0, sampler=every))
    feats = [torch.randn(2, 8, 128 // s, 160 // s) for s in (4, 8, 16, 32, 64)]
    gts = [torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 110.0, 90.0]]),
           torch.tensor([[30.0, 40.0, 120.0, 100.0]])]
    sizes = [(100, 150), (128, 124)]
    with torch.no_grad():
        cls, reg = head(feats)
        swapped = head([f.flip(0) for f in feats])
        forward = head.loss(cls, reg, gts, sizes)
        backward = head.loss(*swapped, gts[::-1], sizes[::-1])
    for k in forward:
        assert torch.allclose(forward[k], backward[k], rtol=1e-6, atol=1e-9), (k, forward[k], backward[k])
