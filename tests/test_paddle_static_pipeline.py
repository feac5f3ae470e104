"""End to end, a static-graph zoo row (DCNv2 'vd' Mask R-CNN) stage by stage against Paddle 3.3.1's kernels and
OpenCV (tests/fixtures/paddle_static/make_pipeline_fixture.py): seed-0 reference weights written as a Fluid
``.tar`` under the release's variable names, loaded by name, run on the reference photo. Each Paddle stage was
computed from the tensors res2det fed that stage, so the comparison holds without the (unavailable) static
PaddleDetection network itself."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import PHOTO
from fluid_names import run_static_row

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "paddle_static" / "pipeline.npz"
NAME = "mask_rcnn_res2net50_vd_26w_4s_fpn_dcnv2_1x_static"


@pytest.mark.slow
def test_static_row_matches_paddle_stage_by_stage(tmp_path):
    if not PHOTO.is_file():
        pytest.skip("../shared not beside the repository")
    fx = dict(np.load(FIXTURE))
    got = {k: v.numpy() for k, v in run_static_row(NAME, PHOTO, tmp_path).items()}
    # pre-processing: normalise, then cv2.resize(fx=scale) of the float image (sampled pixels)
    y, x, c = fx["input_yxc"].T
    assert got["input"].shape[1:] == tuple(fx["input_size"])
    np.testing.assert_allclose(got["input"][c, y, x], fx["input_values"], rtol=0, atol=1e-4)

    def canonical(boxes, scores):
        order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -np.round(scores, 5)))
        return boxes[order], scores[order]

    # proposals: anchor_generator + generate_proposals(pixel_offset) per level, best 1000 overall (as sets)
    ours, theirs = canonical(got["proposals"], got["proposal_scores"]), canonical(fx["proposals"], fx["proposal_scores"])
    assert len(ours[0]) == len(theirs[0]) == 1000
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-3)
    # detections: softmax, box_coder on proposals / scale, clip to the original size - 1, multiclass_nms3 (+1)
    det = fx["detections"]
    assert len(det) == len(got["final_scores"]) == 100
    labels = got["final_labels"] + 1
    for label, score, *box in det:  # each of Paddle's detections is one of ours
        same = np.flatnonzero(labels == label)
        dist = np.abs(got["final_boxes"][same] - np.array(box)).max(1)
        j = same[dist.argmin()]
        assert dist.min() <= 1e-3 and abs(got["final_scores"][j] - score) <= 1e-5, (label, score, box)
    assert len(np.unique(labels)) >= 10  # the seeded weights spread the detections over classes
    # masks: the era's pasting of the same probabilities and boxes
    masks = np.unpackbits(fx["masks"], axis=-1)[..., :got["final_masks"].shape[-1]].astype(bool)
    assert (masks != got["final_masks"]).sum() == 0 and masks.any()
    # the CLI runs the row from the same .tar, with the same detections
    from res2det.cli.main import main

    out = tmp_path / "dets.json"
    assert main(["infer", "--model", NAME, "--weights", str(tmp_path / f"{NAME}.tar"), str(PHOTO), "--out",
                 str(out)]) == 0
    (record,) = json.loads(out.read_text())
    np.testing.assert_allclose(np.array([d["bbox"] for d in record["detections"]]), got["final_boxes"], atol=1e-4)
