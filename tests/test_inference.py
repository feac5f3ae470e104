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
    assert any(line.startswith("res2det: warning: this CPU has no native bf16") for line in err), err
    assert not any("PrecisionFallback" in line or ".py:" in line for line in err)


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
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert _lines(out) == full[:1]  # the first image's line is on disk
    with open(out, "a") as f:
        f.write('{"file": "cut sh')  # a line the kill cut short
    monkeypatch.setattr(TwoStageDetector, "iter_predict", original)
    assert main(args + ["--resume"]) == 0
    assert _lines(out) == full


def test_resume_needs_json_lines(folder, tmp_path, capsys):
    assert main(["infer", "--model", TINY, str(folder), "--out", str(tmp_path / "d.json"), "--resume"]) == 2
    assert "--resume continues a JSON-lines --out FILE.jsonl" in one_error_line(capsys)
    assert main(["infer", "--model", TINY, str(folder), "--workers", "-1"]) == 2
    assert "--workers must be 0 or more" in one_error_line(capsys)
