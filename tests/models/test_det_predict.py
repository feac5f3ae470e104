"""``TwoStageDetector.predict``: any image input -> mmdetection's test pipeline -> ``Detections`` in the original
image's pixels; and ``draw_detections``. Fast checks use a scaled-down detector with small input bounds; the slow
ones run the seeded R2-101 Mask R-CNN (one forward each)."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from res2det import Detections, Res2DetError
from res2det.images import detection_input, pad_batch, rescale_size, resize_bilinear
from res2det.models.detectors import build_detector
from res2det.models.weight_init import pytorch_default_
from res2det.visualize import draw_detections, label_color
from res2det.zoo.mmdetection import COCO_CLASSES, DETECTION_PREPROCESS
from res2det.structures import Preprocess

from conftest import MASK_RCNN, PHOTO, REFERENCE
from test_det_parity import fixture_input
from test_det_units import tiny_config

PNG = REFERENCE / "parity" / "det_input_1199x800.png"
TINY_BOUNDS = (96, 160)  # (short, long): keeps the scaled-down model's forward fast


def _need(path):
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared must sit beside the repository)")
    return path


def _tiny(with_mask=True):
    torch.manual_seed(0)
    model = build_detector(tiny_config(with_mask)).eval()
    pytorch_default_(model)  # with mmdetection's init every untrained class score saturates at 1 in eval mode
    # a threshold of 0 so that the random model returns detections
    model.roi_head.test_cfg = dataclasses.replace(model.roi_head.test_cfg, score_thr=0.0)
    model.preprocess = Preprocess(input_size=TINY_BOUNDS, crop_pct=None)
    model.class_names = ("a", "b", "c", "d", "e")
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


@pytest.fixture(scope="module")
def rgb():
    """A real photo cropped to 96x144 (h x w): already at TINY_BOUNDS scale 1."""
    return np.asarray(Image.open(_need(PHOTO)).convert("RGB"))[40:136, 60:204].copy()


def _same(a: Detections, b: Detections):
    assert (a.width, a.height, a.categories) == (b.width, b.height, b.categories)
    for f in ("boxes", "scores", "labels", "masks"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None and y is None) or torch.equal(x, y), f


# -------------------------------------------------------------------------------------------------- pre-processing
def test_mmcv_rescale_rule():
    assert rescale_size(427, 640, (800, 1333)) == (800, 1199)  # the fixture photo: short side bound
    assert rescale_size(352, 230, (800, 1333)) == (1224, 800)  # upscaled
    assert rescale_size(2000, 500, (800, 1333)) == (1333, 333)  # long side bound; 333.25 rounds down
    assert rescale_size(800, 1199, (1333, 800)) == (800, 1199)  # bounds in either order


def test_bilinear_resize():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert resize_bilinear(img, 7, 5) is img
    # halving samples between each 2x2 block's pixels (half-pixel centres, no antialiasing): replication undone
    big = np.repeat(np.repeat(img, 2, 0), 2, 1)
    np.testing.assert_array_equal(resize_bilinear(big, 7, 5), img)
    up = resize_bilinear(img, 14, 10)
    assert up.shape == (10, 14, 3) and up.dtype == np.uint8
    np.testing.assert_array_equal(up[0, 0], img[0, 0])  # edge pixels are clamped, not blended with zeros


def test_pipeline_reproduces_the_fixture_input():
    x, scale = detection_input(np.asarray(Image.open(_need(PNG)).convert("RGB")), DETECTION_PREPROCESS)
    assert scale == (1.0, 1.0)
    assert torch.equal(pad_batch([x]), fixture_input())  # bit-exact, 1216 x 800


# --------------------------------------------------------------------------------------- predict, scaled-down model
def test_every_input_kind_gives_the_same_detections(tiny, rgb, tmp_path):
    path = tmp_path / "crop.png"
    Image.fromarray(rgb).save(path)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    kinds = [str(path), path, Image.open(path), rgb, torch.from_numpy(rgb), chw, chw.float() / 255, chw.float()]
    results = tiny.predict(kinds)
    assert len(results) == len(kinds) and len(results[0]) > 0
    for r in results[1:]:
        _same(results[0], r)
    (single,) = tiny.predict(rgb)  # one image -> a list of one
    _same(results[0], single)
    batch = tiny.predict(np.stack([rgb, rgb]))  # an N x H x W x 3 array is N images
    assert len(batch) == 2 and batch[0].width == 144


def test_scale_one_equals_detect(tiny, rgb):
    (det,) = tiny.predict(rgb)
    x, scale = detection_input(rgb, tiny.preprocess)
    assert scale == (1.0, 1.0)
    with torch.inference_mode():
        (ref,) = tiny.detect(pad_batch([x]), [tuple(x.shape[-2:])])
    assert len(det) > 0 and det.masks.shape == (len(det), 96, 144) and det.masks.dtype == torch.bool
    for f in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(getattr(det, f), ref[f]), f
    assert det.categories == [tiny.class_names[i] for i in ref["labels"].tolist()]
    assert det.labels.dtype == torch.int64


def test_boxes_come_back_in_original_pixels(tiny, rgb):
    # 2x pixel replication: the pipeline halves it back to exactly `rgb`, so boxes are exactly twice as large
    big = np.repeat(np.repeat(rgb, 2, 0), 2, 1)
    (small,), (large,) = tiny.predict(rgb), tiny.predict(big)
    assert (large.width, large.height) == (288, 192)
    torch.testing.assert_close(large.boxes, small.boxes * 2, rtol=0, atol=0)
    torch.testing.assert_close(large.scores, small.scores, rtol=0, atol=0)
    assert large.masks.shape == (len(large), 192, 288)
    # a mask is pasted from its box: nothing set further than 1 px outside it
    for box, mask in zip(large.boxes, large.masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() + 1
            assert ys.min() >= box[1].floor() - 1 and ys.max() <= box[3].ceil() + 1


def test_batches_and_mixed_sizes(tiny, rgb):
    other = np.asarray(Image.open(PHOTO).convert("RGB"))  # 352 x 230 -> resized by 0.417
    dets = tiny.predict([rgb, other, rgb], batch_size=2)
    assert [(d.width, d.height) for d in dets] == [(144, 96), (352, 230), (144, 96)]
    for d in dets:
        assert d.masks.shape == (len(d), d.height, d.width)
        assert (d.boxes >= 0).all() and (d.boxes[:, 0::2] <= d.width).all() and (d.boxes[:, 1::2] <= d.height).all()
    with pytest.raises(Res2DetError, match="batch_size"):
        tiny.predict(rgb, batch_size=0)


def test_score_threshold_and_empty_results(tiny, rgb):
    (full,) = tiny.predict(rgb)
    thr = float(full.scores.median())
    (kept,) = tiny.predict(rgb, score_thr=thr)
    _same(kept, full.above(thr))
    assert 0 < len(kept) < len(full) and (kept.scores >= thr).all()
    (none,) = tiny.predict(rgb, score_thr=1.01)
    assert len(none) == 0 and none.masks.shape == (0, 96, 144) and none.boxes.shape == (0, 4)
    assert draw_detections(rgb, none).size == (144, 96)


def test_predict_modes_and_outputs(rgb):
    model = _tiny(with_mask=False).train()
    (det,) = model.predict(rgb)
    assert model.training  # restored
    assert det.masks is None and len(det) > 0
    assert not det.boxes.is_inference()
    det.boxes[:, 0] += 1  # ordinary tensors: editable outside inference mode


def test_bad_inputs_name_the_problem(tiny, tmp_path):
    with pytest.raises(Res2DetError, match="missing.jpg: image file not found"):
        tiny.predict(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(Res2DetError, match="bad.jpg: not a readable image"):
        tiny.predict([bad])
    with pytest.raises(Res2DetError, match="unsupported image input"):
        tiny.predict(object())
    with pytest.raises(Res2DetError, match="HxWx3"):
        tiny.predict(np.zeros((10, 10, 4), np.uint8))


# ---------------------------------------------------------------------------------------------------------- drawing
def test_draw_detections(rgb):
    masks = torch.zeros(2, 96, 144, dtype=torch.bool)
    masks[0, 10:40, 10:60] = True
    masks[1, 50:90, 80:140] = True
    det = Detections(boxes=torch.tensor([[10.0, 10, 60, 40], [80, 50, 140, 90]]), scores=torch.tensor([0.9, 0.2]),
                     labels=torch.tensor([0, 1]), categories=["person", "bicycle"], masks=masks, width=144, height=96)
    out = np.asarray(draw_detections(rgb, det, score_thr=0.3))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not np.array_equal(out[20:30, 20:50], rgb[20:30, 20:50])  # masked (and labelled) region changes
    np.testing.assert_array_equal(out[60:85, 90:130], rgb[60:85, 90:130])  # below the threshold: untouched
    # the mask is a translucent blend towards the class colour
    blended = rgb[30, 40].astype(float) * 0.55 + np.array(label_color(0)) * 0.45
    np.testing.assert_allclose(out[30, 40], blended, atol=1)
    fields = {k: getattr(det, k) for k in ("boxes", "scores", "labels", "categories", "masks")}
    again = np.asarray(draw_detections(Image.fromarray(rgb), fields, score_thr=0.3))
    np.testing.assert_array_equal(out, again)  # deterministic; a dict of fields works too
    assert label_color(3) == label_color(3) and label_color(3) != label_color(4)
    with pytest.raises(Res2DetError, match="do not fit"):
        draw_detections(rgb[:50], det)


# ---------------------------------------------------------------------------------------- seeded R2-101 Mask R-CNN
@pytest.mark.slow
def test_predict_matches_mmdet_at_scale_one(seeded_mask_rcnn, check_parity):
    """The user-level path on the fixture image (already 1199x800: scale 1) reproduces mmdetection's output."""
    fixture = _need(REFERENCE / "parity" / f"{MASK_RCNN}.pt")
    (det,) = seeded_mask_rcnn.predict(str(_need(PNG)))
    assert (det.width, det.height) == (800, 1199) and len(det) == 100
    assert det.masks.shape == (100, 1199, 800)
    assert det.categories == [COCO_CLASSES[i] for i in det.labels.tolist()]
    report = io.StringIO()
    outputs = {"det.bboxes": det.boxes, "det.scores": det.scores, "det.labels": det.labels}
    assert check_parity.compare(outputs, fixture, file=report), report.getvalue()
    rows = {line.split()[1]: line.split()[0] for line in report.getvalue().splitlines() if len(line.split()) > 1}
    assert rows.get("detections") == "PASS" and "0 reordered" in report.getvalue(), report.getvalue()
    # masks pasted at the original size: check_parity's rule (<= max(4 px, 2% of the union) differ), vectorised
    ref = check_parity.fixture_masks(check_parity.load_fixture(fixture))
    assert ref.shape == det.masks.shape
    differ = (ref ^ det.masks).flatten(1).sum(1)
    union = (ref | det.masks).flatten(1).sum(1)
    assert (differ <= (0.02 * union).clamp(min=4)).all(), differ.max()


@pytest.mark.slow
def test_photo_of_another_size(photo_detections):
    det = photo_detections
    w, h = Image.open(PHOTO).size
    assert (det.width, det.height) == (w, h) == (352, 230)
    assert len(det) > 0 and det.masks.shape == (len(det), h, w) and det.masks.dtype == torch.bool
    b = det.boxes
    assert (b >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert (det.scores[:-1] >= det.scores[1:]).all() and (det.scores > 0.05).all()
    assert det.masks.flatten(1).any(1).float().mean() > 0.5  # most masks are not empty
    # at 1224x800 (the resized input) many boxes would leave the original image: they were scaled back
    assert float(b[:, 2].max()) > w / 2
