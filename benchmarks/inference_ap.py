"""COCO box / mask AP of a trained detector through every inference path, against the exact fp32 path.

    python benchmarks/inference_ap.py RUN_DIR/model_final.safetensors [--config shapes] [--json OUT]
                                      [--readme docs/fast-inference.md] [--threads 2]

The detector of ``--config`` (a ``res2det train`` preset or .py file; default the README's main job) with the
given weights, on that config's validation set, image files through ``predict``'s own pipeline
(``res2det.inference``); the paths:

* ``fp32 eager``: the exact path (``model.iter_predict``);
* ``torch fp32 optimised``: ``optimize_for_inference(model, first image)`` (what ``infer --optimize`` runs: BN folded,
  kernels from the cached per-machine plan, measured for the first image's input shape and used for all);
* ``bf16 autocast``: the layers under ``torch.autocast(bfloat16)``, timed and scored whether or not the CPU has
  native bf16 (``precision='bf16'`` runs it only where it has);
* ``fp16 autocast``: the same in float16;
* ``torch bf16``: ``optimize_for_inference(model, first image, precision='bf16')`` (weights converted to bf16 once;
  scored whether or not the CPU has native bf16, emulated where not);
* ``onnxruntime fp32``, ``openvino fp32``: ``res2det.deploy.graph_backend`` (the model's graph in that runtime);
* ``openvino bf16``: its bf16 precision hint, where the CPU has native bf16 (elsewhere OpenVINO computes f32);
* ``openvino int8``: the graph quantised by NNCF (where installed), calibrated on the config's first 8 training
  images (never the validation images it is scored on).

A fast path whose AP falls more than 0.01 below fp32 is not one to offer as is (the table marks it), and
``res2det.deploy.fast.record_ap_check`` keeps that verdict for this machine, so ``infer --fast`` skips it.
``--readme`` rewrites the ``<!-- inference-ap-table:start/end -->`` block of that file.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from res2det import inference  # noqa: E402
from res2det.cli.benchmark import rewrite_block  # noqa: E402
from res2det.deploy.fast import record_ap_check  # noqa: E402
from res2det.engine.train_config import load_config  # noqa: E402
from res2det.engine.trainer import build_dataset, model_preprocess  # noqa: E402
from res2det.evaluation.coco_eval import coco_evaluate, to_coco_results  # noqa: E402
from res2det.machine import cpu_description  # noqa: E402
from res2det.optimize import optimize_for_inference  # noqa: E402
from res2det.zoo import create_model  # noqa: E402

from backbone import write_json  # noqa: E402
from inference import forced_bf16  # noqa: E402  (benchmarks/inference.py)


def autocast_paths(model, dtype):
    def detect(batch, sizes, metas):
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
            return model.detect(batch, sizes, paste_masks=False, image_metas=metas)

    def run(files):
        return inference.iter_predict(detect, files, preprocess=model.preprocess, class_names=model.class_names,
                                      mask_thr=model.roi_head.test_cfg.mask_thr_binary)
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--config", default="shapes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--readme", type=Path)
    ap.add_argument("--int8-mask-head", action="store_true", help="also score openvino int8 with the mask heads "
                    "quantised too (the evidence for keeping them fp32, res2det.deploy.backend.INT8_KEEP_FP32)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    val = build_dataset(cfg, model_preprocess(cfg), "val")
    names = tuple(val.class_names)
    model = create_model(cfg.model, weights=args.weights, **cfg.model_options, num_classes=len(names),
                         class_names=names).eval()
    files = [str(r.file) for r in val.records]
    ids = [r.image_id for r in val.records]
    optimised = optimize_for_inference(model, files[0])
    native_bf16 = bool(inference._cpu_flags() & {"avx512_bf16", "amx_bf16"})
    with forced_bf16(not native_bf16):
        bf16_model = optimize_for_inference(model, files[0], precision="bf16")
    paths = {"fp32 eager": lambda f: model.iter_predict(f),
             "torch fp32 optimised": lambda f: optimised.iter_predict(f),
             "torch bf16": lambda f: bf16_model.iter_predict(f),
             "bf16 autocast": autocast_paths(model, torch.bfloat16),
             "fp16 autocast": autocast_paths(model, torch.float16)}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        from res2det.deploy import graph_backend
        from res2det.errors import Res2DetError

        train = [str(r.file) for r in build_dataset(cfg, model_preprocess(cfg), "train").records[:8]]
        for runtime, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"),
                                   ("openvino", "int8")):
            if precision == "bf16" and not native_bf16:
                continue  # OpenVINO computes f32 where the CPU has no bf16: nothing to score
            try:
                det = graph_backend(model, model_name=cfg.model, check_image=files[0], root=cache, runtime=runtime,
                                    precision=precision, threads=torch.get_num_threads(), calibration=train)
                paths[f"{runtime} {precision}"] = lambda f, d=det: d.iter_predict(f)
            except Res2DetError as e:
                print(f"{runtime} {precision} path skipped: {e}", file=sys.stderr)
        if args.int8_mask_head and "openvino int8" in paths:
            import res2det.deploy.backend as backend

            backend.INT8_KEEP_FP32 = []  # a separate cache entry: the pattern list is part of its key
            det = graph_backend(model, model_name=cfg.model, check_image=files[0], root=cache, runtime="openvino",
                                precision="int8", threads=torch.get_num_threads(), calibration=train)
            paths["openvino int8, mask head int8"] = lambda f, d=det: d.iter_predict(f)
        for name, run in paths.items():
            start = time.perf_counter()
            bbox, segm = [], []
            for image_id, (_, _, det) in zip(ids, run(files)):
                b, s = to_coco_results(image_id, det.boxes, det.scores, det.labels, det.instance_masks,
                                       label_to_cat_id=val.label_to_cat_id)
                bbox += b
                segm += s
            seconds = time.perf_counter() - start
            row = {"path": name, "seconds": seconds, "images": len(files)}
            for iou_type, records in (("bbox", bbox), ("segm", segm)):
                if records or iou_type == "bbox":
                    row[f"{iou_type}_AP"] = coco_evaluate(val.coco, records, iou_type, img_ids=ids).metrics[
                        f"{iou_type}_AP"]
            rows.append(row)
    base = rows[0]
    print(f"{cpu_description()}, {torch.get_num_threads()} threads; {cfg.model} on {len(files)} validation images of "
          f"{args.config}")
    print(f"{'path':20s} {'box AP':>7s} {'mask AP':>7s} {'d box':>7s} {'d mask':>7s} {'s/img':>6s} {'vs fp32':>7s}")
    for r in rows:
        d_box = r["bbox_AP"] - base["bbox_AP"]
        d_mask = r.get("segm_AP", 0.0) - base.get("segm_AP", 0.0)
        r["offered"] = min(d_box, d_mask) >= -0.01
        print(f"{r['path']:20s} {r['bbox_AP']:7.4f} {r.get('segm_AP', float('nan')):7.4f} {d_box:+7.4f} "
              f"{d_mask:+7.4f} {r['seconds'] / r['images']:6.2f} {base['seconds'] / r['seconds']:6.2f}x"
              + ("" if r["offered"] else "  (AP falls > 0.01: not offered as is)"))
    result = dict(rows=rows, cpu=cpu_description(), threads=torch.get_num_threads(), torch=torch.__version__,
                  config=args.config, weights=str(args.weights), native_bf16=native_bf16)
    write_json(args.json, result)
    # this machine's verdict for `infer --fast` (emulated bf16 computes what native bf16 does)
    kept = record_ap_check({r["path"]: r["offered"] for r in rows}, source=f"benchmarks/inference_ap.py {args.weights}")
    print(f"paths within 0.01 AP recorded for --fast in {kept}")
    if args.readme:
        rewrite_block(args.readme, "inference-ap-table", markdown(result))
    return result


def markdown(result: dict) -> str:
    base = result["rows"][0]
    lines = [f"{result['cpu']}, {result['threads']} threads, torch {result['torch']}; `{result['config']}` "
             f"validation images" + ("" if result["native_bf16"] else "; bf16 emulated (no native bf16 here)") + ":",
             "", "| path | box AP | mask AP | vs fp32 (box / mask) | s / image | offered by --fast |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['path']} | {r['bbox_AP']:.4f} | {r.get('segm_AP', float('nan')):.4f} | "
                     f"{r['bbox_AP'] - base['bbox_AP']:+.4f} / {r.get('segm_AP', 0) - base.get('segm_AP', 0):+.4f} | "
                     f"{r['seconds'] / r['images']:.2f} | {'yes' if r['offered'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
