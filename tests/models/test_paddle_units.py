"""PaddleDetection support, fast checks: the restricted .pdparams reader, the strict key map, and Paddle's
test-time rules (anchors, proposals, box decoding, multiclass NMS order)."""
from __future__ import annotations

import math
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

import res2det
from res2det.checkpoint import read_weights
from res2det.errors import CheckpointError
from res2det.models.heads.paddle_conventions import (PaddleAnchorGenerator, PaddleRPNHead, paddle_delta2bbox,
                                         paddle_multiclass_nms)
from res2det.models.heads.rpn_head import ProposalConfig
from res2det.zoo.paddledetection import paddle_to_res2det
from res2det.pdparams import NAME_TABLE, read_pdparams

from conftest import REFERENCE

ROWS = [
    "faster_rcnn_res2net50_vb_26w_4s_fpn_1x_coco",
    "mask_rcnn_res2net50_vb_26w_4s_fpn_2x_coco",
    "mask_rcnn_res2net50_vd_26w_4s_fpn_2x_coco",
    "mask_rcnn_res2net50_vd_26w_4s_fpn_dcnv2_1x_coco",
]


# ------------------------------------------------------------------------------------------- .pdparams reader
class Arbitrary:
    """Any class: unpickling it would import this test module."""

    def __init__(self):
        self.x = 1


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _write(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def test_pdparams_round_trip_drops_name_table(tmp_path, seeded_weights):
    sd = OrderedDict(a=torch.arange(6, dtype=torch.float32).view(2, 3), b=torch.ones(4))
    path = tmp_path / "w.pdparams"
    seeded_weights.save_pdparams(sd, path)
    out = read_pdparams(path)
    assert list(out) == ["a", "b"]  # file order, name table dropped
    torch.testing.assert_close(out["a"], sd["a"], rtol=0, atol=0)
    state, meta = read_weights(path)  # the checkpoint reader dispatches on the suffix
    assert set(state) == {"a", "b"} and meta.get("format") == "paddle"


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pdparams_reads_plain_numpy_pickles(tmp_path, protocol):
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(3, dtype=np.int64),
              NAME_TABLE: {"w": "linear_0.w_0", "i": "x"}}
    out = read_pdparams(_write(tmp_path / "p.pdparams", arrays, protocol))
    assert out["w"].shape == (3, 4) and out["w"].dtype == torch.float32 and out["i"].dtype == torch.int64


@pytest.mark.parametrize("evil, refused", [(RunsACommand(), "system"), (Arbitrary(), "Arbitrary")])
def test_pdparams_refuses_other_globals(tmp_path, evil, refused):
    path = _write(tmp_path / "evil.pdparams", {"w": np.zeros(2, np.float32), "x": evil})
    with pytest.raises(CheckpointError) as e:
        read_pdparams(path)
    assert str(path) in str(e.value) and refused in str(e.value) and "refused" in str(e.value)
    with pytest.raises(CheckpointError):
        read_weights(path)


def test_pdparams_rejects_non_arrays_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="expected"):
        read_pdparams(_write(tmp_path / "list.pdparams", {"w": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="expected a dict"):
        read_pdparams(_write(tmp_path / "arr.pdparams", [np.zeros(2)]))
    bad = tmp_path / "trunc.pdparams"
    bad.write_bytes(pickle.dumps({"w": np.zeros(100, np.float32)}, protocol=4)[:50])
    with pytest.raises(CheckpointError, match="not a readable"):
        read_pdparams(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_pdparams(tmp_path / "missing.pdparams")


# ---------------------------------------------------------------------------------------------------- key map
@pytest.mark.parametrize("name", ROWS)
def test_key_map_covers_the_paddle_layout_exactly(name, seeded_weights):
    layout = seeded_weights.load_layout(REFERENCE / "layouts" / f"{name}.json")
    state = {k: torch.empty(s) for k, s in layout.items()}
    spec = res2det.zoo.get_spec(name)
    assert spec.detect_format(state) == "paddle"
    mapped = paddle_to_res2det(state)
    own = {k: tuple(v.shape) for k, v in res2det.create_model(name).state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == own


def test_key_map_transposes_linear_weights_only():
    w = torch.arange(12.0).view(4, 3)  # Paddle Linear [in, out]
    out = paddle_to_res2det({"bbox_head.head.fc6.weight": w, "bbox_head.head.fc6.bias": torch.zeros(3),
                             "mask_head.head.upsample.conv5_mask.weight": torch.zeros(5, 6, 2, 2),
                             "backbone.res2.blocks.0.branch2b.1.norm._variance": torch.ones(2),
                             "backbone.res4.blocks.3.branch2b.0.conv_offset.bias": torch.ones(27),
                             "neck.fpn_inner_res5_sum.weight": torch.zeros(1, 1, 1, 1)})
    torch.testing.assert_close(out["roi_head.bbox_head.shared_fcs.0.weight"], w.t())
    assert out["roi_head.mask_head.upsample.weight"].shape == (5, 6, 2, 2)  # ConvTranspose: same as torch
    assert "backbone.layer1.0.bns.1.running_var" in out
    assert "backbone.layer3.3.convs.0.conv_offset.bias" in out
    assert "neck.lateral_convs.3.weight" in out


@pytest.mark.parametrize("key", ["backbone.res2.blocks.0.branch2d.conv.weight", "neck.fpn_inner_res5_sum_lateral.weight",
                                 "bbox_head.head.fc8.weight", "backbone.res1.conv1.norm.running_mean", "extra"])
def test_key_map_refuses_unknown_keys(key):
    with pytest.raises(CheckpointError) as e:
        paddle_to_res2det({"rpn_head.rpn_rois_score.bias": torch.zeros(3), key: torch.zeros(1)})
    assert key in str(e.value)


def test_missing_key_is_listed(tmp_path, seeded_weights):
    name = ROWS[0]
    layout = seeded_weights.load_layout(REFERENCE / "layouts" / f"{name}.json")
    sd = OrderedDict((k, torch.zeros(s)) for k, s in layout.items() if k != "bbox_head.bbox_delta.bias")
    path = tmp_path / "partial.pdparams"
    seeded_weights.save_pdparams(sd, path)
    with pytest.raises(CheckpointError) as e:
        res2det.create_model(name, weights=str(path))
    assert "missing" in str(e.value) and "roi_head.bbox_head.fc_reg.bias" in str(e.value)


def test_paddle_rows_are_registered():
    for name in ROWS:
        spec = res2det.zoo.get_spec(name)
        assert spec.config.conventions == "paddle" and spec.config.backbone.stage_block == "paddle"
        assert spec.config.backbone.shortcut == "conv"
        assert spec.config.backbone.stem == ("deep" if "_vd_" in name else "original")
        assert spec.preprocess.mean == pytest.approx((123.675, 116.28, 103.53))
    published = {n: res2det.zoo.get_spec(n).weights for n in ROWS}
    assert published[ROWS[3]] == ()
    assert published[ROWS[0]][0].url == f"https://paddledet.bj.bcebos.com/models/{ROWS[0]}.pdparams"
    assert published[ROWS[2]][0].metrics == {"box_ap": 42.6, "mask_ap": 38.1}


# ------------------------------------------------------------------------------------------ Paddle's test rules
def test_paddle_anchors_float64_sizes():
    gen = PaddleAnchorGenerator(strides=(4,), ratios=(0.5, 1.0, 2.0), scales=(8.0,))
    for r, row in zip((0.5, 1.0, 2.0), gen.base_anchors[0].tolist()):
        w = math.sqrt(32.0 ** 2 / r)
        h = r * w
        assert row == [np.float32(v) for v in (-w / 2, -h / 2, w / 2, h / 2)]
    (a,) = gen.grid_anchors([(1, 2)])
    torch.testing.assert_close(a[3:], gen.base_anchors[0] + torch.tensor([4.0, 0, 4.0, 0]))


def test_paddle_delta2bbox_divides_and_clips_from_above_only():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    out = paddle_delta2bbox(boxes, torch.tensor([[10.0, 0.0, -50.0, 100.0]]), (10.0, 10.0, 5.0, 5.0))[0, 0]
    # dx = 1 box width; dw = -10 is not clipped from below; dh clipped at log(1000/16)
    assert out[0].item() == pytest.approx(15.0 - 0.5 * 10 * math.exp(-10))
    assert (out[3] - out[1]).item() == pytest.approx(20 * 1000 / 16, rel=1e-6)


def test_paddle_proposals_rank_by_logit_and_drop_sub_pixel_boxes():
    head = PaddleRPNHead(in_channels=4, feat_channels=4, anchor_generator=PaddleAnchorGenerator(
        strides=(4,), ratios=(1.0,), scales=(8.0,)), test_cfg=ProposalConfig(nms_pre=10, max_per_img=10))
    # 1x3 grid, one anchor per location (32x32 at x = 0, 4, 8); deltas shrink the middle one below 1 px in w
    cls = torch.tensor([[[[1.0, 3.0, 2.0]]]])
    reg = torch.zeros(1, 4, 1, 3)
    reg[0, 2, 0, 1] = math.log(0.9 / 32)
    boxes, scores, logits = head.predict_proposals([cls], [reg], [(100, 100)])[0]
    assert logits.tolist() == [2.0, 1.0] or sorted(logits.tolist()) == [1.0, 2.0]
    torch.testing.assert_close(scores, logits.sigmoid())
    assert bool((boxes[:, 2] - boxes[:, 0] >= 1).all()) and bool((boxes >= 0).all())


def test_paddle_multiclass_nms_groups_by_class_then_index():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [40, 40, 50, 50.0]])
    boxes = boxes[:, None].expand(4, 2, 4)
    scores = torch.tensor([[0.6, 0.01], [0.9, 0.3], [0.2, 0.8], [0.04, 0.7]])
    b, s, l, rows = paddle_multiclass_nms(boxes, scores, score_thr=0.05, iou_threshold=0.5, max_num=3)
    # class 0: row 1 suppresses row 0 (IoU > 0.5), row 2 kept; class 1: rows 1, 2, 3 -> top-3 overall by score
    # is (0.9 c0 r1), (0.8 c1 r2), (0.7 c1 r3); output grouped by class then row
    assert l.tolist() == [0, 1, 1] and rows.tolist() == [1, 2, 3]
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.7])
