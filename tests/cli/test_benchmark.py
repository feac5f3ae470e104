"""`res2det benchmark`, `res2det zoo` and benchmarks/train.py, at tiny sizes (the real figures come from the
commands in docs/model-zoo.md, never from timed assertions here)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import res2det
from res2det.cli.benchmark import ZOO_MARKER, rewrite_block, zoo_markdown
from res2det.cli.common import parse_size
from res2det.profiling import build_model, make_input
from res2det.cli.main import main
from res2det.errors import Res2DetError
from res2det.utils.complexity import count_macs, count_params
from res2det.zoo import MODELS, get_spec

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER = "res2net50_14w_8s"
TINY = "mask_rcnn_r2_tiny_fpn"
FAST = ["--warmup", "0", "--repeats", "2", "--no-progress"]


def _env(tmp_path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", RES2DET_CACHE=str(tmp_path / "cache"))
    return env


def test_parse_size():
    assert parse_size("800x1333") == (800, 1333)  # HEIGHTxWIDTH everywhere, as tensors are
    assert parse_size("224") == (224, 224)
    for bad in ("1333*800", "x800", "10x10", "abc", "800x"):
        with pytest.raises(Res2DetError):
            parse_size(bad)
    with pytest.raises(Res2DetError, match="multiples of 32"):
        parse_size("800x1333", multiple_of=32)


@pytest.mark.slow
def test_classifier_json(tmp_path):
    out = tmp_path / "r.json"
    assert main(["benchmark", CLASSIFIER, "--size", "48x64", "--batch", "2", "--train", "--json", str(out), *FAST]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["dtype"] == "fp32"
    (r,) = data["results"]
    model = res2det.create_model(CLASSIFIER)
    assert r["params"] == count_params(model)
    assert r["gflops"] * 1e9 == count_macs(model, torch.zeros(1, 3, 48, 64))
    assert r["input_shape"] == [2, 3, 48, 64] and r["size"] == [48, 64]
    assert len(r["latency_ms_runs"]) == 2 and r["latency_ms"] == pytest.approx(statistics.median(r["latency_ms_runs"]))
    assert r["fps"] == pytest.approx(2 * 1000 / r["latency_ms"])
    assert r["peak_memory_mb"] > 0 and r["optimize"] == "fuse"
    t = r["train"]
    assert t["step_ms"] > 0 and t["images_per_s"] == pytest.approx(2 * 1000 / t["step_ms"])
    assert t["peak_memory_mb"] > 0 and all(math.isfinite(v) for v in t["losses"].values())


def test_detector_full_load_and_train(tmp_path):
    """GFLOPs are count_macs of the full-load model on the padded input; the heads see max_per_img detections."""
    out = tmp_path / "r.json"
    assert main(["benchmark", TINY, "--size", "50x70", "--train", "--optimize", "none", "--json", str(out),
                 *FAST]) == 0
    (r,) = json.loads(out.read_text())["results"]
    spec = get_spec(TINY)
    assert r["input_shape"] == [1, 3, 64, 96]  # 50x70 padded to a multiple of 32
    assert r["detections_per_image"] == [spec.config.roi_head.rcnn_test.max_per_img]
    assert 0 < r["proposals_per_image"][0] <= spec.config.rpn.test_proposals.max_per_img
    model = build_model(TINY)  # the benchmark's own model: seed 0, full load, PyTorch's default init
    x, sizes = make_input(spec, (50, 70), 1, "cpu")
    assert round(r["gflops"] * 1e9) == count_macs(model, x, sizes)
    assert r["params"] == count_params(model)
    assert set(r["train"]["losses"]) >= {"loss_rpn_cls", "loss_cls", "loss_bbox", "loss_mask"}
    assert r["train"]["step_ms"] > 0


def test_precision_runs_what_predict_would(tmp_path, capsys):
    """`--precision bf16` autocasts where the CPU has bf16 instructions; elsewhere it times fp32 and says so
    (one warning line), and the JSON records both what was asked and what ran."""
    import warnings

    from res2det.inference import PrecisionFallback, autocast_dtype

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = "fp32" if autocast_dtype("bf16", "cpu") is None else "bf16"
    out = tmp_path / "r.json"
    assert main(["benchmark", CLASSIFIER, "--size", "48x64", "--precision", "bf16", "--train", "--json", str(out),
                 *FAST]) == 0
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert (r["precision"], r["dtype"]) == ("bf16", expected) and data["meta"]["dtype"] == expected
    assert r["train"]["step_ms"] > 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "no native bf16" in line]
    assert len(warned) == (expected == "fp32") * 1 == len([w for w in caught if w.category is PrecisionFallback])


@pytest.mark.parametrize("argv, message", [
    (["benchmark", "res2net_nope"], "unknown model"),
    (["benchmark", CLASSIFIER, "--size", "64by64"], "--size"),
    (["benchmark", CLASSIFIER, "--batch", "0"], "--batch"),
    (["benchmark", "--merge", "missing.json"], "missing.json"),
    (["benchmark"], "exactly one of"),
])
def test_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    assert main(["benchmark", CLASSIFIER, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err


def test_zoo_lists_every_model(capsys):
    assert main(["zoo", "--no-measure"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, spec in MODELS.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert spec.origin in row
        for pw in spec.weights[:1] + spec.other_releases[:1]:
            assert pw.filename in out and pw.url in out
        if not spec.weights and not spec.other_releases:
            assert "no weights released" in row
    assert "mmdet: box AP 43.6, mask AP 38.7; train mem 7.9 GB" in out
    assert "paddle-static: box AP 43.5, mask AP 38.4; 14.478 fps (V100, batch 1)" in out
    assert "mmdet: box AP 43.0; train mem 7.4 GB" in out
    assert "official: top-1 79.19" in out and "torchvision: top-1 76.13" in out


def test_zoo_measures_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path))
    assert main(["zoo", CLASSIFIER]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    model = res2det.create_model(CLASSIFIER)
    assert f"{count_params(model) / 1e6:.2f}" in row
    assert f"{count_macs(model, torch.zeros(1, 3, 224, 224)) / 1e9:.1f} @224x224" in row
    cache = json.loads((tmp_path / "complexity.json").read_text())
    assert cache["models"][f"{CLASSIFIER}|224x224"][0] == count_params(model)
    assert main(["zoo", CLASSIFIER]) == 0  # from the cache now
    assert capsys.readouterr().out.splitlines()[2] == row


def test_rewrite_block_touches_only_the_marked_block(tmp_path):
    readme = ROOT / "docs" / "model-zoo.md"
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- {ZOO_MARKER}:start -->", f"<!-- {ZOO_MARKER}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    copy = tmp_path / "model-zoo.md"
    copy.write_text(text, encoding="utf-8")
    rewrite_block(copy, ZOO_MARKER, "| new | table |")
    new = copy.read_text(encoding="utf-8")
    assert new.startswith(text[: text.index(start) + len(start)])
    assert new.endswith(text[text.index(end):])
    assert new[new.index(start): new.index(end)] == f"{start}\n| new | table |\n"
    copy.write_text("no markers here", encoding="utf-8")
    with pytest.raises(Res2DetError, match="needs exactly one"):
        rewrite_block(copy, ZOO_MARKER, "x")


@pytest.mark.slow
def test_all_subset_writes_json_and_readme(tmp_path):
    """--all runs each model in a fresh process; the page's zoo-table block gets one row per model."""
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nbefore\n<!-- {ZOO_MARKER}:start -->\nold\n<!-- {ZOO_MARKER}:end -->\nafter\n")
    out = tmp_path / "all.json"
    proc = subprocess.run([sys.executable, "-m", "res2det.cli.main", "benchmark", "--all", "--models", CLASSIFIER,
                           TINY, "--size", "64x64", "--readme", str(readme), "--json", str(out), *FAST],
                          env=_env(tmp_path), capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["results"]] == [CLASSIFIER, TINY]
    assert data["results"][0]["size"] == [224, 224] and data["results"][1]["size"] == [64, 64]
    text = readme.read_text()
    assert text.startswith("# title\nbefore\n") and text.endswith(f"<!-- {ZOO_MARKER}:end -->\nafter\n")
    assert "old" not in text and f"| `{CLASSIFIER}` |" in text and f"| `{TINY}` |" in text
    assert "CPU fp32: ms / fps / peak MiB" in text and "[1/2]" in proc.stderr


def _run(device: str, dtype: str, model: str, latency: float) -> dict:
    meta = dict(device=device, device_name="dev", precision=dtype, dtype=dtype, threads=2, torch="2", res2det="0",
                cuda="12" if device == "cuda" else None, date="2026-01-01", batch=1, optimize="fuse", warmup=1,
                repeats=3)
    result = dict(meta, model=model, task="classification", size=[224, 224], params_m=25.0, gflops=4.2,
                  latency_ms=latency, fps=1000 / latency, peak_memory_mb=300.0)
    return {"meta": meta, "results": [result]}


def test_merge_puts_runs_side_by_side(tmp_path, capsys):
    runs = [_run("cpu", "fp32", CLASSIFIER, 90.0), _run("cuda", "fp16", CLASSIFIER, 4.0)]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(run))
    table = zoo_markdown(runs)
    row = next(line for line in table.splitlines() if line.startswith(f"| `{CLASSIFIER}`"))
    assert "90.0 / 11.11 / 300" in row and "4.0 / 250.00 / 300" in row
    assert "CPU fp32: ms / fps / peak MiB | GPU fp16 AMP: ms / fps / peak MiB" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n<!-- {ZOO_MARKER}:start -->\n<!-- {ZOO_MARKER}:end -->\nb\n")
    assert main(["benchmark", "--merge", *map(str, paths), "--readme", str(readme)]) == 0
    assert row in readme.read_text()


_NO_PYCOCOTOOLS = "import sys, runpy; sys.modules['pycocotools'] = None\n"


@pytest.mark.parametrize("entry", ["res2det.cli.main benchmark"])
def test_benchmark_runs_without_pycocotools(entry, tmp_path):
    """The GPU images have no pycocotools: `res2det benchmark` (and what --all runs per model) must not need it."""
    module, *sub = entry.split()
    args = [*sub, CLASSIFIER, "--size", "32", "--warmup", "0", "--repeats", "1", "--no-progress"]
    code = _NO_PYCOCOTOOLS + f"sys.argv = ['res2det', *{args!r}]\nrunpy.run_module({module!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert CLASSIFIER in proc.stdout


def test_benchmark_scripts_import_without_pycocotools(tmp_path):
    code = _NO_PYCOCOTOOLS + "\n".join(
        f"sys.argv = ['x', '--help']\ntry:\n    runpy.run_path({str(ROOT / 'benchmarks' / name)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code" for name in ("backbone.py", "detector.py", "train.py"))
    proc = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_train_script(tmp_path):
    out, readme = tmp_path / "train.json", tmp_path / "README.md"
    readme.write_text("x\n<!-- train-table:start -->\n<!-- train-table:end -->\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train.py"), "--models", TINY, "--size", "64x64",
                           "--warmup", "0", "--repeats", "1", "--json", str(out), "--readme", str(readme)],
                          env=_env(tmp_path), capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    t = r["train"]
    assert r["model"] == TINY and "latency_ms" not in r  # --train-only
    assert t["images_per_s"] == pytest.approx(t["batch"] * 1000 / t["step_ms"]) and t["peak_memory_mb"] > 0
    assert f"| `{TINY}` | CPU fp32 | 1 | 64x64 |" in readme.read_text()
