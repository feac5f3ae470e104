"""PaddleDetection Res2Net-50 Faster / Mask R-CNN against the Paddle fixtures (seed-0 weights in Paddle's layout).

The seeded weights are written as a real ``.pdparams`` file (``save_pdparams``: what ``paddle.save`` writes) and
loaded through ``create_model(name, weights=path)``, so the restricted reader, the format detection and the key
map are exercised. Every intermediate the fixture stores is compared (strict). The input is built with the
model's own ``Preprocess`` (mean/std = 255 x ImageNet's), which differs from Paddle's ``x / 255`` order by
<= 4.8e-7 -- within the input tolerance, which the compare checks.
"""
from __future__ import annotations


import pytest

import res2det

from test_det_parity import run_parity

ROWS = [
    "faster_rcnn_res2net50_vb_26w_4s_fpn_1x_coco",
    "mask_rcnn_res2net50_vb_26w_4s_fpn_2x_coco",
    "mask_rcnn_res2net50_vd_26w_4s_fpn_2x_coco",
    "mask_rcnn_res2net50_vd_26w_4s_fpn_dcnv2_1x_coco",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ROWS)
def test_paddle_parity(name, seeded_checkpoint, check_parity):
    # a real .pdparams file, so the safe reader and the Paddle key map are exercised too
    result = run_parity(name, seeded_checkpoint(name, suffix=".pdparams"), check_parity)
    assert ("masks" in result) == name.startswith("mask")
    # Paddle's output order: grouped by class (ascending)
    labels = result["labels"]
    assert bool((labels[1:] >= labels[:-1]).all())


@pytest.mark.slow
def test_paddle_predict_pastes_at_original_size(seeded_checkpoint):
    from PIL import Image

    from conftest import PHOTO

    if not PHOTO.is_file():
        pytest.skip(f"{PHOTO} not found")
    name = "mask_rcnn_res2net50_vb_26w_4s_fpn_2x_coco"
    model = res2det.create_model(name, weights=str(seeded_checkpoint(name, suffix=".pdparams")))
    img = Image.open(PHOTO).convert("RGB")
    (det,) = model.predict([img])
    w, h = img.size
    assert (det.width, det.height) == (w, h)
    assert len(det.boxes) > 0 and det.masks is not None and det.masks.shape == (len(det.boxes), h, w)
    assert bool((det.boxes[:, 0::2] >= 0).all() and (det.boxes[:, 0::2] <= w).all())
    assert bool((det.boxes[:, 1::2] >= 0).all() and (det.boxes[:, 1::2] <= h).all())
    assert bool((det.labels >= 0).all()) and all(c in res2det.zoo.mmdetection.COCO_CLASSES for c in det.categories)
    # masks lie inside their (clipped) boxes, up to a pixel
    for box, mask in zip(det.boxes, det.masks):
        ys, xs = mask.nonzero(as_tuple=True)
        if len(xs):
            assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() + 1
            assert ys.min() >= box[1].floor() - 1 and ys.max() <= box[3].ceil() + 1
    assert bool((det.scores[1:] <= det.scores[:-1]).all())  # by decreasing score, as Detections promises
