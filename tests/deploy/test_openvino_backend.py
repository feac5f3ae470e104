"""``openvino_backend`` / ``res2det infer --backend openvino``: the exported graph in OpenVINO, checked and
cached as the ONNX Runtime backend; its precision hint and fallback; streams; a clear error where OpenVINO is
not installed; ``--fast``'s choice of path."""
from __future__ import annotations

import importlib.util
import json

import pytest

import res2det.inference as inference
from res2det.checkpoint import save_weights
from res2det.cli.main import main
from res2det.deploy import fast
from res2det.errors import Res2DetError

from conftest import PHOTO, one_error_line

TINY = "mask_rcnn_r2_tiny_fpn"
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
needs_nncf = pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
                                reason="openvino or nncf not installed")


@pytest.fixture(scope="module")
def tiny(tiny_seeded):
    return tiny_seeded


@pytest.fixture(scope="module")
def graph_root(tmp_path_factory):
    """One cache folder for the module: the graph is exported once, by the first test that needs it."""
    return tmp_path_factory.mktemp("openvino_graphs")


@pytest.mark.slow
@needs_openvino
def test_openvino_exported_once_checked_and_reused(tiny, graph_root, monkeypatch):
    tmp_path = graph_root
    import res2det.deploy.backend as backend
    from res2det.deploy import OpenVinoDetector, openvino_backend
    from test_onnx import OTHER_PHOTO, match_detections

    detector = openvino_backend(tiny, model_name=TINY, check_image=str(PHOTO), threads=1, root=tmp_path)
    (graph,) = tmp_path.glob("*.onnx")
    assert graph.with_suffix(".openvino.checked").is_file() and detector.precision == "fp32"
    assert str(detector.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    photos = [str(PHOTO), str(OTHER_PHOTO)]
    ref = tiny.predict(photos)
    match_detections(ref[1], detector.predict(photos[1])[0], max_per_img=tiny.roi_head.test_cfg.max_per_img)
    monkeypatch.setattr(backend, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    # two streams, both images handed over at once: the same detections as one by one
    again = openvino_backend(tiny, model_name=TINY, check_image=str(PHOTO), threads=2, streams=2, root=tmp_path)
    assert isinstance(again, OpenVinoDetector) and again.path == graph and again.streams == 2
    both = [det for _, _, det in again.iter_predict(photos, batch_size=2)]
    for r, got in zip(ref, both):
        match_detections(r, got, max_per_img=tiny.roi_head.test_cfg.max_per_img)


@pytest.mark.slow
@needs_openvino
def test_openvino_bf16_hint_only_where_native(tiny, graph_root, monkeypatch):
    tmp_path = graph_root
    from res2det.deploy import openvino_backend

    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.warns(inference.PrecisionFallback, match="no native bf16"):
        detector = openvino_backend(tiny, model_name=TINY, check_image=str(PHOTO), precision="bf16", root=tmp_path)
    assert detector.precision == "fp32"
    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    detector = openvino_backend(tiny, model_name=TINY, check_image=str(PHOTO), precision="bf16", root=tmp_path)
    assert detector.precision == "bf16"  # the hint given; OpenVINO computes f32 where the CPU has no bf16
    (got,) = detector.predict(str(PHOTO))
    assert len(got) > 0
    with pytest.raises(Res2DetError, match="OpenVINO backend runs in fp32, bf16 or int8, not fp16"):
        openvino_backend(tiny, model_name=TINY, check_image=str(PHOTO), precision="fp16", root=tmp_path)


@pytest.mark.slow
@needs_nncf
def test_openvino_int8_quantised_once_per_calibration_set_mask_head_kept_fp32(tiny, graph_root, monkeypatch):
    import nncf
    import openvino as ov

    from res2det.deploy import openvino_backend
    from test_onnx import OTHER_PHOTO

    photos = [str(PHOTO), str(OTHER_PHOTO)]
    detector = openvino_backend(tiny, model_name=TINY, check_image=photos[0], precision="int8", calibration=photos,
                                threads=1, root=graph_root)
    assert detector.precision == "int8" and detector.path.suffix == ".xml" and ".int8-" in detector.path.name
    graph = ov.Core().read_model(str(detector.path))
    quantised = {op.get_friendly_name() for op in graph.get_ops() if op.get_type_name() == "FakeQuantize"}
    convs = [op for op in graph.get_ops() if op.get_type_name() in ("Convolution", "MatMul")]
    fed = {c.get_friendly_name(): any(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                                      for i in c.inputs()) for c in convs}
    assert quantised and sum(fed.values()) > len(fed) // 2, fed  # most layers run in int8...
    assert not any(v for k, v in fed.items() if "mask_head" in k), fed  # ...not the mask head
    # the int8 graph is a fair copy of the fp32 one: its best detection and most of those scoring >= 0.3 are found
    # again (these random weights give near-tied scores: int8's accuracy is judged by AP on a trained model,
    # benchmarks/inference_ap.py; a broken quantisation finds next to none)
    (ref,), (got,) = tiny.predict(photos[1]), detector.predict(photos[1])
    from res2det.ops import box_iou

    top = ref.scores >= 0.3
    iou = box_iou(ref.boxes[top].float(), got.boxes.float())
    found = [bool(((iou[i] >= 0.5) & (got.labels == label)).any()) for i, label in enumerate(ref.labels[top])]
    assert found and found[0] and sum(found) >= 0.5 * len(found), (found[:10], sum(found), len(found))
    # cached: the same calibration images reuse the file; other ones make another
    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: pytest.fail("quantised again"))
    again = openvino_backend(tiny, model_name=TINY, check_image=photos[0], precision="int8", calibration=photos,
                             root=graph_root)
    assert again.path == detector.path
    with pytest.raises(BaseException, match="quantised again"):
        openvino_backend(tiny, model_name=TINY, check_image=photos[0], precision="int8", calibration=photos[:1],
                         root=graph_root)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_int8_needs_openvino_and_nncf_one_clear_line(tiny, capsys, monkeypatch):
    assert main(["infer", "--model", TINY, "--precision", "int8", str(PHOTO)]) == 2
    assert "--precision int8 is the OpenVINO backend's" in one_error_line(capsys)
    assert main(["infer", "--model", TINY, "--calibration", str(PHOTO), str(PHOTO)]) == 2
    assert "--calibration goes with --precision int8" in one_error_line(capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    from res2det.deploy.backend import check_precision

    with pytest.raises(Res2DetError, match=r"NNCF, which is not installed \(pip install 'res2det\[int8\]'\)"):
        check_precision("openvino", "int8")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_backend_openvino_without_openvino_is_one_clear_line(tiny, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert main(["infer", "--model", TINY, "--backend", "openvino", str(PHOTO)]) == 2
    assert one_error_line(capsys) == ("res2det: error: --backend openvino needs openvino, which is not installed "
                                      "(pip install 'res2det[openvino]')")
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # the runner itself: the same advice
    from res2det.deploy.runner import OpenVinoDetector

    with pytest.raises(Res2DetError, match=r"needs OpenVINO \(pip install 'res2det\[openvino\]'\)"):
        OpenVinoDetector(tmp_path / "x.onnx")


def test_fast_candidates_follow_the_cpu():
    assert fast.candidates(frozenset({"avx2", "amx_bf16"})) == ["openvino bf16", "openvino int8", "torch bf16",
                                                                 "openvino fp32", "onnxruntime fp32",
                                                                 "torch fp32 optimised"]
    assert fast.candidates(frozenset({"avx2"})) == ["openvino int8", "openvino fp32", "onnxruntime fp32",
                                                    "torch fp32 optimised"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_cli_fast_says_which_path_and_skips_one_that_lost_ap(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fast, "candidates", lambda: ["openvino fp32", "onnxruntime fp32", "torch fp32 optimised"])
    weights = tmp_path / "tiny.safetensors"
    save_weights(tiny, weights, model_name=TINY)
    args = ["infer", "--model", TINY, "--weights", str(weights), "--fast", str(PHOTO)]
    fast.record_ap_check({"openvino fp32": False, "onnxruntime fp32": True}, source="test")
    out = tmp_path / "fast.json"
    assert main(args + ["--out", str(out)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--fast: ")]
    assert len(said) == 1 and "openvino fp32: lost > 0.01 AP here" in said[0]
    expected = "onnxruntime fp32" if importlib.util.find_spec("onnxruntime") else "torch fp32 optimised"
    assert said[0].startswith(f"--fast: {expected} (fastest installed path")
    assert json.loads(out.read_text())[0]["detections"]
    assert main(args + ["--precision", "bf16"]) == 2
    assert "--fast chooses the backend and precision itself" in one_error_line(capsys)


@needs_openvino
def test_openvino_refuses_a_bad_or_foreign_file_in_one_line(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from res2det.deploy import OpenVinoDetector

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a graph")
    with pytest.raises(Res2DetError, match=f"{garbage}: not an ONNX file OpenVINO can read"):
        OpenVinoDetector(garbage)
    foreign = tmp_path / "foreign.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), foreign)
    with pytest.raises(Res2DetError, match="not an ONNX file written by `res2det export`"):
        OpenVinoDetector(foreign)
    with pytest.raises(Res2DetError, match="ONNX file not found"):
        OpenVinoDetector(tmp_path / "missing.onnx")


@pytest.mark.slow
def test_fast_takes_the_bf16_weights_when_openvino_is_missing(tiny, monkeypatch):
    def missing(runtime):
        raise Res2DetError(f"--backend {runtime} needs {runtime}, which is not installed")

    monkeypatch.setattr(inference, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(fast, "candidates", lambda: ["openvino bf16", "torch bf16", "torch fp32 optimised"])
    monkeypatch.setattr(fast, "require_runtime", missing)
    chosen, why = fast.fastest_path(tiny, model_name=TINY, example=str(PHOTO))
    assert chosen.inference_precision == "bf16"
    assert why.startswith("torch bf16 (fastest installed path within 0.01 AP of fp32 on ")
    assert why.endswith("skipped openvino bf16: --backend openvino needs openvino, which is not installed")
