"""`res2det infer` of the R2-101 Mask R-CNN on a real photo, drawn, and the published-weights download path of a
detector. The README's main job, `res2det train shapes`, is exercised by tests/engine/test_engine_train.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from PIL import Image

from res2det.cli.main import main

from conftest import SHARED


@pytest.mark.slow
def test_infer_runs_a_detector_on_a_real_photo_and_draws_it(seeded_checkpoint, tmp_path, capsys):
    photo = SHARED / "data" / "tiny_coco" / "val2017" / "000000006818.jpg"
    if not photo.is_file():
        pytest.skip("../shared not beside the repository")
    name = "mask_rcnn_r2_101_fpn_2x_coco"
    assert main(["infer", "--model", name, "--weights", str(seeded_checkpoint(name)), str(photo),
                 "--out", str(tmp_path / "dets.json"), "--draw", str(tmp_path / "drawn")]) == 0
    (record,) = json.loads((tmp_path / "dets.json").read_text())
    assert (record["width"], record["height"]) == (427, 640) and len(record["detections"]) == 100
    assert Image.open(tmp_path / "drawn" / "000000006818.png").size == (427, 640)


@pytest.mark.slow
def test_detector_weights_mmdet_downloads_verifies_and_converts(seeded_checkpoint, http_server, tmp_path, monkeypatch):
    """weights='mmdet' fetches the zoo row's URL (here a local server), checks the sha256 prefix, maps keys."""
    import res2det
    from res2det.zoo import MODELS

    name = "faster_rcnn_r2_101_fpn_2x_coco"
    raw = seeded_checkpoint(name).read_bytes()
    served, base = http_server
    filename = f"{name}-{hashlib.sha256(raw).hexdigest()[:8]}.pth"
    (served / filename).write_bytes(raw)
    spec = MODELS[name]
    local = dataclasses.replace(spec.weights[0], url=f"{base}/{filename}")
    monkeypatch.setitem(MODELS, name, dataclasses.replace(spec, weights=(local,)))
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path / "cache"))
    model = res2det.create_model(name, weights="mmdet")
    assert (tmp_path / "cache" / filename).is_file() and not model.training
    assert model.backbone.bn1.weight.shape == (64,)
