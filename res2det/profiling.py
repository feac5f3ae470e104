"""Profiling zoo models: params, GFLOPs, latency, fps, peak memory and training-step cost (what ``res2det benchmark``
and the scripts in ``benchmarks/`` measure with).

How the figures are made (the same text is in ``res2det benchmark --help`` and docs/model-zoo.md):

* **GFLOPs**: multiply-adds of conv and linear layers per image (``res2det.utils.complexity.count_macs``; one
  multiply-add counts as one "FLOP", the convention of the Res2Net and mmdetection tables), counted by hooks
  during one real forward pass at the benchmark input (batch 1).
* **Detector workload**: the input is a deterministic random image of HEIGHTxWIDTH, zero-padded to a multiple
  of 32 as ``predict`` pads, with ``image_sizes`` the unpadded size. Weights are random (seed 0, PyTorch's
  default initialisation of every conv and linear layer, which keeps an untrained model's eval-mode
  activations finite) and the RoI heads run at full load: the test score threshold is set to 0, so the
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
* ``--precision bf16|fp16``: ``torch.autocast`` in that dtype (training fp16: with a ``GradScaler``), as
  ``predict(precision=)`` runs it: a dtype the device has no instructions for falls back to fp32 with a warning,
  and the JSON's ``dtype`` is what ran (``precision`` what was asked).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import hashlib
import json
import re
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .checkpoint import atomic_write, cache_dir
from .errors import Res2DetError
from .inference import PRECISIONS, autocast_dtype
from .machine import device_name
from .models.losses import total_loss
from .models.weight_init import pytorch_default_
from .version import __version__

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the res2det package
GFLOPS_CONVENTION = "conv + linear multiply-adds per image (count_macs; 1 MAC = 1 FLOP, the seed tables' convention)"
DEFAULT_RUNS = {"cpu": (1, 3), "cuda": (5, 20)}  # (warm-up, timed) calls


# ------------------------------------------------------------------------------------------ inputs and models
def is_detector(spec) -> bool:
    return spec.task != "classification"


def default_size(spec) -> tuple[int, int]:
    """The model's own input, (height, width): classifiers' ``preprocess.input_size``; detectors' (short, long)
    resize bounds as a landscape image, e.g. (800, 1333)."""
    a, b = spec.preprocess.input_size
    return (min(a, b), max(a, b)) if is_detector(spec) else (a, b)


def make_input(spec, size: tuple[int, int], batch: int, device: str) -> tuple[torch.Tensor, list | None]:
    """(images, image_sizes) at ``size`` = (height, width): a seeded standard-normal batch (what a normalised
    image looks like to the network); detectors' images zero-padded to a multiple of 32 with ``image_sizes``
    the unpadded size."""
    h, w = size
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
    from .zoo import create_model, get_spec

    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, **(full_load_overrides(spec) if full_load else {}))
    pytorch_default_(model)  # with mmdetection's init a deep untrained detector has no proposals in eval mode
    return model.to(device)


def _call(model, x: torch.Tensor, sizes: list | None):
    return model(x) if sizes is None else model(x, sizes)


def count_forward(model, x: torch.Tensor, sizes: list | None) -> dict[str, Any]:
    """Conv + linear MACs of one forward pass on ``x`` (count_macs) and, for detectors, the proposals and
    detections per image that pass produced."""
    from .utils.complexity import count_macs

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


def _return_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim), so that memory freed earlier in
    this process (by an earlier model) is counted again when reused: RSS only sees pages newly touched."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS figures may undercount in a long-running process
        pass


def rss_bytes() -> int:
    _return_free_memory()
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
            _return_free_memory()
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


def autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


_DTYPE_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}  # None (no autocast) -> 'fp32'


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
        if head.htc is not None and head.htc.with_semantic:
            semantic = torch.zeros(h, w, dtype=torch.long)
            for label, (x1, y1, x2, y2) in zip(labels.tolist(), ints):
                semantic[y1:y2, x1:x2] = label + 1
            t["semantic"] = semantic.to(x.device)
        targets.append(t)
    return targets


def measure_training(name: str, *, device: str = "cpu", size: tuple[int, int] | None = None, batch: int = 1,
                     dtype: torch.dtype | None = None, warmup: int = 1, repeats: int = 3,
                     baseline: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Median time and peak memory of one training step of zoo model ``name`` (see the module docstring),
    under autocast to ``dtype`` (None: fp32)."""
    from .zoo import get_spec

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
    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    last: dict[str, torch.Tensor] = {}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
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


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise Res2DetError(f"--device cuda: CUDA is not available here (torch {torch.__version__}"
                           f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU visible'})")


def check_options(*, device: str, precision: str, optimize: str, batch: int, warmup: int | None,
                  repeats: int | None) -> tuple[int, int]:
    """Validate the options (one clear error each); returns (warm-up, timed) calls with the device defaults."""
    check_device(device)
    if batch < 1:
        raise Res2DetError(f"--batch must be >= 1, got {batch}")
    if optimize not in ("none", "fuse", "select"):
        raise Res2DetError(f"--optimize must be none, fuse or select, got {optimize!r}")
    if precision not in PRECISIONS:
        raise Res2DetError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimize == "select" and (device != "cpu" or precision != "fp32"):
        raise Res2DetError("--optimize select measures CPU fp32 kernels: use it on --device cpu in fp32")
    default_warmup, default_repeats = DEFAULT_RUNS[device]
    warmup = default_warmup if warmup is None else warmup
    repeats = default_repeats if repeats is None else repeats
    if warmup < 0 or repeats < 1:
        raise Res2DetError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    return warmup, repeats


def run_meta(device: str, precision: str, dtype: str) -> dict[str, Any]:
    """The run's context; ``dtype`` is what ran (``inference.autocast_dtype``), ``precision`` what was asked."""
    return dict(device=device, device_name=device_name(device), precision=precision, dtype=dtype,
                threads=torch.get_num_threads(), torch=torch.__version__, res2det=__version__,
                python=platform.python_version(), cuda=torch.version.cuda if device == "cuda" else None,
                date=datetime.date.today().isoformat())


def benchmark_model(name: str, *, device: str = "cpu", size: tuple[int, int] | None = None, batch: int = 1,
                    precision: str = "fp32", train: bool = False, train_only: bool = False,
                    warmup: int | None = None, repeats: int | None = None, optimize: str = "fuse",
                    progress: bool = True) -> dict[str, Any]:
    """Benchmark one zoo model; returns the JSON record (see the module docstring for the methods)."""
    from .optimize import optimize_for_inference
    from .utils.complexity import count_params
    from .zoo import get_spec

    spec = get_spec(name)
    warmup, repeats = check_options(device=device, precision=precision, optimize=optimize, batch=batch,
                                    warmup=warmup, repeats=repeats)
    dtype = autocast_dtype(precision, device)
    size = size or default_size(spec)
    baseline = rss_bytes()
    say = (lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    say(f"building ({spec.task}, {size[0]}x{size[1]}, batch {batch}, {device}, {_DTYPE_NAMES[dtype]})")
    model = build_model(name, device).eval()
    x, sizes = make_input(spec, size, batch, device)
    result: dict[str, Any] = dict(
        model=name, task=spec.task, origin=spec.origin, **run_meta(device, precision, _DTYPE_NAMES[dtype]),
        batch=batch, size=list(size),
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
            with torch.inference_mode(), autocast(device, dtype):
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
        result["train"] = measure_training(name, device=device, size=size, batch=batch, dtype=dtype,
                                           warmup=warmup, repeats=repeats, baseline=baseline, progress=progress)
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
    from .utils.complexity import count_params
    from .zoo import get_spec

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
