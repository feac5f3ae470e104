"""ONNX export of the mmdetection R2-101 detectors (Faster / Mask / Cascade Mask R-CNN, HTC)
with their seed-0 reference weights, run in ONNX Runtime on a real photo and compared with ``predict``: the same
detections (box IoU >= 0.99, same labels, scores within 1e-3) and masks (IoU >= 0.98, or at most 2 pixels
differing on the tiny masks of small boxes, where one pixel is 2%). Some graphs have a
dynamic input size, some a fixed one; most run at a smaller resize bound (320, 512) to keep the suite fast."""
from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import res2det  # noqa: E402
from res2det.deploy import OnnxDetector, export_onnx  # noqa: E402

from conftest import MASK_RCNN, PHOTO  # noqa: E402
from test_onnx import match_detections  # noqa: E402

SMALL = (320, 512)  # the 352x230 photo becomes 490x320, padded to 512x320 (= the fixed size below)


def _check(model, name, tmp_path, size, ref=None):
    path = export_onnx(model, tmp_path / f"{name}.onnx", size=size, model_name=name)
    detector = OnnxDetector(path, threads=2)
    assert detector.info.input_size == size and detector.info.opset >= 17
    if ref is None:
        (ref,) = model.predict(str(PHOTO))
    (got,) = detector.predict(str(PHOTO))
    assert len(ref) == model.roi_head.test_cfg.max_per_img  # the seeded weights give real detections
    worst = match_detections(ref, got, max_per_img=model.roi_head.test_cfg.max_per_img)
    print(f"{name} ({'fixed ' + 'x'.join(map(str, size)) if size else 'dynamic'}): {worst}")
    assert worst["pairs"] == len(ref) == len(got)  # on this photo: every detection has its counterpart
    return worst


@pytest.mark.slow
# Cascade R-CNN's graph is Cascade Mask R-CNN's without the mask branch: the latter stands for both (suite time)
@pytest.mark.parametrize("name, size", [
    ("faster_rcnn_r2_101_fpn_2x_coco", None),
    ("cascade_mask_rcnn_r2_101_fpn_20e_coco", None),
    ("htc_r2_101_fpn_20e_coco", (320, 512)),
])
def test_zoo_detector_onnx_matches_pytorch(name, size, seeded_checkpoint, tmp_path):
    model = res2det.create_model(name, weights=str(seeded_checkpoint(name)))
    model.preprocess = dataclasses.replace(model.preprocess, input_size=SMALL)
    _check(model, name, tmp_path, size)


@pytest.mark.slow
def test_mask_rcnn_onnx_matches_pytorch_at_full_size(seeded_mask_rcnn, photo_detections, tmp_path):
    """Mask R-CNN at predict's own 800x1333 bound (the photo is upscaled to 1224x800), dynamic size."""
    _check(seeded_mask_rcnn, MASK_RCNN, tmp_path, None, ref=photo_detections)
