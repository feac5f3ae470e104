"""ONNX export, fast checks: the traceable NMS / RoIAlign the heads switch to while exporting against
res2det's PyTorch ops (eagerly and in ONNX Runtime), a small Mask R-CNN exported with dynamic and fixed input sizes against ``predict``, the
``res2det export`` / ``res2det infer --onnx`` commands and their one-line errors. The five R2-101 zoo
detectors are in test_onnx_models.py."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import res2det  # noqa: E402
from res2det.checkpoint import save_weights  # noqa: E402
from res2det.cli.main import main  # noqa: E402
from res2det.deploy import OnnxDetector, export_onnx  # noqa: E402
from res2det.images import detection_input, pad_batch  # noqa: E402
from res2det.ops.onnx_ops import OPSET, batched_nms_graph, register_symbolics, roi_align as onnx_roi_align  # noqa: E402
from res2det.models.heads.post_processing import SPLIT_THR, batched_nms  # noqa: E402
from res2det.ops import box_iou, roi_align  # noqa: E402

from conftest import PHOTO, SHARED, one_error_line  # noqa: E402

TINY = "mask_rcnn_r2_tiny_fpn"  # the zoo's small Mask R-CNN: the same graph as the R2-101 one, fast
OTHER_PHOTO = SHARED / "data" / "tiny_coco" / "val2017" / "000000122745.jpg"  # 480x640 portrait


# ------------------------------------------------------------------------------------------------- helpers
def run_onnx(module: nn.Module, args: tuple, dynamic_axes: dict, feeds: list[tuple]) -> list[list[np.ndarray]]:
    """Export ``module`` (traced on ``args``) and run it in ONNX Runtime on each tuple of ``feeds``."""
    import warnings

    register_symbolics()
    names = [f"in{i}" for i in range(len(args))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=names,
                          dynamic_axes=dynamic_axes)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return [session.run(None, {n: np.asarray(v) for n, v in zip(names, feed)}) for feed in feeds]


def match_detections(ref, got, *, max_per_img: int = 100, score_thr: float | None = None, score_tol: float = 1e-3,
                     box_iou_min: float = 0.99, mask_iou_min: float = 0.98) -> dict[str, float]:
    """Pair two ``Detections`` of one image: each reference detection (by decreasing score) with the unpaired
    detection of the same label that overlaps it most. A pair needs box IoU >= ``box_iou_min`` (zero-area boxes:
    corners within 0.5 px), scores within ``score_tol`` and (masks) mask IoU >= ``mask_iou_min`` or at most 2
    pixels differing. Unpaired detections are allowed only where a near-tie decides: at the ``max_per_img``
    cut, scoring within ``score_tol`` of the other side's lowest score, or within ``score_tol`` of the
    ``score_thr`` the lists were cut at. Returns the worst figures: min box IoU, max score difference, min mask
    IoU, most mask pixels differing, number of pairs."""
    assert (ref.width, ref.height) == (got.width, got.height)
    iou = box_iou(ref.boxes.float(), got.boxes.float())
    # boxes clipped to zero area (on the image border) have no IoU: equal corners (within 0.5 px) pair them
    flat = lambda b: (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    close = (ref.boxes[:, None] - got.boxes[None]).abs().amax(-1) <= 0.5
    iou = torch.where(flat(ref.boxes)[:, None] & flat(got.boxes)[None] & close, torch.ones_like(iou), iou)
    iou = torch.where(ref.labels[:, None] == got.labels[None, :], iou, torch.full_like(iou, -1.0))
    free = torch.ones(len(got), dtype=torch.bool)
    worst = {"box_iou": 1.0, "score_diff": 0.0, "mask_iou": 1.0, "mask_pixels": 0, "pairs": 0}
    unpaired_ref = []
    for i in range(len(ref)):
        row = torch.where(free, iou[i], torch.full_like(iou[i], -1.0))
        j = int(row.argmax()) if len(got) else -1
        if j < 0 or row[j] < box_iou_min or abs(float(ref.scores[i] - got.scores[j])) > score_tol:
            unpaired_ref.append(i)
            continue
        free[j] = False
        worst["pairs"] += 1
        worst["box_iou"] = min(worst["box_iou"], float(row[j]))
        worst["score_diff"] = max(worst["score_diff"], abs(float(ref.scores[i] - got.scores[j])))
        if ref.masks is not None:
            a, b = ref.masks[i], got.masks[j]
            union, differ = int((a | b).sum()), int((a ^ b).sum())
            mask_iou = int((a & b).sum()) / union if union else 1.0
            # a pixel whose probability sits at the threshold within float noise may flip: on the 50-pixel masks
            # of small boxes that alone costs 2% IoU, so a mask may also differ by at most 2 pixels
            assert mask_iou >= mask_iou_min or differ <= 2, (i, j, mask_iou, differ)
            worst["mask_iou"] = min(worst["mask_iou"], mask_iou)
            worst["mask_pixels"] = max(worst["mask_pixels"], differ)
    for side, other, idx in ((ref, got, unpaired_ref), (got, ref, torch.nonzero(free).flatten().tolist())):
        for i in idx:
            score = float(side.scores[i])
            at_cut = len(side) == len(other) == max_per_img and score <= float(other.scores[-1]) + score_tol
            at_thr = score_thr is not None and abs(score - score_thr) <= score_tol
            assert at_cut or at_thr, f"detection {i} ({side.categories[i]} {float(side.scores[i]):.4f}, box " \
                           f"{side.boxes[i].tolist()}) has no counterpart"
    assert worst["pairs"] >= len(ref) - 2, worst
    return worst


@pytest.fixture(scope="module")
def tiny_model(tiny_seeded):
    return tiny_seeded


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_model, path, model_name=TINY)
    return path


# -------------------------------------------------------------------------------------------------- ops
def _random_boxes(n: int, generator: torch.Generator, extent: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * extent
    return torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * 60 + 0.5], dim=1)


class _BatchedNMS(nn.Module):
    """The heads' class-aware NMS (``post_processing.batched_nms``), which takes ``batched_nms_graph`` while
    exporting."""

    def forward(self, boxes, scores, groups):
        return batched_nms(boxes, scores, groups, 0.5, 300)


@pytest.mark.parametrize("n, ties", [(600, True), (SPLIT_THR + 200, False)])
def test_graph_nms_matches_batched_nms(n, ties):
    """Both of mmcv's paths (coordinate offsets below SPLIT_THR boxes, per-class NMS above), the traceable
    variant run eagerly and in ONNX Runtime; equal scores (first case) are taken in index order as PyTorch's
    stable sort does."""
    g = torch.Generator().manual_seed(n)
    boxes = _random_boxes(n, g)
    scores = torch.rand(n, generator=g)
    if ties:
        scores = (scores * 20).round() / 20  # many exact ties
    groups = torch.randint(0, 3, (n,), generator=g)
    expected = batched_nms(boxes, scores, groups, 0.5, 300)
    assert torch.equal(batched_nms_graph(boxes, scores, groups, 0.5, 300, SPLIT_THR), expected)
    half = n // 2  # another number of boxes through the same graph
    (got_full,), (got_half,) = run_onnx(_BatchedNMS(), (boxes, scores, groups),
                                        {"in0": {0: "n"}, "in1": {0: "n"}, "in2": {0: "n"}},
                                        [(boxes, scores, groups), (boxes[:half], scores[:half], groups[:half])])
    np.testing.assert_array_equal(got_full, expected.numpy())
    np.testing.assert_array_equal(got_half, batched_nms(boxes[:half], scores[:half], groups[:half], 0.5, 300).numpy())


class _RoIAlign(nn.Module):
    def forward(self, feats, boxes):
        return onnx_roi_align(feats, boxes, torch.zeros_like(boxes[:, 0], dtype=torch.long), 7, 0.25, 0)


def test_roi_align_matches_onnxruntime():
    """aligned=True, adaptive sampling (mmdet's setting), rois inside, across the border, tiny and empty."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 8, 30, 41, generator=g)
    boxes = _random_boxes(200, g, extent=170.0) - 10
    boxes[:3, 2:] = boxes[:3, :2]  # zero-size rois
    expected = roi_align(feats, torch.cat([torch.zeros(200, 1), boxes], 1), 7, 0.25, 0, True)
    (got,), (got_small,) = run_onnx(_RoIAlign(), (feats, boxes), {"in0": {2: "h", 3: "w"}, "in1": {0: "k"}},
                                    [(feats, boxes), (feats[..., :20, :25], boxes[:50])])
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    small = roi_align(feats[..., :20, :25].contiguous(), torch.cat([torch.zeros(50, 1), boxes[:50]], 1), 7, 0.25, 0, True)
    np.testing.assert_allclose(got_small, small.numpy(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ small detector
@pytest.mark.slow
def test_dynamic_graph_matches_predict(tiny_model, tiny_onnx):
    """One graph (traced at 320x320) on two real photos of other sizes and orientations, against predict."""
    detector = OnnxDetector(tiny_onnx, threads=1)
    assert detector.info.input_size is None and detector.info.with_mask and detector.model_name == TINY
    for photo in (PHOTO, OTHER_PHOTO):
        (ref,) = tiny_model.predict(str(photo))
        (got,) = detector.predict(str(photo))
        assert len(ref) > 20 and ref.masks.any()
        match_detections(ref, got, max_per_img=tiny_model.roi_head.test_cfg.max_per_img)
        (above,) = detector.predict(str(photo), score_thr=0.5)
        assert len(above) == int((got.scores >= 0.5).sum()) and (above.scores >= 0.5).all()


@pytest.mark.slow
def test_fixed_size_graph_matches_detect(tiny_model, tmp_path):
    """A fixed 256x320 input: images are padded to it, scaled down first when predict's size would not fit;
    the detections equal the model's on the same padded input."""
    from res2det.images import to_rgb_uint8

    path = export_onnx(tiny_model, tmp_path / "fixed.onnx", size=(256, 320))
    detector = OnnxDetector(path, threads=1)
    assert detector.info.input_size == (256, 320)
    assert detector.session.get_inputs()[0].shape == [1, 3, 256, 320]
    # predict resizes the 352x230 photo to 320x209 (fits; padded further than predict's 224) and the 480x640
    # portrait to 240x320, which is too high: 192x256 instead
    for photo, size in ((PHOTO, [209, 320]), (OTHER_PHOTO, [256, 192])):
        rgb = to_rgb_uint8(str(photo))
        x, scale = detection_input(rgb, tiny_model.preprocess, fit=(256, 320))
        assert list(x.shape[-2:]) == size
        with torch.no_grad():
            r = tiny_model.detect(pad_batch([x], size=(256, 320)), [tuple(size)], paste_masks=False)[0]
        boxes, scores, labels, masks = tiny_model.postprocess(r, scale_factor=scale, orig_size=rgb.shape[:2])
        ref = res2det.Detections(boxes=boxes, scores=scores, labels=labels, categories=[str(i) for i in labels.tolist()],
                                 masks=masks, width=rgb.shape[1], height=rgb.shape[0])
        (got,) = detector.predict(rgb)
        assert len(ref) > 20
        match_detections(ref, got, max_per_img=tiny_model.roi_head.test_cfg.max_per_img)


def test_graph_without_detections(tiny_model, tmp_path):
    """No (box, class) pair passes the score threshold: empty outputs of the right shapes, as predict's."""
    model = res2det.create_model(TINY, rcnn_test=dataclasses.replace(tiny_model.roi_head.test_cfg, score_thr=1.0))
    model.load_state_dict(tiny_model.state_dict())
    detector = OnnxDetector(export_onnx(model.eval(), tmp_path / "none.onnx"), threads=1)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    (got,), (ref,) = detector.predict(rgb), model.predict(rgb)
    assert len(ref) == len(got) == 0
    assert got.boxes.shape == (0, 4) and got.masks.shape == (0, 40, 50) and got.labels.dtype == torch.int64


# ------------------------------------------------------------------------------------------------- CLI
def _detections(record: dict) -> res2det.Detections:
    """A ``res2det infer --out`` record back as ``Detections`` (masks decoded from their RLE)."""
    from pycocotools import mask as mask_utils

    dets = record["detections"]
    masks = None
    if dets and "mask" in dets[0]:
        masks = torch.from_numpy(np.stack([mask_utils.decode({"size": d["mask"]["size"],
                                                               "counts": d["mask"]["counts"].encode("ascii")})
                                           for d in dets]).astype(bool))
    return res2det.Detections(boxes=torch.tensor([d["bbox"] for d in dets]).reshape(-1, 4),
                              scores=torch.tensor([d["score"] for d in dets]),
                              labels=torch.tensor([d["label"] for d in dets], dtype=torch.long),
                              categories=[d["category"] for d in dets], masks=masks, width=record["width"],
                              height=record["height"])


@pytest.fixture(scope="module")
def tiny_weights(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(tiny_model, path, model_name=TINY)
    return path


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
@pytest.mark.slow
def test_cli_export_then_infer_onnx_equals_infer(tiny_weights, tmp_path, capsys):
    onnx_path = tmp_path / "out" / "tiny.onnx"
    assert main(["export", TINY, "--weights", str(tiny_weights), "--out", str(onnx_path), "--dynamic"]) == 0
    out = capsys.readouterr().out
    assert f"exported {TINY} to {onnx_path}" in out and "opset 17" in out
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == ["tiny.onnx"]  # no temporary file left behind
    photos = [str(PHOTO), str(OTHER_PHOTO)]
    runs = {}
    for name, source in (("onnx", ["--onnx", str(onnx_path)]), ("torch", ["--model", TINY, "--weights", str(tiny_weights)])):
        json_path, draw = tmp_path / f"{name}.json", tmp_path / f"drawn_{name}"
        assert main(["infer", *source, *photos, "--score-thr", "0.2", "--out", str(json_path), "--draw", str(draw)]) == 0
        assert "warning" not in capsys.readouterr().err
        runs[name] = (json.loads(json_path.read_text()), draw)
    (onnx_records, onnx_draw), (torch_records, torch_draw) = runs["onnx"], runs["torch"]
    assert [(r["file"], r["width"], r["height"]) for r in onnx_records] == \
        [(r["file"], r["width"], r["height"]) for r in torch_records]
    for got, ref in zip(onnx_records, torch_records):
        assert len(ref["detections"]) > 10 and "mask" in ref["detections"][0]
        match_detections(_detections(ref), _detections(got), score_thr=0.2)
    from PIL import Image

    for photo in photos:
        with Image.open(onnx_draw / f"{Path(photo).stem}.png") as a, Image.open(torch_draw / f"{Path(photo).stem}.png") as b:
            assert a.size == b.size
            same = (np.asarray(a) == np.asarray(b)).all(axis=-1).mean()
            assert same > 0.99  # the same drawing up to a few mask pixels and box ends


def test_infer_onnx_with_a_fixed_size_graph(tiny_model, tmp_path, capsys):
    path = export_onnx(tiny_model, tmp_path / "fixed.onnx", size=(256, 320), model_name=TINY)
    assert main(["infer", "--onnx", str(path), "--model", TINY, str(OTHER_PHOTO), "--out", str(tmp_path / "d.json")]) == 0
    (record,) = json.loads((tmp_path / "d.json").read_text())
    assert (record["width"], record["height"]) == (480, 640) and record["detections"]
    assert all(0 <= d["bbox"][0] <= d["bbox"][2] <= 480 and 0 <= d["bbox"][1] <= d["bbox"][3] <= 640
               for d in record["detections"])


@pytest.mark.parametrize("args, message", [
    (["mask_rcnn_r2_101_fpn_1x_coco"], "unknown model 'mask_rcnn_r2_101_fpn_1x_coco'; did you mean"),
    (["res2net50_26w_4s"], "res2net50_26w_4s is a classification model; export needs a detector"),
    (["faster_rcnn_res2net50_vb_26w_4s_fpn_1x_coco"], "PaddleDetection-convention detectors"),
    ([TINY, "--weights", "{tmp}/missing.pth"], "{tmp}/missing.pth: checkpoint file not found"),
    ([TINY, "--size", "800x1000"], "the input size must be positive multiples of 32 (height x width), got 800x1000"),
    ([TINY, "--size", "0x320"], "height and width must lie in 16..8192"),
    ([TINY, "--size", "large"], "--size must be HEIGHTxWIDTH (e.g. 800x1333), got 'large'"),
    ([TINY, "--size", "320"], "--size must be HEIGHTxWIDTH"),
    ([TINY, "--size", "320x320", "--dynamic"], "give either --size HxW or --dynamic, not both"),
    ([TINY, "--out", "{tmp}"], "is a folder; --out takes the path of a file to write"),
])
def test_export_errors(args, message, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "m.onnx")]
    assert main(["export", *args]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in one_error_line(capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_infer_onnx_errors(tiny_onnx, tmp_path, capsys):
    photo = str(PHOTO)
    assert main(["infer", photo]) == 2
    assert "infer needs --model NAME (or --onnx FILE" in one_error_line(capsys)
    assert main(["infer", "--onnx", str(tmp_path / "none.onnx"), photo]) == 2
    assert one_error_line(capsys) == f"res2det: error: {tmp_path / 'none.onnx'}: ONNX file not found"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not a protobuf" * 50)
    assert main(["infer", "--onnx", str(junk), photo]) == 2
    assert f"{junk}: not a readable ONNX file" in one_error_line(capsys)
    plain = tmp_path / "plain.onnx"  # a valid ONNX file that `res2det export` did not write
    import onnx

    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=8), str(plain))
    assert main(["infer", "--onnx", str(plain), photo]) == 2
    assert f"{plain}: not an ONNX file written by `res2det export`" in one_error_line(capsys)
    assert main(["infer", "--onnx", str(tiny_onnx), "--weights", "w.pth", photo]) == 2
    assert "--weights does not apply with --onnx" in one_error_line(capsys)
    assert main(["infer", "--onnx", str(tiny_onnx), "--model", "mask_rcnn_r2_101_fpn_2x_coco", photo]) == 2
    assert f"this ONNX file holds '{TINY}', not 'mask_rcnn_r2_101_fpn_2x_coco'" in one_error_line(capsys)
    assert main(["infer", "--onnx", str(tiny_onnx), str(tmp_path / "no.jpg")]) == 2
    assert one_error_line(capsys) == f"res2det: error: {tmp_path / 'no.jpg'}: image file not found"
