"""``res2det benchmark``: params, GFLOPs, latency, fps and peak memory of zoo models, and the README zoo table.

How the figures are made (the same text is in ``res2det benchmark --help`` and the README):

* **GFLOPs**: multiply-adds of conv and linear layers per image (``res2det.utils.complexity.count_macs``; one
  multiply-add counts as one "FLOP", the convention of the Res2Net and mmdetection tables), counted by hooks
  during one real forward pass at the benchmark input (batch 1).
* **Detector workload**: the input is a deterministic random image of WIDTHxHEIGHT, zero-padded to a multiple
  of 32 as ``predict`` pads, with ``image_sizes`` the unpadded size. Weights are res2det's random
  initialisation (seed 0) and the RoI heads run at full load: the test score threshold is set to 0, so the
  box head sees all RPN proposals (1000 per image with mmdetection's test settings) and the mask head the
  ``max_per_img`` = 100 detections: the upper bound of a trained model's RoI work (untrained weights would
  otherwise return no detections). The JSON records the proposal and detection counts. Mask models' timed
  call includes pasting the masks into the input.
* **Latency**: median of ``--repeats`` timed calls after ``--warmup`` untimed ones, under
  ``torch.inference_mode`` in eval mode (``torch.cuda.synchronize`` around each call on CUDA);
  fps = batch / median latency. ``--optimize fuse`` (default) times ``res2det.optimize.optimize_for_inference(
  select=False)``: BN folded, ReLU fused, Res2Net stage-block convs grouped, identical outputs up to rounding;
  ``select`` adds the per-layer kernel selection measured on this machine (minutes per detector on CPU);
  ``none`` times the eager model.
* **Peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` (reset at the start of the phase; weights
  included). CPU: the process's peak resident set size (``VmHWM``, reset at the start of the phase through
  ``/proc/self/clear_refs``) minus its resident size before the model was built: weights, activations and
  whatever the allocator keeps, as the operating system sees it. ``--all`` runs every model in a fresh process.
* **Training** (``--train``): one SGD step (lr 0.02 x batch / 16, momentum 0.9, weight decay 1e-4;
  zero_grad, forward with synthetic targets, backward, step) in train mode with the model's frozen stages and
  BN settings; four boxes per image with box masks (and an HTC semantic map). Median step time after warm-up,
  images/s = batch / median, peak memory as above.
* ``--amp``: ``torch.autocast`` in bfloat16 on CPU, float16 on CUDA (training: with a ``GradScaler``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..version import __version__
from ..checkpoint import atomic_write, cache_dir
from ..errors import Res2DetError
from ..models.losses import total_loss
from .common import text_table

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the res2det package
README = PACKAGE_ROOT / "README.md"
ZOO_MARKER = "zoo-table"
GFLOPS_CONVENTION = "conv + linear multiply-adds per image (count_macs; 1 MAC = 1 FLOP, the seed tables' convention)"
DEFAULT_RUNS = {"cpu": (1, 3), "cuda": (5, 20)}  # (warm-up, timed) calls


# ------------------------------------------------------------------------------------------ inputs and models
def parse_size(text: str) -> tuple[int, int]:
    """'1333x800' (WIDTHxHEIGHT) or '224' (square) -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not m:
        raise Res2DetError(f"--size must be WIDTHxHEIGHT (e.g. 1333x800) or one number, got {text!r}")
    w, h = int(m[1]), int(m[2] or m[1])
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise Res2DetError(f"--size {text!r}: width and height must lie in 16..8192")
    return w, h


def is_detector(spec) -> bool:
    return spec.task != "classification"


def default_size(spec) -> tuple[int, int]:
    """The model's own input: (width, height). Classifiers: preprocess.input_size (H, W); detectors: the
    (short, long) resize bounds as a landscape image, e.g. 1333x800."""
    a, b = spec.preprocess.input_size
    return (max(a, b), min(a, b)) if is_detector(spec) else (b, a)


def make_input(spec, size: tuple[int, int], batch: int, device: str) -> tuple[torch.Tensor, list | None]:
    """(images, image_sizes): a seeded standard-normal batch (what a normalised image looks like to the
    network); detectors' images zero-padded to a multiple of 32 with ``image_sizes`` the unpadded size."""
    w, h = size
    g = torch.Generator().manual_seed(0)
    if not is_detector(spec):
        return torch.randn(batch, 3, h, w, generator=g).to(device), None
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    x = torch.zeros(batch, 3, hp, wp)
    x[:, :, :h, :w] = torch.randn(batch, 3, h, w, generator=g)
    return x.to(device), [(h, w)] * batch


def full_load_overrides(spec) -> dict[str, Any]:
    """Detectors: test score threshold 0, so untrained weights fill the ``max_per_img`` detections (see the
    module docstring); classifiers: nothing."""
    if not is_detector(spec):
        return {}
    return {"rcnn_test": dataclasses.replace(spec.config.roi_head.rcnn_test, score_thr=0.0)}


def build_model(name: str, device: str = "cpu", *, full_load: bool = True) -> torch.nn.Module:
    from ..zoo import create_model, get_spec

    spec = get_spec(name)
    torch.manual_seed(0)
    return create_model(name, **(full_load_overrides(spec) if full_load else {})).to(device)


def _call(model, x: torch.Tensor, sizes: list | None):
    return model(x) if sizes is None else model(x, sizes)


def count_forward(model, x: torch.Tensor, sizes: list | None) -> dict[str, Any]:
    """Conv + linear MACs of one forward pass on ``x`` (count_macs) and, for detectors, the proposals and
    detections per image that pass produced."""
    from ..utils.complexity import count_macs

    seen: dict[str, Any] = {}
    rpn = getattr(model, "rpn_head", None)
    if rpn is not None:
        predict = rpn.predict_proposals

        def recording(*args, **kwargs):
            proposals = predict(*args, **kwargs)
            seen["proposals_per_image"] = [int(p[0].shape[0]) for p in proposals]
            return proposals

        rpn.predict_proposals = recording  # instance attribute; removed below
    handle = model.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    try:
        macs = count_macs(model, x) if sizes is None else count_macs(model, x, sizes)
    finally:
        handle.remove()
        if rpn is not None:
            del rpn.predict_proposals
    out = seen.pop("out")
    if sizes is not None:
        seen["detections_per_image"] = [int(d["boxes"].shape[0]) for d in out]
    return {"macs": macs, **seen}


# ---------------------------------------------------------------------------------------------- measuring
def _proc_status(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m[1]) * 1024 if m else None


def rss_bytes() -> int:
    rss = _proc_status("VmRSS")
    return rss if rss is not None else 0


def _peak_rss_bytes() -> int:
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    import resource  # not on Windows; only needed where /proc is missing

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the code inside ``with``: CUDA max_memory_allocated (reset on entry), or on CPU the
    process's peak RSS (reset on entry where Linux allows) minus ``baseline`` (its RSS before the model)."""

    def __init__(self, device: str, baseline: int = 0):
        self.device, self.baseline, self.peak, self.method = device, baseline, 0, ""

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
        elif _proc_status("VmHWM") is None:
            self.method = "process peak RSS since start (getrusage; no /proc: not reset, no baseline)"
        else:
            reset = _reset_peak_rss()
            self.method = ("peak RSS (VmHWM, reset per phase) - RSS before the model was built" if reset else
                           "process peak RSS since start (could not reset) - RSS before the model was built")
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = max(0, _peak_rss_bytes() - self.baseline)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(device: str, amp: bool):
    return torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16, enabled=amp)


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int, device: str, desc: str,
               progress: bool) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (a progress bar on stderr)."""
    from tqdm import tqdm

    times = []
    with tqdm(total=warmup + repeats, desc=desc, unit="call", file=sys.stderr, disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        for _ in range(warmup):
            fn()
            _sync(device)
            bar.update()
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
            bar.update()
            bar.set_postfix_str(f"median {statistics.median(times) * 1000:.1f} ms")
    return times


_BOXES = ((0.10, 0.10, 0.45, 0.60), (0.40, 0.30, 0.90, 0.90), (0.05, 0.55, 0.30, 0.95), (0.60, 0.05, 0.95, 0.40))


def synthetic_targets(config, x: torch.Tensor, sizes: list) -> list[dict[str, torch.Tensor]]:
    """Four boxes per image (fractions of its unpadded size), labels, box-shaped masks padded to the input,
    and for HTC's semantic branch a label map: the training interface of the detectors."""
    head = config.roi_head
    hp, wp = x.shape[-2:]
    targets = []
    for i, (h, w) in enumerate(sizes):
        boxes = torch.tensor(_BOXES) * torch.tensor([w, h, w, h], dtype=torch.float32)
        labels = (torch.arange(len(_BOXES)) + i) % head.num_classes
        t = {"boxes": boxes.to(x.device), "labels": labels.to(x.device)}
        ints = boxes.round().long().tolist()
        if head.with_mask:
            masks = torch.zeros(len(ints), hp, wp, dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(ints):
                masks[k, y1:y2, x1:x2] = 1
            t["masks"] = masks.to(x.device)
        if getattr(head, "with_semantic", False):
            semantic = torch.zeros(h, w, dtype=torch.long)
            for label, (x1, y1, x2, y2) in zip(labels.tolist(), ints):
                semantic[y1:y2, x1:x2] = label + 1
            t["semantic"] = semantic.to(x.device)
        targets.append(t)
    return targets


def measure_training(name: str, *, device: str = "cpu", size: tuple[int, int] | None = None, batch: int = 1,
                     amp: bool = False, warmup: int = 1, repeats: int = 3, baseline: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Median time and peak memory of one training step of zoo model ``name`` (see the module docstring)."""
    from ..zoo import get_spec

    spec = get_spec(name)
    size = size or default_size(spec)
    baseline = rss_bytes() if baseline is None else baseline
    model = build_model(name, device, full_load=False).train()
    x, sizes = make_input(spec, size, batch, device)
    if sizes is None:
        labels = torch.arange(batch, device=device) % spec.config.num_classes
        targets = None
    else:
        targets = synthetic_targets(model.config, x, sizes)
    lr = 0.02 * batch / 16
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if amp and device == "cuda" else None
    last: dict[str, torch.Tensor] = {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            if targets is None:
                losses = {"loss_cls": F.cross_entropy(model(x).float(), labels)}
            else:
                losses = model(x, image_sizes=sizes, targets=targets)
        total = total_loss(losses)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        last.clear()
        last.update({k: v.detach() for k, v in losses.items()})

    with PeakMemory(device, baseline) as mem:
        times = time_calls(step, warmup=warmup, repeats=repeats, device=device, desc=f"{name} train step",
                           progress=progress)
    median = statistics.median(times)
    result = dict(step_ms=median * 1000, step_ms_runs=[t * 1000 for t in times], images_per_s=batch / median,
                  peak_memory_mb=mem.peak / 2**20, memory_method=mem.method, batch=batch, size=list(size),
                  optimizer=f"SGD lr {lr:g} momentum 0.9 wd 1e-4", warmup=warmup, repeats=repeats,
                  losses={k: float(v) for k, v in last.items()})
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise Res2DetError(f"--device cuda: CUDA is not available here (torch {torch.__version__}"
                           f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'})")


def check_options(*, device: str, amp: bool, optimize: str, batch: int, warmup: int | None,
                  repeats: int | None) -> tuple[int, int]:
    """Validate the options (one clear error each); returns (warm-up, timed) calls with the device defaults."""
    check_device(device)
    if batch < 1:
        raise Res2DetError(f"--batch must be >= 1, got {batch}")
    if optimize not in ("none", "fuse", "select"):
        raise Res2DetError(f"--optimize must be none, fuse or select, got {optimize!r}")
    if optimize == "select" and (device != "cpu" or amp):
        raise Res2DetError("--optimize select measures CPU fp32 kernels: use it on --device cpu without --amp")
    default_warmup, default_repeats = DEFAULT_RUNS[device]
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeats if repeats is None else repeats
    if warmup < 0 or repeats < 1:
        raise Res2DetError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    return warmup, repeats


def run_meta(device: str, amp: bool) -> dict[str, Any]:
    return dict(device=device, device_name=device_name(device), amp=amp,
                dtype=("fp16" if device == "cuda" else "bf16") if amp else "fp32",
                threads=torch.get_num_threads(), torch=torch.__version__, res2det=__version__,
                python=platform.python_version(), cuda=torch.version.cuda if device == "cuda" else None,
                date=datetime.date.today().isoformat())


def benchmark_model(name: str, *, device: str = "cpu", size: tuple[int, int] | None = None, batch: int = 1,
                    amp: bool = False, train: bool = False, train_only: bool = False, warmup: int | None = None,
                    repeats: int | None = None, optimize: str = "fuse", progress: bool = True) -> dict[str, Any]:
    """Benchmark one zoo model; returns the JSON record (see the module docstring for the methods)."""
    from ..optimize import optimize_for_inference
    from ..utils.complexity import count_params
    from ..zoo import get_spec

    spec = get_spec(name)
    warmup, repeats = check_options(device=device, amp=amp, optimize=optimize, batch=batch, warmup=warmup,
                                    repeats=repeats)
    size = size or default_size(spec)
    baseline = rss_bytes()
    say = (lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    say(f"building ({spec.task}, {size[0]}x{size[1]}, batch {batch}, {device}{', amp' if amp else ''})")
    model = build_model(name, device).eval()
    x, sizes = make_input(spec, size, batch, device)
    result: dict[str, Any] = dict(
        model=name, task=spec.task, origin=spec.origin, **run_meta(device, amp), batch=batch, size=list(size),
        input_shape=list(x.shape), params=count_params(model), gflops_convention=GFLOPS_CONVENTION)
    result["params_m"] = result["params"] / 1e6
    say("counting conv + linear multiply-adds (one forward pass)")
    counted = count_forward(model, x[:1], None if sizes is None else sizes[:1])
    result["gflops"] = counted.pop("macs") / 1e9
    result.update(counted)

    if not train_only:
        start = time.perf_counter()
        if optimize != "none":
            say(f"optimising for inference ({'BN folding + kernel selection' if optimize == 'select' else 'BN folding'})")
            run_model = optimize_for_inference(model, x, select=optimize == "select")
            del model
            gc.collect()
        else:
            run_model = model
        result.update(optimize=optimize, optimize_s=time.perf_counter() - start)

        def infer() -> None:
            with torch.inference_mode(), autocast(device, amp):
                _call(run_model, x, sizes)

        with PeakMemory(device, baseline) as mem:
            times = time_calls(infer, warmup=warmup, repeats=repeats, device=device, desc=f"{name} inference",
                               progress=progress)
        median = statistics.median(times)
        result.update(warmup=warmup, repeats=repeats, latency_ms=median * 1000,
                      latency_ms_runs=[t * 1000 for t in times], fps=batch / median,
                      peak_memory_mb=mem.peak / 2**20, memory_method=mem.method)
        del run_model
    else:
        del model
    gc.collect()
    if train or train_only:
        say("training step")
        result["train"] = measure_training(name, device=device, size=size, batch=batch, amp=amp, warmup=warmup,
                                           repeats=repeats, baseline=baseline, progress=progress)
    return result


# ----------------------------------------------------------------------------- complexity for `res2det zoo`
@functools.lru_cache(maxsize=None)
def _code_fingerprint() -> str:
    h = hashlib.sha1()
    for path in sorted((PACKAGE_ROOT / "res2det").rglob("*.py")):
        h.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_complexity(name: str, size: tuple[int, int] | None = None, *, use_cache: bool = True) -> tuple[int, float]:
    """(params, GFLOPs per image) of a zoo model at ``size`` (default: its benchmark input), measured as
    ``res2det benchmark`` does. Cached in the res2det cache folder per version of res2det's source code."""
    from ..utils.complexity import count_params
    from ..zoo import get_spec

    spec = get_spec(name)
    size = size or default_size(spec)
    path = cache_dir() / "complexity.json"
    fingerprint = _code_fingerprint() if use_cache else ""
    key = f"{name}|{size[0]}x{size[1]}"
    cached: dict = {}
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("code") != fingerprint:
            cached = {}
        if key in cached.get("models", {}):
            params, gflops = cached["models"][key]
            return int(params), float(gflops)
    model = build_model(name).eval()
    x, sizes = make_input(spec, size, 1, "cpu")
    params, gflops = count_params(model), count_forward(model, x, sizes)["macs"] / 1e9
    if use_cache:
        cached = {"code": fingerprint, "models": {**cached.get("models", {}), key: [params, gflops]}}
        text = json.dumps(cached, indent=1)
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        except OSError:
            pass  # a read-only cache folder only costs the next run the measurement
    return params, gflops


# ---------------------------------------------------------------------------------- published figures
_METRIC_NAMES = {"top1": "top-1", "box_ap": "box AP", "mask_ap": "mask AP"}


def published_text(pw) -> str:
    """A release's published figures: 'box AP 43.6, mask AP 38.7; train mem 7.9 GB' (source's own numbers)."""
    # repr keeps the digits as written in the registry, i.e. as published (43.0, 77.374, 16.069)
    parts = [", ".join(f"{_METRIC_NAMES.get(k, k)} {float(v)!r}" for k, v in pw.metrics.items())]
    if pw.train_memory_gb is not None:
        parts.append(f"train mem {float(pw.train_memory_gb)!r} GB")
    if pw.fps is not None:
        parts.append(f"{float(pw.fps)!r} fps" + (f" ({pw.hardware})" if pw.hardware else ""))
    return "; ".join(p for p in parts if p) or "-"


def releases(spec) -> list:
    return [*spec.weights, *spec.other_releases]


# ------------------------------------------------------------------------------------------- tables
def run_label(meta: dict) -> str:
    dtype = {"fp32": "fp32", "bf16": "bf16 AMP", "fp16": "fp16 AMP"}[meta["dtype"]]
    return f"{'GPU' if meta['device'] == 'cuda' else 'CPU'} {dtype}"


def _fmt_mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:,.0f}"


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if "error" in r:
        return "failed"
    return f"{r['latency_ms']:,.1f} / {r['fps']:.2f} / {_fmt_mb(r['peak_memory_mb'])}" if "latency_ms" in r else "-"


def _train_cell(r: dict | None) -> str:
    if r is None or "train" not in r:
        return ""
    t = r["train"]
    return f"{t['step_ms'] / 1000:.2f} / {t['images_per_s']:.2f} / {_fmt_mb(t['peak_memory_mb'])}"


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise Res2DetError(f"{p}: cannot read benchmark JSON: {e}") from None
        if not (isinstance(data, dict) and isinstance(data.get("results"), list) and isinstance(data.get("meta"), dict)):
            raise Res2DetError(f"{p}: not a `res2det benchmark --json` file (needs 'meta' and 'results')")
        runs.append(data)
    return runs


def zoo_markdown(runs: list[dict]) -> str:
    """The README zoo tables from one or more runs (each ``{"meta", "results"}``; e.g. a CPU run and a GPU
    run made on different machines): registry columns, then per run 'ms / fps / peak MiB' (and training)."""
    from ..zoo import MODELS

    by_label: dict[str, dict[str, dict]] = {}
    metas: dict[str, dict] = {}
    for run in runs:
        label = run_label(run["meta"])
        metas[label] = run["meta"]  # a later run with the same label replaces the earlier one
        by_label[label] = {r["model"]: r for r in run["results"]}
    labels = list(by_label)
    measured: dict[str, dict] = {}
    for label in labels:
        for name, r in by_label[label].items():
            if "error" not in r:
                measured.setdefault(name, r)
    names = [n for n in MODELS if any(n in by_label[label] for label in labels)]
    train_labels = [lb for lb in labels if any("train" in r for r in by_label[lb].values())]

    def table(models: list[str], published_header: str) -> list[str]:
        header = ["model", "origin", published_header, "weights", "params (M)", "GFLOPs"]
        header += [f"{lb}: ms / fps / peak MiB" for lb in labels]
        header += [f"{lb} train: s/step / img/s / peak MiB" for lb in train_labels]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for name in models:
            spec, r = MODELS[name], measured.get(name)
            pub = "<br>".join(f"{published_text(pw)}" + (f" ({pw.source})" if len(releases(spec)) > 1 else "")
                              for pw in releases(spec)) or "no weights released"
            files = "<br>".join(f"[{pw.filename}]({pw.url})" for pw in releases(spec)) or "-"
            row = [f"`{name}`", spec.origin, pub, files,
                   f"{r['params_m']:.2f}" if r else "-", f"{r['gflops']:.1f}" if r else "-"]
            row += [_cell(by_label[lb].get(name)) for lb in labels]
            row += [_train_cell(by_label[lb].get(name)) for lb in train_labels]
            lines.append("| " + " | ".join(row) + " |")
        return lines

    def sizes(models: list[str]) -> str:
        seen = sorted({f"{r['size'][0]}x{r['size'][1]}" for lb in labels for n, r in by_label[lb].items()
                       if n in models and "size" in r})
        return ", ".join(seen) or "-"

    classifiers = [n for n in names if MODELS[n].task == "classification"]
    detectors = [n for n in names if MODELS[n].task != "classification"]
    out = ["Generated by `res2det benchmark --all` (merged with `res2det benchmark --merge`); do not edit by "
           "hand. Published figures are the publishers' own (source in brackets where a model has several "
           "releases); everything else is measured by res2det.", ""]
    if classifiers:
        out += [f"ImageNet classifiers, input {sizes(classifiers)}, batch "
                f"{', '.join(sorted({str(m['batch']) for m in metas.values() if 'batch' in m})) or '1'}:", ""]
        out += table(classifiers, "published top-1 (%)") + [""]
    if detectors:
        out += [f"COCO detectors, input {sizes(detectors)} (padded to a multiple of 32), RoI heads at full load:",
                ""]
        out += table(detectors, "published box / mask AP, memory, fps") + [""]
    out.append("Runs:")
    out.append("")
    for label in labels:
        m = metas[label]
        out.append(f"* **{label}**: {m['device_name']}, {m['threads']} CPU thread(s), torch {m['torch']}"
                   f"{', CUDA ' + m['cuda'] if m.get('cuda') else ''}, res2det {m['res2det']}, {m['date']}; "
                   f"`--optimize {m.get('optimize', 'fuse')}`, {m.get('warmup', '?')} warm-up + "
                   f"{m.get('repeats', '?')} timed calls, batch {m.get('batch', 1)}")
    return "\n".join(out)


def rewrite_block(path: Path, marker: str, content: str) -> None:
    """Replace the text between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->`` in ``path`` (each exactly
    once, in that order) by ``content``; the rest of the file is left byte for byte. Atomic write."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Res2DetError(f"{path}: cannot read: {e.strerror or e}") from None
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise Res2DetError(f"{path}: needs exactly one '{start}' followed by one '{end}' to rewrite the table")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    new = f"{head}{start}\n{content.strip()}\n{end}{tail}"
    atomic_write(path, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))


def terminal_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], "failed: " + r["error"].splitlines()[-1][:80]] + [""] * 6)
            continue
        train = r.get("train")
        rows.append([r["model"], f"{r['size'][0]}x{r['size'][1]}", f"{r['params_m']:.2f}", f"{r['gflops']:.1f}",
                     f"{r['latency_ms']:,.1f}" if "latency_ms" in r else "-", f"{r['fps']:.2f}" if "fps" in r else "-",
                     _fmt_mb(r.get("peak_memory_mb")),
                     f"{train['step_ms'] / 1000:.2f} s, {train['images_per_s']:.2f} img/s, "
                     f"{_fmt_mb(train['peak_memory_mb'])} MiB" if train else "-"])
    header = ["model", "input", "params (M)", "GFLOPs", "latency ms", "fps", "peak MiB", "train step"]
    return text_table(rows, header)


# ------------------------------------------------------------------------------------------ --all
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_isolated(name: str, options: list[str]) -> dict[str, Any]:
    """``res2det benchmark NAME OPTIONS`` in a fresh Python process (so that one model's memory does not
    colour the next one's); returns its JSON record, or ``{"model", "error"}``."""
    with tempfile.TemporaryDirectory(prefix="res2det-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "res2det.cli.main", "benchmark", name, *options, "--json", str(out)]
        # the child's progress goes on to our stderr as it comes; its last lines name the error, if any
        proc = subprocess.Popen(cmd, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tail = b""
        while chunk := proc.stderr.read1(4096):
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
            tail = (tail + chunk)[-4000:]
        proc.wait()
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in tail.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
            return {"model": name, "error": lines[-1] if lines else f"exit code {proc.returncode}"}
        return json.loads(out.read_text())["results"][0]


def run_all(models: list[str], *, device: str = "cpu", det_size: tuple[int, int] | None = None, batch: int = 1,
            amp: bool = False, train: bool = False, train_only: bool = False, warmup: int | None = None,
            repeats: int | None = None, optimize: str = "fuse", threads: int | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
    """Benchmark each model in a fresh process (``run_isolated``), with progress lines on stderr."""
    from ..zoo import get_spec

    results = []
    start = time.perf_counter()
    for i, name in enumerate(models, 1):
        spec = get_spec(name)
        size = det_size if (det_size and is_detector(spec)) else default_size(spec)
        options = ["--device", device, "--size", f"{size[0]}x{size[1]}", "--batch", str(batch),
                   "--optimize", optimize]
        options += ["--amp"] * amp + ["--train"] * train + ["--train-only"] * train_only
        options += ["--no-progress"] * (not progress)
        for flag, value in (("--warmup", warmup), ("--repeats", repeats), ("--threads", threads)):
            if value is not None:
                options += [flag, str(value)]
        print(f"[{i}/{len(models)}] {name} at {size[0]}x{size[1]} ({time.perf_counter() - start:.0f} s so far)",
              file=sys.stderr, flush=True)
        r = run_isolated(name, options)
        if "error" in r:
            print(f"[{i}/{len(models)}] {name}: FAILED: {r['error']}", file=sys.stderr, flush=True)
        else:
            timing = (f", {r['latency_ms']:,.1f} ms, {r['fps']:.2f} fps, {_fmt_mb(r['peak_memory_mb'])} MiB"
                      if "latency_ms" in r else "")
            print(f"[{i}/{len(models)}] {name}: {r['params_m']:.2f} M params, {r['gflops']:.1f} GFLOPs{timing}",
                  file=sys.stderr, flush=True)
        results.append(r)
    return results


# ------------------------------------------------------------------------------------------ the command
HELP = (__doc__ or "").partition("How the figures are made")[2].partition("\n")[2]  # the method bullets

EPILOG = """examples:
  res2det benchmark res2net50_26w_4s                     # CPU, 224x224, batch 1
  res2det benchmark mask_rcnn_r2_101_fpn_2x_coco --size 1333x800 --train --json mask.json
  res2det benchmark --all --json bench_out/zoo_cpu.json  # every zoo row; rewrites the README zoo table
  res2det benchmark --all --device cuda --json bench_out/zoo_cuda.json --readme none   # on a GPU machine
  res2det benchmark --merge bench_out/zoo_cpu.json bench_out/zoo_cuda.json           # one table, both runs
"""


DESCRIPTION = "Benchmark zoo models. How the figures are made:\n" + HELP


def add_parser(sub) -> None:
    """Register ``res2det benchmark`` on the main CLI's subparsers."""
    configure_parser(sub.add_parser("benchmark", help="params, GFLOPs, latency/fps, peak memory (and training "
                                    "step) of zoo models; the README zoo table", description=DESCRIPTION,
                                    epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a zoo model (see `res2det list`)")
    p.add_argument("--all", action="store_true", help="every zoo model, each in a fresh process; rewrites the "
                   "README zoo table (classifiers at their own 224x224, detectors at --size)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="build the README zoo table from `--all --json` "
                   "files of several runs (e.g. a CPU and a GPU machine); measures nothing")
    p.add_argument("--models", nargs="+", metavar="NAME", help="with --all: only these models")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", help="input WIDTHxHEIGHT, e.g. 1333x800 (default: the model's own: 224x224 for "
                   "classifiers, 1333x800 for the COCO detectors)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="autocast: bfloat16 on CPU, float16 on CUDA")
    p.add_argument("--train", action="store_true", help="also time one training step (SGD, synthetic targets)")
    p.add_argument("--train-only", action="store_true", help="time only the training step")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed calls; the median is reported (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--optimize", default="fuse", choices=["none", "fuse", "select"],
                   help="inference form timed: eager ('none'), BN-folded/fused ('fuse', default) or fused with "
                   "per-layer kernel selection measured on this machine ('select'; minutes per detector on CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON ({'meta', 'results'})")
    p.add_argument("--readme", metavar="PATH", help="with --all / --merge: the file whose <!-- zoo-table:start/end "
                   "--> block is rewritten (default: this checkout's README.md; 'none': do not write)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.set_defaults(func=cmd_benchmark)


def _write_json(path: str, data: dict) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"results written to {path}")


def _readme_target(arg: str | None) -> Path | None:
    if arg == "none":
        return None
    path = Path(arg) if arg else README
    if arg is None and not path.is_file():
        print(f"note: {path} not found; pass --readme PATH to write the zoo table", file=sys.stderr)
        return None
    return path


def cmd_benchmark(args) -> None:
    from ..zoo import MODELS, get_spec

    modes = [bool(args.model), args.all, bool(args.merge)]
    if sum(modes) != 1:
        raise Res2DetError("give exactly one of MODEL, --all or --merge JSON ...")
    if args.models and not args.all:
        raise Res2DetError("--models goes with --all")
    if args.merge:
        runs = load_runs(args.merge)
        text = zoo_markdown(runs)
        print(text)
        target = _readme_target(args.readme)
        if target is not None:
            rewrite_block(target, ZOO_MARKER, text)
            print(f"zoo table rewritten in {target}")
        return

    size = parse_size(args.size) if args.size else None
    warmup, repeats = check_options(device=args.device, amp=args.amp, optimize=args.optimize, batch=args.batch,
                                    warmup=args.warmup, repeats=args.repeats)
    if args.threads is not None:
        if args.threads < 1:
            raise Res2DetError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    meta = dict(run_meta(args.device, args.amp), batch=args.batch, optimize=args.optimize, warmup=warmup,
                repeats=repeats)

    if args.model:
        get_spec(args.model)
        results = [benchmark_model(args.model, device=args.device, size=size, batch=args.batch, amp=args.amp,
                                   train=args.train, train_only=args.train_only, warmup=args.warmup,
                                   repeats=args.repeats, optimize=args.optimize, progress=not args.no_progress)]
    else:
        names = list(MODELS)
        if args.models:
            for n in args.models:
                get_spec(n)
            names = [n for n in names if n in args.models]
        results = run_all(names, device=args.device, det_size=size, batch=args.batch, amp=args.amp,
                          train=args.train, train_only=args.train_only, warmup=args.warmup, repeats=args.repeats,
                          optimize=args.optimize, threads=args.threads, progress=not args.no_progress)
    data = {"meta": meta, "results": results}
    print(terminal_table(results))
    if args.json:
        _write_json(args.json, data)
    if args.all:
        failed = [r["model"] for r in results if "error" in r]
        if args.readme is None and args.models:
            target = None  # a subset would drop the other rows; merge it with --merge, or name --readme
            print("note: --models given, so the README is not rewritten (pass --readme PATH to write it)")
        else:
            target = _readme_target(args.readme)
        if target is not None:
            rewrite_block(target, ZOO_MARKER, zoo_markdown([data]))
            print(f"zoo table rewritten in {target}")
        if failed:
            raise Res2DetError(f"{len(failed)} model(s) failed: {', '.join(failed)} (see the messages above)")
