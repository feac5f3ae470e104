"""The static-graph era's inference rules (``models.heads.paddle_static_conventions``) against the outputs of
the Paddle 3.3.1 kernels that implement them (tests/fixtures/paddle_static/era_kernels.npz, made by
make_era_fixtures.py on seeded inputs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from res2det import ops
from res2det.models.heads.paddle_static_conventions import (static_anchors, static_decode, static_multiclass_nms,
                                                             static_proposals)
from res2det.ops.roi_extract import paddle_static_roi_levels

FX = np.load(Path(__file__).resolve().parent / "fixtures" / "paddle_static" / "era_kernels.npz")


def t(name: str) -> torch.Tensor:
    return torch.from_numpy(FX[name])


@pytest.mark.parametrize("level", range(5))
def test_anchor_generator(level):
    ref = t(f"anchors_{level}")  # [H, W, A, 4]
    size, stride = 32 * 2**level, 4 * 2**level
    got = static_anchors(ref.shape[:2], stride, size)
    torch.testing.assert_close(got, ref.reshape(-1, 4), rtol=0, atol=1e-4)


def test_box_coder_decode_unnormalised():
    got = static_decode(t("decode_priors"), t("decode_deltas"), (0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(got, t("decode_out"), rtol=1e-5, atol=1e-3)


def test_distribute_fpn_proposals_levels():
    rois = torch.cat([torch.zeros(len(FX["dist_rois"]), 1), t("dist_rois")], 1)
    assert (paddle_static_roi_levels(rois) + 2).tolist() == FX["dist_level"].tolist()


def test_roi_align_unaligned_sampling_2():
    rois = t("ra_rois")
    got = ops.roi_align(t("ra_feat"), torch.cat([torch.zeros(len(rois), 1), rois], 1), 7, 1 / 8, 2, False)
    torch.testing.assert_close(got, t("ra_out"), rtol=1e-5, atol=1e-5)


def test_multiclass_nms_unnormalised_background_zero():
    boxes, scores, labels = static_multiclass_nms(t("nms_boxes"), t("nms_scores"))
    ref = t("nms_out")  # [K, 6]: label, score, x1, y1, x2, y2
    assert labels.tolist() == ref[:, 0].long().tolist()
    torch.testing.assert_close(scores, ref[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes, ref[:, 2:], rtol=0, atol=1e-4)


def test_generate_proposals_pixel_offset():
    size = FX["gp_size"][0].tolist()
    boxes, scores = static_proposals(t("gp_scores")[0], t("gp_deltas")[0], t("gp_anchors").reshape(-1, 4), size,
                                     pre_nms_top_n=50, post_nms_top_n=20, nms_thresh=0.7)
    torch.testing.assert_close(scores, t("gp_probs").reshape(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes, t("gp_rois"), rtol=1e-5, atol=1e-3)


CV2 = np.load(Path(__file__).resolve().parent / "fixtures" / "paddle_static" / "cv2_resize.npz")


@pytest.mark.parametrize("name", ["up", "down"])
def test_float_resize_is_opencvs(name):
    from res2det.images import resize_linear_float as cv2_resize_linear

    image, ref = torch.from_numpy(CV2["pre_image"]), torch.from_numpy(CV2[f"pre_{name}"])
    s = float(CV2[f"pre_{name}_scale"])
    got = cv2_resize_linear(image.permute(2, 0, 1), ref.shape[:2], (1 / s, 1 / s)).permute(1, 2, 0)
    # the same taps and weights; OpenCV's own float arithmetic differs by <= 1e-5 on these N(0, 1) values
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)


def test_static_pipeline_normalises_before_resizing():
    from res2det.images import detection_input, paddle_static_scale, resize_linear_float
    from res2det.zoo.paddledetection_static import STATIC_PREPROCESS

    assert paddle_static_scale(480, 640) == 800 / 480 and paddle_static_scale(400, 1300) == 1333 / 1300
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out, scale = detection_input(rgb, STATIC_PREPROCESS)
    assert scale == (800 / 48, 800 / 48) and out.shape == (3, 800, 1067)
    resized_first = resize_linear_float(torch.from_numpy(rgb).permute(2, 0, 1).float(), out.shape[-2:],
                                        (48 / 800, 48 / 800))
    mean, std = torch.tensor(STATIC_PREPROCESS.mean)[:, None, None], torch.tensor(STATIC_PREPROCESS.std)[:, None, None]
    torch.testing.assert_close(out, (resized_first - mean) / std, rtol=0, atol=1e-4)  # linear: the same to rounding


def test_mask_pasting_of_that_era():
    from res2det.models.heads.paddle_static_conventions import static_paste_masks

    got = static_paste_masks(torch.from_numpy(CV2["mask_probs"]), torch.from_numpy(CV2["mask_boxes"]),
                             CV2["mask_size"].tolist()).to_tensor()
    ref = torch.from_numpy(CV2["mask_out"]).bool()
    assert ref.any(dim=(1, 2))[:3].all()
    assert (got != ref).sum() == 0
