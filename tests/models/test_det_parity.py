"""Faster / Mask R-CNN R2-101 against the mmdetection 3.3.0 fixtures (seed-0 weights in mmdet's layout).

Every intermediate the fixture stores is compared (strict: a missing one fails): backbone, FPN, RPN maps,
proposals, RoI-head inputs/outputs, detections, mask logits and the pasted masks.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import res2det

from conftest import REFERENCE

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def fixture_input() -> torch.Tensor:
    """The fixture's (1, 3, 1216, 800) input, exactly as the reference README builds it."""
    from PIL import Image

    png = REFERENCE / "parity" / "det_input_1199x800.png"
    x = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).copy()).permute(2, 0, 1).float()
    return F.pad((x - MEAN) / STD, (0, 0, 0, 1216 - 1199))[None]


def run_parity(name: str, weights, check_parity) -> dict:
    """Load ``weights`` into ``name``, run it on the fixture input and assert that every tensor the fixture
    stores matches (strict: a missing one fails) and that it finds 100 detections; returns the detections."""
    fixture = REFERENCE / "parity" / f"{name}.pt"
    if not fixture.is_file():
        pytest.skip(f"{fixture} not found (../shared must sit beside the repository)")
    model = res2det.create_model(name, weights=str(weights))
    assert not model.training
    results, outputs = model.forward_with_intermediates(fixture_input(), [(1199, 800)])
    report = io.StringIO()
    ok = check_parity.compare(outputs, fixture, strict=True, file=report)
    assert ok, report.getvalue()
    assert len(results[0]["boxes"]) == 100
    return results[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["faster_rcnn_r2_101_fpn_2x_coco", "mask_rcnn_r2_101_fpn_2x_coco"])
def test_mmdet_parity(name, seeded_checkpoint, check_parity):
    result = run_parity(name, seeded_checkpoint(name), check_parity)
    assert ("masks" in result) == name.startswith("mask")
