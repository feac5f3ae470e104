"""Training transforms: keep-ratio resize, flip consistency, multi-scale draws, nearest resizing of masks."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from res2det.images import rescale_size
from res2det.data.transforms import Sample, hflip, resize, resize_nearest, sample_scale, to_tensors
from res2det.structures import Preprocess


def mask_box(mask: np.ndarray) -> list[float]:
    """x1, y1, x2, y2 of a mask's pixels, edges on pixel boundaries."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def shapes_sample(h: int = 40, w: int = 70) -> Sample:
    rng = np.random.default_rng(0)
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 5:20, 3:30] = 1
    masks[1, 22:39, 41:66] = 1
    masks[1, 30:39, 50:60] = 0  # not a rectangle
    boxes = np.array([mask_box(m) for m in masks], np.float32)
    semantic = np.full((h, w), 255, np.uint8)
    semantic[:, : w // 3] = 7
    return Sample(rgb=rng.integers(0, 255, (h, w, 3), dtype=np.uint8), boxes=boxes, labels=np.array([0, 2]),
                  masks=masks, semantic=semantic)


def test_flip_moves_boxes_with_their_masks():
    s = shapes_sample()
    f = hflip(s)
    w = s.size[1]
    for box, flipped_box, flipped_mask in zip(s.boxes, f.boxes, f.masks):
        assert mask_box(flipped_mask) == flipped_box.tolist() == [w - box[2], box[1], w - box[0], box[3]]
    assert np.array_equal(f.rgb, s.rgb[:, ::-1]) and np.array_equal(f.semantic, s.semantic[:, ::-1])
    g = hflip(f)  # an involution
    assert np.array_equal(g.rgb, s.rgb) and np.array_equal(g.boxes, s.boxes) and np.array_equal(g.masks, s.masks)


@pytest.mark.parametrize("scale", [(1333, 800), (100, 60), (35, 35)])
def test_resize_keeps_ratio_and_scales_boxes(scale):
    s = shapes_sample(40, 70)
    r, (sx, sy) = resize(s, scale)
    new_h, new_w = r.size
    assert (new_w, new_h) == rescale_size(70, 40, scale)
    assert max(new_w, new_h) <= max(scale) and min(new_w, new_h) <= min(scale)
    assert max(new_w, new_h) == max(scale) or min(new_w, new_h) == min(scale)  # fits one bound exactly
    assert abs(new_w / new_h - 70 / 40) < 0.05 and (sx, sy) == (new_w / 70, new_h / 40)
    np.testing.assert_allclose(r.boxes, s.boxes * [sx, sy, sx, sy], rtol=1e-6)
    assert r.masks.shape == (2, new_h, new_w) and r.semantic.shape == (new_h, new_w)
    assert set(np.unique(r.masks)) <= {0, 1} and set(np.unique(r.semantic)) == {7, 255}
    for box, mask in zip(r.boxes, r.masks):  # the resized mask still lies in its box (within a pixel)
        mb = mask_box(mask)
        assert mb[0] >= box[0] - 1 and mb[1] >= box[1] - 1 and mb[2] <= box[2] + 1 and mb[3] <= box[3] + 1


def test_resize_clips_boxes_to_the_image():
    s = shapes_sample(40, 70)
    s.boxes = np.array([[-5.0, 2.0, 80.0, 45.0]], np.float32)
    s.labels, s.masks = np.array([1]), None
    r, _ = resize(s, (140, 80))
    assert r.boxes.tolist() == [[0.0, 4.0, 140.0, 80.0]]


def test_nearest_resize_is_opencvs_rule():
    m = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    out = resize_nearest(m, 6, 8)
    assert np.array_equal(out[0], np.repeat(np.repeat(m[0], 2, 0), 2, 1))
    down = resize_nearest(np.arange(36, dtype=np.uint8).reshape(6, 6), 4, 4)
    src = np.floor(np.arange(4) * 6 / 4).astype(int)  # floor(dst * src_size / dst_size)
    assert np.array_equal(down, np.arange(36).reshape(6, 6)[np.ix_(src, src)])
    assert resize_nearest(np.zeros((0, 5, 5), np.uint8), 3, 2).shape == (0, 3, 2)
    # rows where float32 ratios (torch's "nearest") land elsewhere; values read from cv2.resize(INTER_NEAREST)
    # 4.14: 424 -> 400 rows 50, 100, 150 come from 53, 106, 159 (torch: 52, 105, 158); 346 -> 400 row 200
    # from 172 (double rounding of 200 * 346 / 400 = 173 exactly)
    tall = resize_nearest(np.arange(424, dtype=np.int64)[:, None], 400, 1)[:, 0]
    assert tall[[50, 100, 150]].tolist() == [53, 106, 159]
    assert resize_nearest(np.arange(346, dtype=np.int64)[:, None], 400, 1)[200, 0] == 172


def test_multi_scale_draws():
    rng = random.Random(0)
    choices = [(1333, 640), (1333, 800), (1000, 600)]
    drawn = {sample_scale(rng, (1333, 800), choices=choices) for _ in range(100)}
    assert drawn == set(choices)
    ranged = [sample_scale(rng, (1333, 800), short_range=(640, 800)) for _ in range(500)]
    assert {long for long, _ in ranged} == {1333}
    shorts = [short for _, short in ranged]
    assert min(shorts) >= 640 and max(shorts) <= 800 and len(set(shorts)) > 100  # uniform over the range
    assert sample_scale(rng, (800, 1333)) == (800, 1333)
    with pytest.raises(ValueError):
        sample_scale(rng, (1333, 800), choices=choices, short_range=(1, 2))


def test_to_tensors_normalises():
    s = shapes_sample()
    pre = Preprocess(mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0))
    t = to_tensors(s, pre)
    expected = (torch.from_numpy(s.rgb).permute(2, 0, 1).float() - torch.tensor([10.0, 20, 30])[:, None, None]) \
        / torch.tensor([2.0, 4, 5])[:, None, None]
    torch.testing.assert_close(t["image"], expected)
    assert t["labels"].dtype == torch.int64 and t["masks"].dtype == torch.uint8 and t["semantic"].dtype == torch.int64
