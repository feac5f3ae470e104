"""``fastest_path``: the fastest inference path installed here whose AP stays within 0.01 of fp32 (``infer
--fast``), decided by rules from measurements (docs/fast-inference.md), not by timing on the user's images.

The rules, fastest first:

* CPUs with native bf16 (avx512_bf16 / amx_bf16): OpenVINO in bf16 (res2det's own graph; 0.41 s against 1.75
  in fp32 for the R2-101 graph on a 2-core AMX Xeon).
* Every CPU: OpenVINO int8 (the graph quantised by NNCF, mask heads f32; where NNCF is installed): the R2-101
  ``predict`` 2.11x-2.27x fp32 eager on a 2-core AVX2 EPYC, 1.66x OpenVINO fp32 in the same run (on the AMX
  Xeon that would put it at about 1 s or less, ahead of the next path's 2.5x-eager target of 1.4 s); main-job AP
  +0.0008 box / -0.0001 mask.
* CPUs with native bf16: PyTorch with bf16 weights (``optimize_for_inference(precision='bf16')``); on the
  main-job model the bf16 weight form moves AP by +0.007 box / +0.007 mask (benchmarks/inference_ap.py).
* Every CPU, fp32 (outputs within float rounding of the exact path, so the same AP): OpenVINO, then ONNX
  Runtime, then PyTorch's ``--optimize`` path, in the order ``benchmarks/inference.py`` measured them.

A path ``benchmarks/inference_ap.py`` found losing more than 0.01 AP on this machine (kept in
``excluded_file()``) is skipped, as is a runtime that is not installed, a graph the model cannot be exported
to (PaddleDetection rows) or one that disagrees with PyTorch on the first image.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from ..checkpoint import atomic_write, cache_dir
from ..errors import Res2DetError
from ..images import ImageLike
from ..machine import cpu_name, native_cpu_precision, speed_flags
from ..models.detectors.two_stage import TwoStageDetector
from .backend import RUNTIMES, graph_backend, require_runtime

# fastest first (docs/fast-inference.md has the measurements); the bf16 ones only where bf16 is native
PATHS = ("openvino bf16", "openvino int8", "torch bf16", "openvino fp32", "onnxruntime fp32", "torch fp32 optimised")


def excluded_file() -> Path:
    """Where ``benchmarks/inference_ap.py`` records, per machine, the paths that lost more than 0.01 AP."""
    key = json.dumps(dict(cpu=cpu_name(), flags=speed_flags()), sort_keys=True)
    return cache_dir() / "fast_paths" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def record_ap_check(rows: dict[str, bool], *, source: str) -> Path:
    """Keep which paths (``candidates()`` names) stayed within 0.01 AP of fp32 on this machine (``True``)."""
    path = excluded_file()
    text = json.dumps(dict(cpu=cpu_name(), flags=speed_flags(), source=source,
                           excluded=sorted(name for name, offered in rows.items() if not offered)), indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def _excluded() -> set[str]:
    try:
        return set(json.loads(excluded_file().read_text())["excluded"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def candidates(flags: frozenset[str] | None = None) -> list[str]:
    """The paths in the order ``fastest_path`` tries them on a CPU with ``flags`` (default: this one)."""
    native_bf16 = native_cpu_precision("bf16", flags)
    return [name for name in PATHS if native_bf16 or "bf16" not in name]


def fastest_path(model: TwoStageDetector, *, model_name: str, example: ImageLike, root: str | None = None,
                 calibration: Sequence[ImageLike] | None = None) -> tuple[object, str]:
    """``(detector, one line saying which path and why)``: the first of ``candidates()`` that is installed,
    not excluded by an AP check on this machine, and builds (graphs: exported and checked on ``example``
    once, cached; int8: quantised on ``calibration``, default ``[example]``)."""
    from ..optimize import optimize_for_inference

    excluded, skipped = _excluded(), []
    for name in candidates():
        runtime, precision = name.split()[:2]
        if name in excluded:
            skipped.append(f"{name}: lost > 0.01 AP here ({excluded_file()})")
            continue
        try:
            if runtime in RUNTIMES:
                require_runtime(runtime)
                chosen = graph_backend(model, model_name=model_name, check_image=example, runtime=runtime,
                                       precision=precision, root=root, calibration=calibration)
            elif precision == "bf16":
                chosen = optimize_for_inference(model, example, precision="bf16")
            else:
                chosen = optimize_for_inference(model, example)
        except Res2DetError as e:
            skipped.append(f"{name}: {e}")
            continue
        why = f"{name} (fastest installed path within 0.01 AP of fp32 on {cpu_name()})"
        if skipped:
            why += "; skipped " + "; ".join(skipped)
        return chosen, why
    raise AssertionError("the PyTorch fp32 path is always available")


__all__ = ["fastest_path", "candidates", "record_ap_check", "excluded_file", "PATHS"]
