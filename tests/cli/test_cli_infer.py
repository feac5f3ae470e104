"""``res2det infer``: JSON (with COCO RLE masks) and drawings for a detector; one-line errors with exit code 2."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import res2det
from res2det.checkpoint import save_weights
from res2det.cli.main import main

from conftest import MASK_RCNN, PHOTO

REPO = Path(__file__).resolve().parents[2]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("res2det: error: ")
    return lines[-1]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_infer_writes_json_and_drawings(seeded_checkpoint, photo_detections, tmp_path, capsys):
    out, draw = tmp_path / "res" / "dets.json", tmp_path / "drawn"
    weights = str(seeded_checkpoint(MASK_RCNN))
    assert main(["infer", "--model", MASK_RCNN, "--weights", weights, str(PHOTO), "--score-thr", "0.3",
                 "--out", str(out), "--draw", str(draw)]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "detections" in captured.out
    assert sorted(p.name for p in out.parent.iterdir()) == ["dets.json"]  # no temporary file left behind

    (record,) = json.loads(out.read_text())
    det = photo_detections.above(0.3)  # the same weights through TwoStageDetector.predict
    assert record["file"] == str(PHOTO) and (record["width"], record["height"]) == (352, 230)
    dets = record["detections"]
    assert len(dets) == len(det) > 0
    torch.testing.assert_close(torch.tensor([d["bbox"] for d in dets]), det.boxes, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([d["score"] for d in dets]), det.scores, rtol=0, atol=1e-6)
    assert [d["label"] for d in dets] == det.labels.tolist()
    assert [d["category"] for d in dets] == det.categories

    from pycocotools import mask as mask_utils

    for d, mask in zip(dets, det.masks):
        rle = d["mask"]
        assert isinstance(rle["counts"], str) and rle["size"] == [230, 352]
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded.astype(bool), mask.numpy())

    with Image.open(draw / f"{PHOTO.stem}.png") as png:
        assert png.format == "PNG" and png.size == (352, 230) and png.mode == "RGB"


def test_missing_and_corrupt_images(tmp_path, capsys):
    assert main(["infer", "--model", MASK_RCNN, str(tmp_path / "missing.jpg")]) == 2
    assert _error_line(capsys) == f"res2det: error: {tmp_path / 'missing.jpg'}: image file not found"
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\x00\x01 this is not a JPEG" * 10)
    assert main(["infer", "--model", MASK_RCNN, str(bad)]) == 2
    assert f"{bad}: not a readable image" in _error_line(capsys)


def test_truncated_image_without_weights(tmp_path, capsys):
    # the header is fine, the pixels are not: found when decoding, after the model is built
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out = tmp_path / "dets.json"
    assert main(["infer", "--model", MASK_RCNN, str(cut), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "randomly initialised" in err  # the no-weights warning came first
    assert f"{cut}: not a readable image" in err.strip().splitlines()[-1]
    assert not out.exists()


def test_bad_model_names(capsys):
    assert main(["infer", "--model", "mask_rcnn_r2_101_fpn_1x_coco", str(PHOTO)]) == 2
    assert "unknown model 'mask_rcnn_r2_101_fpn_1x_coco'; did you mean mask_rcnn_r2_101_fpn_2x_coco" in _error_line(capsys)
    assert main(["infer", "--model", "res2net50_26w_4s", str(PHOTO)]) == 2
    assert "res2net50_26w_4s is a classification model; infer needs a detector" in _error_line(capsys)


def test_checkpoint_of_another_model(tmp_path, capsys):
    if not PHOTO.is_file():
        pytest.skip(f"{PHOTO} not found")
    path = tmp_path / "classifier.pth"
    save_weights(res2det.create_model("res2net50_26w_4s"), path, model_name="res2net50_26w_4s")
    assert main(["infer", "--model", MASK_RCNN, "--weights", str(path), str(PHOTO)]) == 2
    assert _error_line(capsys) == (f"res2det: error: {path}: this checkpoint is for model 'res2net50_26w_4s', "
                                   f"not '{MASK_RCNN}'")


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "res2det", "infer", "--model", MASK_RCNN, str(tmp_path / "no.png")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"res2det: error: {tmp_path / 'no.png'}: image file not found"
