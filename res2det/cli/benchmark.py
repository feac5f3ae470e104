"""``res2det benchmark``: params, GFLOPs, latency, fps and peak memory of zoo models (measured by
``res2det.profiling``, whose docstring says how), and the zoo table of docs/model-zoo.md."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write
from ..errors import Res2DetError
from .. import profiling
from ..profiling import benchmark_model, check_options, default_size, is_detector, run_meta
from .common import parse_size, text_table

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the res2det package
ZOO_PAGE = PACKAGE_ROOT / "docs" / "model-zoo.md"  # the page whose zoo-table block --all / --merge rewrite
ZOO_MARKER = "zoo-table"


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
    """The zoo tables (docs/model-zoo.md) from one or more runs (each ``{"meta", "results"}``; e.g. a CPU run and a GPU
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
            precision: str = "fp32", train: bool = False, train_only: bool = False, warmup: int | None = None,
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
                   "--optimize", optimize, "--precision", precision]
        options += ["--train"] * train + ["--train-only"] * train_only
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
HELP = (profiling.__doc__ or "").partition("How the figures are made")[2].partition("\n")[2]  # the method bullets

EPILOG = """examples:
  res2det benchmark res2net50_26w_4s                     # CPU, 224x224, batch 1
  res2det benchmark mask_rcnn_r2_101_fpn_2x_coco --size 800x1333 --train --json mask.json
  res2det benchmark --all --json bench_out/zoo_cpu.json  # every zoo row; rewrites docs/model-zoo.md's table
  res2det benchmark --all --device cuda --json bench_out/zoo_cuda.json --readme none   # on a GPU machine
  res2det benchmark --merge bench_out/zoo_cpu.json bench_out/zoo_cuda.json           # one table, both runs
"""


DESCRIPTION = "Benchmark zoo models. How the figures are made:\n" + HELP


def add_parser(sub) -> None:
    """Register ``res2det benchmark`` on the main CLI's subparsers."""
    configure_parser(sub.add_parser("benchmark", help="params, GFLOPs, latency/fps, peak memory (and training "
                                    "step) of zoo models; the zoo table of docs/model-zoo.md", description=DESCRIPTION,
                                    epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a zoo model (see `res2det list`)")
    p.add_argument("--all", action="store_true", help="every zoo model, each in a fresh process; rewrites the "
                   "zoo table of docs/model-zoo.md (classifiers at their own 224x224, detectors at --size)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="build the zoo table from `--all --json` "
                   "files of several runs (e.g. a CPU and a GPU machine); measures nothing")
    p.add_argument("--models", nargs="+", metavar="NAME", help="with --all: only these models")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", help="input HEIGHTxWIDTH, e.g. 800x1333 (default: the model's own: 224x224 for "
                   "classifiers, 800x1333 for the COCO detectors)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype, as `res2det infer --precision` (falls back to fp32 with a warning where "
                   "the device has no native instructions for it)")
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
                   "--> block is rewritten (default: this checkout's docs/model-zoo.md; 'none': do not write)")
    p.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    p.set_defaults(func=cmd_benchmark)


def _write_json(path: str, data: dict) -> None:
    text = json.dumps(data, indent=1)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"results written to {path}")


def _readme_target(arg: str | None) -> Path | None:
    if arg == "none":
        return None
    path = Path(arg) if arg else ZOO_PAGE
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
    warmup, repeats = check_options(device=args.device, precision=args.precision, optimize=args.optimize,
                                    batch=args.batch, warmup=args.warmup, repeats=args.repeats)
    if args.threads is not None:
        if args.threads < 1:
            raise Res2DetError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    if args.model:
        get_spec(args.model)
        results = [benchmark_model(args.model, device=args.device, size=size, batch=args.batch,
                                   precision=args.precision, train=args.train, train_only=args.train_only,
                                   warmup=args.warmup, repeats=args.repeats, optimize=args.optimize,
                                   progress=not args.no_progress)]
    else:
        names = list(MODELS)
        if args.models:
            for n in args.models:
                get_spec(n)
            names = [n for n in names if n in args.models]
        results = run_all(names, device=args.device, det_size=size, batch=args.batch,
                          precision=args.precision, train=args.train, train_only=args.train_only,
                          warmup=args.warmup, repeats=args.repeats, optimize=args.optimize, threads=args.threads,
                          progress=not args.no_progress)
    ran = next((r["dtype"] for r in results if "dtype" in r), "fp32")  # a reduced precision may fall back
    meta = dict(run_meta(args.device, args.precision, ran), batch=args.batch, optimize=args.optimize,
                warmup=warmup, repeats=repeats)
    data = {"meta": meta, "results": results}
    print(terminal_table(results))
    if args.json:
        _write_json(args.json, data)
    if args.all:
        failed = [r["model"] for r in results if "error" in r]
        if args.readme is None and args.models:
            target = None  # a subset would drop the other rows; merge it with --merge, or name --readme
            print("note: --models given, so the zoo table is not rewritten (pass --readme PATH to write it)")
        else:
            target = _readme_target(args.readme)
        if target is not None:
            rewrite_block(target, ZOO_MARKER, zoo_markdown([data]))
            print(f"zoo table rewritten in {target}")
        if failed:
            raise Res2DetError(f"{len(failed)} model(s) failed: {', '.join(failed)} (see the messages above)")
