"""``res2det.inference``: reduced precision and its fallback, background decoding, and ``res2det infer`` over
folders / globs with JSON-lines output that survives an interruption (``--resume``)."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import res2det.inference as inference
from res2det.checkpoint import save_weights
from res2det.cli.main import main
from res2det.errors import Res2DetError
from res2det.inference import PrecisionFallback, autocast_dtype
from res2det.models.detectors.two_stage import TwoStageDetector
from res2det.ops import box_iou

from conftest import PHOTO, SHARED, one_error_line

TINY = "mask_rcnn_r2_tiny_fpn"
VAL = SHARED / "data" / "tiny_coco" / "val2017"


@pytest.fixture(scope="module")
def tiny(tiny_seeded):
    return tiny_seeded


def _matched(ref, got, score_thr: float = 0.3) -> float:
    """The share of ``ref``'s detections scoring >= ``score_thr`` that ``got`` has (same label, IoU >= 0.5)."""
    keep = ref.scores >= score_thr
    hit = (box_iou(ref.boxes, got.boxes) >= 0.5) & (ref.labels[:, None] == got.labels[None])
    return float(hit[keep].any(1).float().mean())


# ---------------------------------------------------------------------------------------------- precision
def test_precision_falls_back_where_the_cpu_has_no_instructions(monkeypatch):
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx2", "f16c"}))
    for precision in ("bf16", "fp16"):
        with pytest.warns(PrecisionFallback, match=f"no native {precision} instructions"):
            assert autocast_dtype(precision, "cpu") is None
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx512_bf16", "amx_fp16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_dtype("bf16", "cpu") == torch.bfloat16 and autocast_dtype("fp16", "cpu") == torch.float16
        assert autocast_dtype("fp32", "cpu") is None
    with pytest.raises(Res2DetError, match="precision must be one of fp32, bf16, fp16, got 'int8'"):
        autocast_dtype("int8", "cpu")


@pytest.mark.parametrize("precision, least", [("bf16", 0.85), ("fp16", 0.9)])
def test_reduced_precision_keeps_most_detections(tiny, precision, least, monkeypatch):
    """Forced on (emulated where the CPU lacks the instructions): the outputs stay fp32 and most confident
    detections of the fp32 path are found again (random weights have no score margins, so not all; a trained
    model's AP is the real judge: README)."""
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_fp16"}))
    (ref,) = tiny.predict(str(PHOTO))
    (got,) = tiny.predict(str(PHOTO), precision=precision)
    assert got.boxes.dtype == got.scores.dtype == torch.float32 and got.masks is not None
    assert (ref.scores >= 0.3).sum() > 20
    assert _matched(ref, got) >= least


def test_cli_precision_fallback_is_one_warning_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset())
    weights = tmp_path / "tiny.safetensors"
    save_weights(tiny, weights, model_name=TINY)
    assert main(["infer", "--model", TINY, "--weights", str(weights), "--precision", "bf16", str(PHOTO)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("res2det: warning: this CPU has no native bf16") for line in err) == 1, err
    assert not any("PrecisionFallback" in line or ".py:" in line for line in err)


@pytest.mark.slow
def test_cli_bf16_runs_the_converted_weights_where_native(tiny, tmp_path, monkeypatch):
    """Where the CPU has bf16, ``--precision bf16`` converts the weights once (``optimize_for_inference``)."""
    import res2det.optimize as optimize

    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    forms, real = [], optimize.optimize_for_inference

    def spy(*args, **kwargs):
        form = real(*args, **kwargs)
        if kwargs.get("precision") == "bf16":
            forms.append(form)
        return form

    monkeypatch.setattr(optimize, "optimize_for_inference", spy)
    weights, out = tmp_path / "tiny.safetensors", tmp_path / "out.json"
    save_weights(tiny, weights, model_name=TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionFallback)
        assert main(["infer", "--model", TINY, "--weights", str(weights), "--precision", "bf16", str(PHOTO),
                     "--out", str(out)]) == 0
    assert len(forms) == 1 and forms[0].inference_precision == "bf16"
    (record,) = json.loads(out.read_text())
    assert len(record["detections"]) > 20


# --------------------------------------------------------------------------------------- background decoding
def test_workers_give_the_same_detections(tiny):
    photos = [str(p) for p in sorted(VAL.glob("*.jpg"))[:3]]
    ref = tiny.predict(photos)
    got = [det for _, _, det in tiny.iter_predict(photos, num_workers=2)]
    for a, b in zip(ref, got):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.masks, b.masks)
    assert not tiny.training


def test_unreadable_image_in_a_worker_is_one_error(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(Res2DetError) as e:
        list(tiny.iter_predict([str(PHOTO), str(bad)], num_workers=1))
    assert str(e.value).startswith(f"{bad}: not a readable image") and "Traceback" not in str(e.value)


# ---------------------------------------------------------------------------------- res2det infer on folders
@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for p in sorted(VAL.glob("*.jpg"))[:3]:
        shutil.copy(p, d / p.name)
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture()
def tiny_weights(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_weights(tiny, path, model_name=TINY)
    return str(path)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_folder_and_glob_to_json_lines(folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "dets.jsonl"
    assert main(["infer", "--model", TINY, "--weights", tiny_weights, str(folder), "--workers", "1",
                 "--out", str(out)]) == 0
    records = _lines(out)
    assert [r["file"] for r in records] == sorted(str(p) for p in folder.glob("*.jpg"))
    assert "3 image(s) in" in capsys.readouterr().out
    out2 = tmp_path / "glob.jsonl"
    assert main(["infer", "--model", TINY, "--weights", tiny_weights, str(folder / "*.jpg"), "--out", str(out2)]) == 0
    assert _lines(out2) == records
    assert main(["infer", "--model", TINY, str(folder / "*.png")]) == 2
    assert f"{folder / '*.png'}: no image files match" in one_error_line(capsys)


def test_interrupted_run_resumes_without_losing_lines(folder, tiny_weights, tmp_path, monkeypatch):
    out = tmp_path / "dets.jsonl"
    args = ["infer", "--model", TINY, "--weights", tiny_weights, str(folder), "--out", str(out)]
    assert main(args) == 0
    full = _lines(out)
    original = TwoStageDetector.iter_predict

    def interrupted(self, *a, **k):  # the run is killed while the second image is being detected
        for n, item in enumerate(original(self, *a, **k)):
            if n == 1:
                raise KeyboardInterrupt
            yield item

    out.unlink()
    monkeypatch.setattr(TwoStageDetector, "iter_predict", interrupted)
    assert main(args) == 130  # one line, no traceback (issue #24)
    assert _lines(out) == full[:1]  # the first image's line is on disk
    with open(out, "a") as f:
        f.write('{"file": "cut sh')  # a line the kill cut short
    monkeypatch.setattr(TwoStageDetector, "iter_predict", original)
    assert main(args + ["--resume"]) == 0
    assert _lines(out) == full


@pytest.mark.slow
def test_optimized_infer_agrees_and_measures_once(folder, tiny_weights, tmp_path, capsys, monkeypatch):
    """``infer --optimize``: the same detections within float rounding; the kernel plan is measured by the first
    run only."""
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path / "cache"))
    exact, fast = tmp_path / "exact.jsonl", tmp_path / "fast.jsonl"
    args = ["infer", "--model", TINY, "--weights", tiny_weights, str(folder)]
    assert main(args + ["--out", str(exact)]) == 0
    assert main(args + ["--out", str(fast), "--optimize"]) == 0
    assert "--optimize: kernel plan measured in" in capsys.readouterr().out
    for a, b in zip(_lines(exact), _lines(fast), strict=True):
        da, db = a["detections"], b["detections"]
        assert [d["label"] for d in da] == [d["label"] for d in db] and da
        torch.testing.assert_close(torch.tensor([d["bbox"] for d in db]), torch.tensor([d["bbox"] for d in da]),
                                   rtol=0, atol=0.01)  # px; BN folding and other kernels reorder float sums
        torch.testing.assert_close(torch.tensor([d["score"] for d in db]), torch.tensor([d["score"] for d in da]),
                                   rtol=0, atol=1e-4)
    assert main(args + ["--out", str(fast), "--optimize"]) == 0
    assert "--optimize: kernel plan from " in capsys.readouterr().out
    assert main(args + ["--optimize", "--precision", "bf16"]) == 2
    assert "--optimize is the fp32 PyTorch path's" in one_error_line(capsys)


def test_resume_needs_json_lines(folder, tmp_path, capsys):
    assert main(["infer", "--model", TINY, str(folder), "--out", str(tmp_path / "d.json"), "--resume"]) == 2
    assert "--resume continues a JSON-lines --out FILE.jsonl" in one_error_line(capsys)
    assert main(["infer", "--model", TINY, str(folder), "--workers", "-1"]) == 2
    assert "--workers must be 0 or more" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------ COCO results
SHAPE_CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    from res2det.data import shapes_splits

    return shapes_splits(tmp_path_factory.mktemp("shapes"), num_train=1, num_val=4, image_size=96)


@pytest.fixture()
def shapes_weights(tiny, tmp_path):
    path = tmp_path / "shapes.safetensors"
    save_weights(tiny, path, model_name=TINY, options={"class_names": list(SHAPE_CLASSES)})
    return str(path)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_coco_json_evaluates_as_res2det_test_does(shapes_val, shapes_weights, tmp_path, capsys, monkeypatch):
    """`infer --coco-json P --ann A`: COCO results files whose AP equals the evaluator's (`res2det test`) on the
    same images (the same pre-processing and post-processing), and that an interrupted, resumed run rebuilds
    whole."""
    import res2det
    from res2det.data import CocoDataset
    from res2det.evaluation.coco_eval import coco_evaluate
    from res2det.evaluation.evaluator import evaluate_model

    prefix, out = tmp_path / "res", tmp_path / "dets.jsonl"
    args = ["infer", "--model", TINY, "--weights", shapes_weights, str(shapes_val.val_dir), "--out", str(out),
            "--coco-json", str(prefix), "--ann", str(shapes_val.val_ann)]
    assert main(args) == 0
    assert f"COCO results written to {prefix}.segm.json" in capsys.readouterr().out
    bbox = json.loads((tmp_path / "res.bbox.json").read_text())
    segm = json.loads((tmp_path / "res.segm.json").read_text())
    records = _lines(out)
    assert len(bbox) == len(segm) == sum(len(r["detections"]) for r in records) > 0
    assert {b["category_id"] for b in bbox} <= {1, 2, 3} and {b["image_id"] for b in bbox} <= {1, 2, 3, 4}

    model = res2det.create_model(TINY, weights=shapes_weights)
    dataset = CocoDataset(shapes_val.val_ann, shapes_val.val_dir, train=False, preprocess=model.preprocess)
    expected = evaluate_model(model, dataset, progress=False)
    for kind, results in (("bbox", bbox), ("segm", segm)):
        got = coco_evaluate(dataset.coco, results, kind).metrics
        assert got[f"{kind}_AP"] == pytest.approx(expected[f"{kind}_AP"], abs=1e-6)
        assert got[f"{kind}_AP50"] == pytest.approx(expected[f"{kind}_AP50"], abs=1e-6)

    original = TwoStageDetector.iter_predict

    def interrupted(self, *a, **k):  # killed while the third image runs
        for n, item in enumerate(original(self, *a, **k)):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    for f in (out, tmp_path / "res.bbox.json", tmp_path / "res.segm.json"):
        f.unlink()
    monkeypatch.setattr(TwoStageDetector, "iter_predict", interrupted)
    assert main(args) == 130  # one line, no traceback (issue #24)
    monkeypatch.setattr(TwoStageDetector, "iter_predict", original)
    assert main(args + ["--resume"]) == 0
    assert json.loads((tmp_path / "res.bbox.json").read_text()) == bbox


def test_coco_ids_from_file_names_or_annotations(shapes_val, shapes_weights, tmp_path, capsys):
    from res2det.cli.main import _coco_ids
    from res2det.zoo.mmdetection import COCO_CATEGORY_IDS, COCO_CLASSES

    image_ids, cat_ids = _coco_ids(None, ["val/000000397133.jpg"], COCO_CLASSES)
    assert image_ids == {"val/000000397133.jpg": 397133} and cat_ids == list(COCO_CATEGORY_IDS)
    image_ids, cat_ids = _coco_ids(str(shapes_val.val_ann), ["elsewhere/000002.png"], SHAPE_CLASSES[::-1])
    assert image_ids == {"elsewhere/000002.png": 2} and cat_ids == [3, 2, 1]  # by name, not by position
    with pytest.raises(Res2DetError, match="photo.jpg: --coco-json needs an image id"):
        _coco_ids(None, ["photo.jpg"], COCO_CLASSES)
    with pytest.raises(Res2DetError, match="not COCO's; pass --ann"):
        _coco_ids(None, ["000001.png"], SHAPE_CLASSES)
    with pytest.raises(Res2DetError, match="no category named 'hexagon'"):
        _coco_ids(str(shapes_val.val_ann), [str(shapes_val.val_dir / "000001.png")], ("circle", "hexagon", "x"))
    stray = tmp_path / "999999.png"
    shutil.copy(shapes_val.val_dir / "000001.png", stray)
    base = ["infer", "--model", TINY, "--weights", shapes_weights, str(stray), "--coco-json", str(tmp_path / "r")]
    assert main(base + ["--ann", str(shapes_val.val_ann)]) == 2
    assert "999999.png: not an image of" in one_error_line(capsys)
    assert main(["infer", "--model", TINY, str(stray), "--ann", str(shapes_val.val_ann)]) == 2
    assert "--ann goes with --coco-json" in one_error_line(capsys)
    assert not list(tmp_path.glob("r.*.json"))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
@pytest.mark.slow
def test_optimized_test_gives_the_same_ap(shapes_val, shapes_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path / "cache"))
    args = ["test", "shapes", "--data", str(shapes_val.val_dir.parent), "--weights", shapes_weights]
    metrics = []
    for extra in ([], ["--optimize"]):
        out = tmp_path / f"runs{len(extra)}"
        assert main(args + ["--out", str(out)] + extra) == 0
        metrics.append(json.loads(next(out.glob("*/metrics.json")).read_text()))
    assert "--optimize: kernel plan measured in" in capsys.readouterr().out
    assert metrics[0].keys() == metrics[1].keys() and "segm_AP" in metrics[0]
    for key, value in metrics[0].items():
        assert metrics[1][key] == pytest.approx(value, abs=0.005), key
