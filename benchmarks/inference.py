"""Inference paths side by side: full ``predict`` (decode, resize, detect, paste) of one real photo per path.

    python benchmarks/inference.py [--models NAME ...] [--photo FILE] [--rounds 3] [--threads 2] [--json OUT]
                                   [--readme docs/inference.md]

Paths (each the whole ``predict`` of the same image, with the seed-0 reference weights of ../shared when present):

* ``fp32 eager``: ``model.predict(photo)``, the exact path and the default;
* ``torch fp32 optimised``: ``optimize_for_inference(model, photo)`` (BN folded, ReLU fused, grouped stage-block convs,
  each conv bound to its fastest kernel and layout by the kernel plan measured once per machine and input shape
  and cached: what ``infer --optimize`` runs), then its ``predict``; the plan's measuring time is reported;
* ``bf16 autocast``: ``predict`` with the layers under ``torch.autocast(bfloat16)`` (what ``precision='bf16'``
  runs where the CPU has avx512_bf16 / amx_bf16; on a CPU without them only with ``--emulated``);
* ``torch bf16``: ``optimize_for_inference(model, photo, precision='bf16')`` (BN folded, conv / fc weights converted
  to bf16 once, channels-last: what ``precision='bf16'`` / ``infer --precision bf16`` run where the CPU has native
  bf16; on a CPU without it only with ``--emulated``);
* ``onnxruntime fp32``: ``res2det.deploy.onnx_backend`` (the model's own graph in ONNX Runtime, same threads);
* ``openvino fp32`` / ``openvino bf16``: ``res2det.deploy.openvino_backend`` (the same graph in OpenVINO, same
  threads; bf16 only where native); ``openvino fp32 x2 streams``: two copies of the photo handed to two
  OpenVINO streams at once (``infer --backend openvino --streams 2 --batch-size 2``), seconds per image;
* ``openvino int8``: the graph quantised by NNCF (where installed; ``infer --backend openvino --precision int8``),
  calibrated on the first 8 other photos of the timed photo's folder; its one-time cost includes calibrating.

The heading names the CPU (model, family) and its speed-relevant flags (avx2 ... amx_bf16).

Timing: one warm-up call per path, then ``--rounds`` interleaved rounds (every path once per round); the median
per path and its ratio to fp32 eager; and, per model, the median time of ``predict``'s work outside the model
(decode, resize, normalise, pad), which every path shares. Agreement with fp32 eager: the share of its
detections scoring >= 0.3 found again (same label, box IoU >= 0.5), and the largest score difference among
those. ``--readme`` rewrites the ``<!-- inference-table:start/end -->`` block of that file
(docs/fast-inference.md) with the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import res2det  # noqa: E402
from res2det import inference  # noqa: E402
from res2det.cli.benchmark import rewrite_block  # noqa: E402
from res2det.errors import Res2DetError  # noqa: E402
from res2det.ops import box_iou  # noqa: E402
from res2det.machine import cpu_description, cpu_name  # noqa: E402
from res2det.optimize import optimize_for_inference  # noqa: E402

from backbone import write_json  # noqa: E402
from res2det.profiling import build_model  # noqa: E402
from shared_weights import SHARED, seeded_reference_weights  # noqa: E402

MODELS = ["faster_rcnn_r2_101_fpn_2x_coco", "mask_rcnn_r2_101_fpn_2x_coco", "htc_r2_101_fpn_20e_coco"]
PHOTO = SHARED / "data" / "tiny_coco" / "val2017" / "000000006818.jpg"  # 427x640 -> 800x1199


@contextlib.contextmanager
def forced_bf16(force: bool):
    """Within: ``precision='bf16'`` runs even on a CPU without native bf16 (oneDNN emulates it), to time or
    score it there."""
    real = inference._cpu_flags
    if force:
        inference._cpu_flags = lambda: real() | {"avx512_bf16"}
    try:
        yield
    finally:
        inference._cpu_flags = real


def graph_paths(model, name: str, photo: str, cache: str, *, native_bf16: bool) -> tuple[dict, dict]:
    """The installed graph runtimes' paths (``name -> predict function``) and each path's once-per-machine
    seconds (the first runtime's: the shared export and its check; later ones: their check)."""
    from res2det.deploy import graph_backend

    paths, once_s = {}, {}
    for runtime in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(runtime) is None:
            print(f"{name}: {runtime} not installed, its paths skipped", file=sys.stderr)
            continue
        try:
            start = time.perf_counter()
            det = graph_backend(model, model_name=name, check_image=photo, runtime=runtime, root=cache,
                                threads=torch.get_num_threads())
            seconds = time.perf_counter() - start
        except Res2DetError as e:
            print(f"{name}: {runtime} paths skipped: {e}", file=sys.stderr)
            continue
        paths[f"{runtime} fp32"] = lambda p, d=det: d.predict(p)
        once_s[f"{runtime} fp32"] = seconds
        if runtime == "openvino":
            if native_bf16:
                bf16 = graph_backend(model, model_name=name, check_image=photo, runtime=runtime, root=cache,
                                     threads=torch.get_num_threads(), precision="bf16")
                paths["openvino bf16"] = lambda p, d=bf16: d.predict(p)
            if importlib.util.find_spec("nncf") is not None:
                start = time.perf_counter()
                int8 = graph_backend(model, model_name=name, check_image=photo, runtime=runtime, root=cache,
                                     threads=torch.get_num_threads(), precision="int8",
                                     calibration=calibration_images(photo))
                paths["openvino int8"] = lambda p, d=int8: d.predict(p)
                once_s["openvino int8"] = time.perf_counter() - start
            else:
                print(f"{name}: nncf not installed, openvino int8 skipped", file=sys.stderr)
            two = graph_backend(model, model_name=name, check_image=photo, runtime=runtime, root=cache,
                                threads=torch.get_num_threads(), streams=2)
            paths["openvino fp32 x2 streams"] = lambda p, d=two: [
                det for _, _, det in d.iter_predict([p, p], batch_size=2)]
    return paths, once_s


def time_pipeline(model, photo: str) -> float:
    """Seconds of ``predict``'s work outside the model for ``photo`` (decode, resize, normalise, pad; a
    detector that finds nothing): the part every path shares."""
    start = time.perf_counter()
    inference.predict(inference.no_detections, photo, preprocess=model.preprocess, class_names=model.class_names)
    return time.perf_counter() - start


def calibration_images(photo: str, count: int = 8) -> list[str]:
    """The int8 path's calibration images: the first ``count`` other photos of the timed photo's folder (the
    timed one is not among them)."""
    return sorted(str(p) for p in Path(photo).parent.glob("*.jpg") if p.name != Path(photo).name)[:count]


def bf16_predict(model):
    """``predict`` with the layers under bf16 autocast, whether or not the CPU has native bf16."""
    def detect(batch, sizes, metas):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.detect(batch, sizes, paste_masks=False, image_metas=metas)

    def run(photo):
        return inference.predict(detect, photo, preprocess=model.preprocess, class_names=model.class_names,
                                 mask_thr=model.roi_head.test_cfg.mask_thr_binary)
    return run


def agreement(ref, got) -> dict:
    keep = ref.scores >= 0.3
    if not bool(keep.any()):
        return {"found": None, "max_score_diff": None, "reference_detections": 0}
    iou = box_iou(ref.boxes[keep], got.boxes) if len(got) else torch.zeros(int(keep.sum()), 0)
    hit = (iou >= 0.5) & (ref.labels[keep][:, None] == got.labels[None])
    best = torch.where(hit, iou, torch.full_like(iou, -1)).argmax(1) if len(got) else None
    found = hit.any(1)
    diff = (ref.scores[keep][found] - got.scores[best[found]]).abs().max() if bool(found.any()) else torch.tensor(0.)
    return {"found": float(found.float().mean()), "max_score_diff": float(diff),
            "reference_detections": int(keep.sum())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--photo", type=Path, default=PHOTO)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--emulated", action="store_true", help="also time bf16 on a CPU without native bf16 (oneDNN "
                    "emulates it: 26x slower than fp32 for the main-job model on an AVX2-only CPU, benchmarks/inference_ap.py)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    photo = str(args.photo)
    native_bf16 = bool(inference._cpu_flags() & {"avx512_bf16", "amx_bf16"})
    rows, pipeline_s = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            weights = seeded_reference_weights(name)
            model = (res2det.create_model(name, weights=str(weights)) if weights is not None
                     else build_model(name, full_load=False)).eval()  # random: finite eval-mode activations
            optimised = optimize_for_inference(model, photo)
            plan_s = None if optimised.kernel_plan["cached"] else optimised.kernel_plan["selection_s"]
            paths = {"fp32 eager": lambda p, m=model: m.predict(p),
                     "torch fp32 optimised": lambda p: optimised.predict(p)}
            if native_bf16 or args.emulated:
                paths[f"bf16 autocast{'' if native_bf16 else ' (emulated)'}"] = bf16_predict(model)
                with forced_bf16(not native_bf16):
                    bf16_model = optimize_for_inference(model, photo, precision="bf16")
                paths[f"torch bf16{'' if native_bf16 else ' (emulated)'}"] = lambda p: bf16_model.predict(p)
            more, export_s = graph_paths(model, name, photo, cache, native_bf16=native_bf16)
            paths.update(more)
            outputs = {k: fn(photo)[0] for k, fn in paths.items()}  # warm-up, and the detections compared
            times = {k: [] for k in paths}
            for _ in range(args.rounds):
                for k, fn in paths.items():
                    start = time.perf_counter()
                    images = len(fn(photo))
                    times[k].append((time.perf_counter() - start) / images)
            base = statistics.median(times["fp32 eager"])
            pipeline_s[name] = statistics.median(time_pipeline(model, photo) for _ in range(max(args.rounds, 3)))
            for k in paths:
                s = statistics.median(times[k])
                rows.append(dict(model=name, path=k, seconds=s, speedup=base / s,
                                 **agreement(outputs["fp32 eager"], outputs[k]),
                                 export_and_check_s=export_s.get(k),
                                 kernel_plan_s=plan_s if k == "torch fp32 optimised" else None,
                                 weights="seeded reference" if weights else "random"))
    header = f"{'model':32s} {'path':28s} {'seconds':>8s} {'vs eager':>8s}  agreement with fp32 eager"
    print(f"{cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.photo.name}"
          + ("" if native_bf16 or args.emulated else "; no native bf16 here: bf16 not timed (--emulated)"))
    print(header)
    print("-" * len(header))
    for r in rows:
        agree = "-" if r["found"] is None else \
            f"{r['found'] * 100:.0f}% of {r['reference_detections']} found, max score diff {r['max_score_diff']:.1e}"
        print(f"{r['model']:32s} {r['path']:28s} {r['seconds']:8.2f} {r['speedup']:7.2f}x  {agree}; "
              f"once: {one_time(r)}")
    for name, s in pipeline_s.items():
        print(f"{name}: outside the model (decode, resize, normalise, pad) {s:.3f} s of every path's time")
    result = dict(rows=rows, pipeline_s=pipeline_s, cpu=cpu_name(), cpu_flags=cpu_description().split("; flags ")[1],
                  threads=torch.get_num_threads(), torch=torch.__version__, rounds=args.rounds,
                  photo=args.photo.name, native_bf16=native_bf16)
    write_json(args.json, result)
    if args.readme:
        rewrite_block(args.readme, "inference-table", markdown(result))
    return result


def one_time(row: dict) -> str:
    """What a path costs once per machine and model before its first image: measuring the kernel plan, or
    exporting and checking the ONNX graph."""
    if row["path"] == "torch fp32 optimised":
        return "plan cached" if row["kernel_plan_s"] is None else f"kernel plan {row['kernel_plan_s']:.0f} s"
    if row.get("export_and_check_s") is None:
        return "-"
    what = "calibrate + quantise" if row["path"] == "openvino int8" else "export + check"
    return f"{what} {row['export_and_check_s']:.0f} s"


def markdown(result: dict) -> str:
    lines = [f"{result['cpu']} (flags {result.get('cpu_flags', '?')}), {result['threads']} threads, torch {result['torch']}; full `predict` of "
             f"{result['photo']} (800x1199 input), median of {result['rounds']} interleaved rounds"
             + ("" if result["native_bf16"] else "; this CPU has no native bf16, so bf16 is not timed") + ":", "",
             "| model | path | s / image | vs fp32 eager | fp32 eager detections (>= 0.3) found | once per machine |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        found = "-" if r["found"] is None else f"{r['found'] * 100:.0f}% of {r['reference_detections']}"
        lines.append(f"| {r['model']} | {r['path']} | {r['seconds']:.2f} | {r['speedup']:.2f}x | {found} | "
                     f"{one_time(r)} |")
    for name, s in result.get("pipeline_s", {}).items():
        lines.append(f"\n{name}: {s:.3f} s of each path's time is outside the model (decode, resize, normalise, "
                     f"pad).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
