"""``onnx_backend`` / ``res2det infer --backend onnxruntime``: exported once into the cache, checked against
PyTorch before it is kept, reused afterwards; a graph that disagrees is refused and not kept."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

import res2det  # noqa: E402
import res2det.deploy.backend as backend  # noqa: E402
from res2det.checkpoint import save_weights  # noqa: E402
from res2det.cli.main import main  # noqa: E402
from res2det.deploy import OnnxDetector, onnx_backend  # noqa: E402
from res2det.errors import Res2DetError  # noqa: E402

from conftest import PHOTO, one_error_line  # noqa: E402
from test_onnx import OTHER_PHOTO, TINY, match_detections  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_seeded):
    return tiny_seeded


@pytest.mark.slow
def test_exported_once_checked_and_reused(tiny, tmp_path, monkeypatch):
    detector = onnx_backend(tiny, model_name=TINY, check_image=str(PHOTO), threads=1, root=tmp_path)
    (graph,) = tmp_path.glob("*.onnx")
    assert graph.name.startswith(TINY) and graph.with_suffix(".checked").is_file()
    for photo in (PHOTO, OTHER_PHOTO):  # the same detections as PyTorch, also on another image
        (ref,), (got,) = tiny.predict(str(photo)), detector.predict(str(photo))
        match_detections(ref, got, max_per_img=tiny.roi_head.test_cfg.max_per_img)
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    again = onnx_backend(tiny, model_name=TINY, check_image=str(PHOTO), root=tmp_path)
    assert isinstance(again, OnnxDetector) and again.path == graph


def test_other_weights_or_settings_get_their_own_graph(tiny):
    other = res2det.create_model(TINY).eval()
    other.load_state_dict(tiny.state_dict())
    assert backend.graph_key(other, TINY) == backend.graph_key(tiny, TINY)
    other.roi_head.test_cfg = type(other.roi_head.test_cfg)(score_thr=0.3)
    assert backend.graph_key(other, TINY) != backend.graph_key(tiny, TINY)
    other.load_state_dict(tiny.state_dict())
    next(other.parameters()).data[0] += 1e-3
    other.roi_head.test_cfg = tiny.roi_head.test_cfg
    assert backend.graph_key(other, TINY) != backend.graph_key(tiny, TINY)


def test_a_graph_that_disagrees_is_refused_and_not_kept(tiny, tmp_path, monkeypatch):
    real = OnnxDetector.predict
    monkeypatch.setattr(OnnxDetector, "predict", lambda self, images, **k: [d.select(d.scores < 0.9)
                                                                            for d in real(self, images, **k)])
    with pytest.raises(Res2DetError, match=f"disagrees with PyTorch on {PHOTO} .*has no counterpart"):
        onnx_backend(tiny, model_name=TINY, check_image=str(PHOTO), root=tmp_path)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.checked"))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
@pytest.mark.slow
def test_cli_backend_onnxruntime_equals_torch(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "tiny.safetensors"
    save_weights(tiny, weights, model_name=TINY)
    runs = {}
    for backend_name in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend_name}.json"
        assert main(["infer", "--model", TINY, "--weights", str(weights), "--backend", backend_name, str(PHOTO),
                     str(OTHER_PHOTO), "--score-thr", "0.2", "--out", str(out)]) == 0
        runs[backend_name] = json.loads(out.read_text())
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    from test_onnx import _detections

    for ref, got in zip(runs["torch"], runs["onnxruntime"]):
        assert len(ref["detections"]) > 10
        match_detections(_detections(ref), _detections(got), score_thr=0.2)
    assert main(["infer", "--model", TINY, "--backend", "onnxruntime", "--precision", "bf16", str(PHOTO)]) == 2
    assert "ONNX Runtime runs the graph in fp32" in one_error_line(capsys)
