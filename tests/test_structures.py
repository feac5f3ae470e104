"""InstanceMasks: masks kept as per-box crops (memory bounded by the boxes), full masks and RLE on request."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from pycocotools import mask as mask_utils

import res2det
from res2det.structures import InstanceMasks


def test_crops_round_trip_and_rle_equals_pycocotools():
    g = torch.Generator().manual_seed(0)
    for t in range(200):
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        full = torch.rand(4, h, w, generator=g) < float(torch.rand(1, generator=g))
        full[0] = False  # an empty mask
        if t % 2:
            full[1:, : h // 2] = False  # masks that do not start at the top
        masks = InstanceMasks.from_tensor(full)
        assert torch.equal(masks.to_tensor(), full) and masks.shape == (4, h, w)
        assert torch.equal(masks[2], full[2]) and masks.area().tolist() == full.flatten(1).sum(1).tolist()
        ref = mask_utils.encode(np.asfortranarray(full.numpy().astype(np.uint8).transpose(1, 2, 0)))
        assert [r["counts"] for r in masks.rle()] == [r["counts"] for r in ref], t
        assert torch.equal(masks.select([3, 1]).to_tensor(), full[[3, 1]])


def test_predict_keeps_masks_within_their_boxes_on_a_large_image():
    """Memory follows the boxes: on a 3000 x 4000 image the crops hold a small fraction of K x H x W."""
    spec = res2det.zoo.get_spec("mask_rcnn_r2_tiny_fpn")
    torch.manual_seed(0)
    model = res2det.create_model("mask_rcnn_r2_tiny_fpn", rcnn_test=dataclasses.replace(
        spec.config.roi_head.rcnn_test, score_thr=0.0))  # untrained: keep every detection
    rgb = (np.random.default_rng(0).random((3000, 4000, 3)) * 255).astype(np.uint8)
    (det,) = model.predict(rgb)
    k = len(det)
    assert k > 10 and det.instance_masks is not None and det.instance_masks.shape == (k, 3000, 4000)
    held = sum(c.numel() for c in det.instance_masks.crops)
    boxes = det.boxes
    window = ((boxes[:, 2] - boxes[:, 0] + 3) * (boxes[:, 3] - boxes[:, 1] + 3)).sum()  # box +- 1 px, rounded out
    assert held <= float(window) and held < 0.2 * k * 3000 * 4000
