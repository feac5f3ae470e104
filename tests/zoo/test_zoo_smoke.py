"""Every named model builds (random weights) and runs a tiny forward with the output its task promises."""
from __future__ import annotations

import pytest
import torch

import res2det
from res2det.zoo import get_spec


@pytest.mark.parametrize("name", res2det.list_models())
def test_every_model_builds_and_runs(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model = res2det.create_model(name).eval()
    with torch.inference_mode():
        if spec.task == "classification":
            logits = model(torch.randn(1, 3, 64, 64))
            assert logits.shape == (1, spec.config.num_classes) and torch.isfinite(logits).all()
            return
        (result,) = model(torch.randn(1, 3, 96, 128), [(90, 120)])
    k = result["boxes"].shape[0]
    assert result["boxes"].shape == (k, 4) and result["scores"].shape == (k,) and result["labels"].shape == (k,)
    if k:
        assert (result["boxes"][:, 2] <= 120).all() and (result["boxes"][:, 3] <= 90).all()
    assert ("masks" in result) == (spec.task == "instance_segmentation")
    if "masks" in result:
        assert result["masks"].shape == (k, 90, 120)


def test_detectors_own_their_normalisation():
    """A detector's Preprocess is part of its config (one source); overrides reach it like any field."""
    from res2det.zoo.paddledetection import PADDLE_PREPROCESS

    for name in res2det.list_models():
        spec = get_spec(name)
        if spec.task != "classification":
            assert spec.preprocess is spec.config.preprocess, name
    paddle = res2det.create_model("mask_rcnn_res2net50_vb_26w_4s_fpn_2x_coco")
    assert paddle.preprocess == PADDLE_PREPROCESS
    tiny = res2det.create_model("mask_rcnn_r2_tiny_fpn", **{"preprocess.input_size": (160, 200)})
    assert tiny.preprocess.input_size == (160, 200)
    (det,) = tiny.predict(torch.zeros(64, 64, 3, dtype=torch.uint8))
    assert (det.width, det.height) == (64, 64)
