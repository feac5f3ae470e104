"""The ``res2det`` command line. User errors print one line and exit with code 2 (no traceback)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..version import __version__
from ..checkpoint import append_text, atomic_write
from ..errors import Res2DetError
from ..interrupt import Interrupted, signal_name, stop_on_signals, stop_requested
from .common import FAST_HELP, OPTIMIZE_HELP, bf16_form, check_output, fastest_path, optimized, run, text_table


def cmd_list(args) -> None:
    from ..zoo import list_models

    print("\n".join(list_models(args.task)))


def cmd_zoo(args) -> None:
    """Every named model (or those named): origin, published figures per release (the publisher's own), file,
    source URL, and res2det's measured params and GFLOPs (as ``res2det benchmark`` counts them; cached)."""
    from tqdm import tqdm

    from ..zoo import MODELS, get_spec
    from ..profiling import default_size, model_complexity
    from .benchmark import published_text, releases

    names = sorted(MODELS, key=lambda n: (MODELS[n].task, n))
    if args.models:
        names = [get_spec(n).name for n in args.models]
    measured = {}
    if not args.no_measure:
        for name in tqdm(names, desc="measuring params and GFLOPs (cached)", unit="model", file=sys.stderr,
                         leave=False, dynamic_ncols=True):
            measured[name] = model_complexity(name)
    rows = []
    for name in names:
        spec = MODELS[name]
        size = "x".join(map(str, default_size(spec)))
        params, gflops = measured.get(name, (None, None))
        cost = [f"{params / 1e6:.2f}", f"{gflops:.1f} @{size}"] if name in measured else []
        found = releases(spec) or [None]
        for i, pw in enumerate(found):
            first = [name, spec.task, spec.origin] if i == 0 else ["", "", ""]
            if pw is None:
                row = first + ["no weights released", "-"]
            else:
                row = first + [f"{pw.source}: {published_text(pw)}", pw.filename]
            row += (cost if i == 0 else [""] * len(cost)) + ([pw.url] if pw is not None else ["-"])
            rows.append(row)
    header = ["model", "task", "origin", "published (source: figures as published)", "file"]
    header += ["params (M)", "GFLOPs"] if measured else []
    print(text_table(rows, header + ["source URL"]))
    print("\npublished: the publisher's own figures (top-1 %, COCO box / mask AP, training memory, fps on their "
          "hardware); 'paddle-static' files are PaddleDetection's static-graph releases, listed, not loadable.")
    if measured:
        print("params, GFLOPs: measured by res2det; GFLOPs = conv + linear multiply-adds per image at the given "
              "input (detectors padded to a multiple of 32, RoI heads at full load), as `res2det benchmark`.")


def cmd_classify(args) -> None:
    from ..images import classification_input
    from ..zoo import create_model

    model = create_model(args.model, weights=args.weights).eval()
    for image in args.images:
        x = classification_input(image, model.preprocess)[None]
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
        top = probs.topk(args.topk)
        print(f"{image}: " + ", ".join(f"class {i} ({p:.3f})" for p, i in zip(top.values.tolist(), top.indices.tolist())))


DETECTION_TASKS = ("detection", "instance_segmentation")


def _detection_record(image: str, det) -> dict:
    """One image's ``--out`` entry; masks as COCO run-length encodings with ``counts`` as text."""
    masks = None if det.instance_masks is None else det.instance_masks.rle()  # from the crops
    dets = []
    for i, (box, score, label) in enumerate(zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())):
        d = {"bbox": box, "score": score, "label": label, "category": det.categories[i]}
        if masks is not None:
            d["mask"] = {"size": [int(v) for v in masks[i]["size"]], "counts": masks[i]["counts"].decode("ascii")}
        dets.append(d)
    return {"file": str(image), "width": det.width, "height": det.height, "detections": dets}


def _coco_ids(ann: str | None, images: list[str], class_names: tuple[str, ...]) -> tuple[dict[str, Any], list]:
    """(image path -> COCO image id, contiguous label -> category id) for ``--coco-json``: from ``--ann`` (by
    file name and by category name), else numeric file stems (``000000397133.jpg`` -> 397133) and COCO's own
    category ids for a model with COCO's 80 classes."""
    from ..zoo.mmdetection import COCO_CATEGORY_IDS, COCO_CLASSES

    if ann is not None:
        from ..data.coco_dataset import coco_ids

        by_name, cats = coco_ids(ann)
        missing = [n for n in class_names if n not in cats]
        if missing:
            raise Res2DetError(f"{ann}: no category named {', '.join(map(repr, missing[:5]))} (the model's classes "
                               f"must be the annotation file's categories)")
        cat_ids = [cats[n] for n in class_names]
    elif tuple(class_names) == COCO_CLASSES:
        cat_ids = list(COCO_CATEGORY_IDS)
    else:
        raise Res2DetError("--coco-json: the model's classes are not COCO's; pass --ann ANNOTATIONS.json to map "
                           "them to category ids")
    image_ids = {}
    for image in images:
        name = Path(image).name
        if ann is not None:
            if name not in by_name:
                raise Res2DetError(f"{image}: not an image of {ann} (no file_name {name!r})")
            image_ids[image] = by_name[name]
        elif Path(image).stem.isdigit():
            image_ids[image] = int(Path(image).stem)
        else:
            raise Res2DetError(f"{image}: --coco-json needs an image id: a numeric file name, or --ann "
                               "ANNOTATIONS.json that lists the image")
    return image_ids, cat_ids


def _write_coco_json(prefix: str, records: list[dict], image_ids: dict[str, Any], cat_ids: list, *,
                     with_masks: bool) -> None:
    """``PREFIX.bbox.json`` (and ``PREFIX.segm.json`` for masks) in COCO's results format from ``--out``
    records, for ``COCOeval`` (segm records carry no bbox, see ``to_coco_results``)."""
    from ..evaluation.coco_eval import to_coco_results, write_results_json

    results: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for r in records:
        dets = r["detections"]
        boxes = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64).reshape(-1, 4)
        bbox, _ = to_coco_results(image_ids[r["file"]], boxes, [d["score"] for d in dets], [d["label"] for d in dets],
                                  label_to_cat_id=cat_ids)
        results["bbox"] += bbox
        results["segm"] += [{"image_id": b["image_id"], "category_id": b["category_id"], "score": b["score"],
                             "segmentation": d["mask"]} for b, d in zip(bbox, dets) if "mask" in d]
    for kind in ("bbox", "segm") if with_masks else ("bbox",):
        write_results_json(results[kind], f"{prefix}.{kind}.json")
        print(f"COCO results written to {prefix}.{kind}.json")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def expand_images(sources: list[str]) -> list[str]:
    """Files as given; a folder -> its image files (by suffix, sorted); a glob pattern (``*``, ``?``, ``[``,
    ``**`` for subfolders) -> the files it matches, sorted. A folder or pattern with no image is an error."""
    import glob

    out = []
    for source in sources:
        if Path(source).is_dir():
            found = sorted(str(f) for f in Path(source).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(source):
            found = sorted(f for f in glob.glob(source, recursive=True) if Path(f).is_file())
        else:
            out.append(source)
            continue
        if not found:
            raise Res2DetError(f"{source}: no image files {'in this folder' if Path(source).is_dir() else 'match'}")
        out += found
    return out


def _done_files(path: Path, *, retry_bad: bool = False) -> tuple[set[str], int]:
    """(the images an earlier, interrupted run already wrote to the JSON-lines file ``path``, how many of those
    are unreadable-image records). A last line the interruption cut short is dropped from the file; so are the
    unreadable-image records with ``retry_bad`` (their images are then not done)."""
    done, lines, kept, bad = set(), path.read_text(encoding="utf-8").splitlines(keepends=True), [], 0
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            file = record["file"]
        except (ValueError, KeyError, TypeError):
            if n < len(lines):  # only the last line may have been cut short by the interruption
                raise Res2DetError(f"{path}: line {n} is not a record written by `res2det infer`") from None
            continue
        if "error" in record and retry_bad:
            continue
        done.add(file)
        bad += "error" in record
        kept.append(line)
    if len(kept) != len(lines):
        text = "".join(kept)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return done, bad


def _readable_head(images: list[str], count: int) -> list[str]:
    """The first ``count`` of ``images`` that decode (example and calibration images when unreadable files are
    skipped)."""
    from ..images import load_image

    found = []
    for image in images:
        try:
            load_image(image)
        except Res2DetError:
            continue
        found.append(image)
        if len(found) == count:
            break
    if not found:
        raise Res2DetError(f"none of the {len(images)} image(s) can be read")
    return found


def _first_readable(images: list[str]) -> str:
    """The first of ``images`` that decodes (the example image of --backend onnxruntime / --optimize)."""
    return _readable_head(images, 1)[0]


# --precision int8 (and --fast, which may pick it): images calibrating the quantisation when --calibration is not
# given, the first this many readable images of the run
CALIBRATION_IMAGES = 8


def cmd_infer(args) -> None:
    with stop_on_signals():  # SIGTERM / SIGINT: stop after the current image's record, exit 128 + the signal
        _infer(args)


def _infer(args) -> None:
    from tqdm import tqdm

    from ..deploy.runner import GraphDetector
    from ..images import check_image
    from ..visualize import draw_detections
    from ..zoo import create_model, get_spec, list_models

    if args.onnx is None:
        if args.model is None:
            raise Res2DetError("infer needs --model NAME (or --onnx FILE written by `res2det export`)")
        spec = get_spec(args.model)
        if spec.task not in DETECTION_TASKS:
            detectors = [n for t in DETECTION_TASKS for n in list_models(t)]
            raise Res2DetError(f"{args.model} is a {spec.task} model; infer needs a detector: {', '.join(detectors)}")
    if args.score_thr is not None and not 0.0 <= args.score_thr <= 1.0:
        raise Res2DetError(f"--score-thr must lie in [0, 1], got {args.score_thr}")
    if args.workers < 0:
        raise Res2DetError(f"--workers must be 0 or more, got {args.workers}")
    graph_runtime = args.onnx is not None or args.backend != "torch"
    if (args.onnx is not None or args.backend == "onnxruntime") and args.precision != "fp32":
        raise Res2DetError("ONNX Runtime runs the graph in fp32; --precision applies to the PyTorch and OpenVINO "
                           "backends")
    if args.precision == "int8" and args.backend != "openvino":
        raise Res2DetError("--precision int8 is the OpenVINO backend's (a graph quantised by NNCF): add "
                           "--backend openvino")
    if args.calibration and args.precision != "int8" and not args.fast:
        raise Res2DetError("--calibration goes with --precision int8 (or --fast)")
    if args.optimize and (graph_runtime or args.precision != "fp32"):
        raise Res2DetError("--optimize is the fp32 PyTorch path's; leave out --precision, --backend and --onnx")
    if args.fast and (args.optimize or args.onnx is not None or args.backend != "torch" or args.precision != "fp32"):
        raise Res2DetError("--fast chooses the backend and precision itself; leave out --backend, --precision, "
                           "--optimize and --onnx")
    if args.backend != "torch":
        from ..deploy.backend import require_runtime

        require_runtime(args.backend)  # a missing package: one line, before any work
    images = expand_images(args.images)
    keep_going = args.on_bad == "skip" and len(images) > 1  # one image: nothing to go on with, its error it is
    for image in images if not keep_going else ():  # fail on a missing or non-image file before building the model
        check_image(image)
    jsonl = args.out is not None and args.out.endswith(".jsonl")
    if args.resume and not jsonl:
        raise Res2DetError("--resume continues a JSON-lines --out FILE.jsonl")
    if args.retry_bad and not args.resume:
        raise Res2DetError("--retry-bad goes with --resume (it tries again the images recorded as unreadable)")
    if args.out:
        check_output(args.out, "--out")
    if args.draw:
        check_output(args.draw, "--draw", folder=True)
    if args.ann and not args.coco_json:
        raise Res2DetError("--ann goes with --coco-json PREFIX")
    for kind in ("bbox", "segm") if args.coco_json else ():
        check_output(f"{args.coco_json}.{kind}.json", "--coco-json")
    all_images = images
    if args.resume and Path(args.out).exists():
        done, earlier_bad = _done_files(Path(args.out), retry_bad=args.retry_bad)
        images = [i for i in images if str(i) not in done]
        unreadable = f" ({earlier_bad} of them unreadable; --retry-bad tries those again)" if earlier_bad else ""
        print(f"--resume: {len(done)} image(s) already in {args.out}{unreadable}, {len(images)} to go")
    if args.onnx is not None:  # the exported graph in ONNX Runtime, with the same predict()
        from .export import onnx_detector

        model = onnx_detector(args.onnx, model=args.model, weights=args.weights)
    else:
        model = create_model(args.model, weights=args.weights).eval()
        if args.weights is None:
            print(f"res2det: warning: no --weights given, so {args.model} is randomly initialised; its detections "
                  f"mean nothing. Pass --weights FILE or --weights mmdet.", file=sys.stderr)
        calibration = None
        # (--fast without NNCF installed never quantises: no calibration images to read)
        if images and (args.precision == "int8" or (args.fast and importlib.util.find_spec("nncf") is not None)):
            calibration = (expand_images(args.calibration) if args.calibration
                           else _readable_head(all_images, CALIBRATION_IMAGES))
        if args.fast and images:
            model = fastest_path(model, model_name=args.model, example=_first_readable(images),
                                 calibration=calibration)
        elif args.backend != "torch" and images:
            from ..deploy import graph_backend

            if args.precision == "int8":
                print(f"--precision int8: calibrated on {len(calibration)} image(s)"
                      + ("" if args.calibration else " (the first of those given; --calibration to choose)"))
            model = graph_backend(model, model_name=args.model, check_image=_first_readable(images),
                                  runtime=args.backend, precision=args.precision, streams=args.streams,
                                  calibration=calibration)
        elif args.precision == "bf16" and images:
            model = bf16_form(model, _first_readable(images))
        if args.optimize and images:
            model = optimized(model, _first_readable(images))
    if args.coco_json:  # ids checked before any image runs
        image_ids, cat_ids = _coco_ids(args.ann, all_images, tuple(model.class_names))
    draw_dir = Path(args.draw) if args.draw else None
    draw_thr = 0.3 if args.score_thr is None else args.score_thr
    options = {"batch_size": args.batch_size}
    if not isinstance(model, GraphDetector):  # bf16: the converted model's own, or fp32 after the fallback warning
        options["precision"] = getattr(model, "inference_precision", "fp32" if args.precision == "bf16" else
                                       args.precision)
    records, drawn, count, start, with_masks, bad = [], set(), 0, time.perf_counter(), False, []
    if jsonl and not args.resume:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(""))
    bar = tqdm(total=len(images), unit="img", disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def skip_unreadable(image, message: str) -> None:  # --on-bad skip: one line, a record, and go on
        bad.append(image)
        bar.update()
        bar.write(f"res2det: warning: {message}; skipped", file=sys.stderr)
        record = {"file": str(image), "error": message}
        if jsonl:  # so that --resume does not try it again (unless --retry-bad)
            append_text(args.out, json.dumps(record) + "\n")
        elif args.out:
            records.append(record)
        stop_if_signalled()

    def stop_if_signalled() -> None:  # between two images: every record written so far is complete
        signum = stop_requested()
        if signum:
            kept = (f"the records in {args.out} are complete; to continue, run the same command with --resume"
                    if jsonl else "nothing written (--out FILE.jsonl keeps each image's record as it is done)")
            raise Interrupted(signum, f"{signal_name(signum)}: stopped after {count + len(bad)} of {len(images)} "
                                      f"image(s); {kept}")

    try:
        stop_if_signalled()
        for image, rgb, det in model.iter_predict(images, score_thr=args.score_thr, num_workers=args.workers,
                                                  on_bad=skip_unreadable if keep_going else None, **options):
            bar.update()
            count += 1
            with_masks = det.instance_masks is not None
            top = ", ".join(f"{c} {s:.2f}" for c, s in zip(det.categories[:3], det.scores[:3].tolist()))
            bar.write(f"{image}: {det.width}x{det.height}, {len(det)} detections" + (f" (top: {top})" if top else ""))
            if jsonl:  # one line per image, on disk before the next image starts
                append_text(args.out, json.dumps(_detection_record(image, det)) + "\n")
            elif args.out or args.coco_json:
                records.append(_detection_record(image, det))
            if draw_dir is not None:
                stem, n = Path(image).stem, 1
                while stem in drawn:  # two inputs with the same name: keep both drawings
                    n += 1
                    stem = f"{Path(image).stem}_{n}"
                drawn.add(stem)
                picture = draw_detections(rgb, det, score_thr=draw_thr)
                path = draw_dir / f"{stem}.png"
                atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
                bar.write(f"  drawn: {path}")
            stop_if_signalled()
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    print(f"{count} image(s) in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.2f} images/s)")
    if args.out and not jsonl:
        text = json.dumps(records)
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if args.out:
        print(f"detections written to {args.out}")
    if args.coco_json:  # from every record, those of an earlier interrupted run included
        if jsonl:
            records = [json.loads(line) for line in Path(args.out).read_text(encoding="utf-8").splitlines()]
        records = [r for r in records if r["file"] in image_ids and "error" not in r]
        with_masks = with_masks or any("mask" in d for r in records for d in r["detections"])
        _write_coco_json(args.coco_json, records, image_ids, cat_ids, with_masks=with_masks)
    if bad:
        where = f"; {args.out} records them with an 'error' field" if args.out else ""
        retry = " (--resume --retry-bad tries them again)" if jsonl else ""
        raise Res2DetError(f"{len(bad)} of {len(images)} image(s) could not be read and were skipped{where}{retry}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="res2det", description="Res2Net backbones and detectors")
    parser.add_argument("--version", action="version", version=f"res2det {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="names of the models create_model accepts")
    p.add_argument("--task", choices=["classification", "detection", "instance_segmentation"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("zoo", help="every named model: origin, published figures and files, measured params and GFLOPs")
    p.add_argument("models", nargs="*", metavar="NAME", help="only these models (default: all)")
    p.add_argument("--no-measure", action="store_true", help="skip res2det's params/GFLOPs columns (they build "
                   "each model and run one forward pass: one to two minutes on 2 cores the first time, then cached)")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("classify", help="top-k ImageNet classes for images")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", help="checkpoint file or a published source ('official', 'timm', ...)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("infer", help="detect objects (and masks) in images with a COCO detector")
    p.add_argument("--model", help="a detection or instance_segmentation model (see `res2det list`)")
    p.add_argument("--weights", help="checkpoint file or a published source ('mmdet')")
    p.add_argument("--onnx", metavar="FILE", help="run this `res2det export` graph in ONNX Runtime instead of a "
                   "PyTorch model (same pre-processing, outputs and drawing)")
    p.add_argument("--score-thr", type=float, help="keep detections scoring at least this (after the model's "
                   "own 0.05); also the drawing threshold (default 0.3 there)")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                   help="onnxruntime / openvino: export the model's graph once into the cache (checked against "
                        "PyTorch on the first image), then run it in ONNX Runtime (fp32) or OpenVINO (fp32 or "
                        "--precision bf16; pip install 'res2det[openvino]')")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"], default="fp32",
                   help="precision of the layers (scores, boxes, NMS and masks stay fp32): bf16 converts the "
                        "weights once (BN folded; OpenVINO: its precision hint), fp16 is PyTorch autocast; falls "
                        "back to fp32 with a warning where the CPU has no native instructions for it; int8 "
                        "(--backend openvino, pip install 'res2det[int8]'): the graph quantised once by NNCF on "
                        "--calibration images, the mask head kept fp32")
    p.add_argument("--calibration", action="append", metavar="PATH", help="an image or folder whose activation "
                   f"ranges calibrate --precision int8 (repeatable; no labels needed; default: the first "
                   f"{CALIBRATION_IMAGES} readable images given)")
    p.add_argument("--optimize", action="store_true", help=OPTIMIZE_HELP)
    p.add_argument("--fast", action="store_true", help=FAST_HELP)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (PyTorch backend; OpenVINO: "
                   "images handed to its streams together)")
    p.add_argument("--streams", type=int, default=1, help="OpenVINO: images run at once, sharing the threads")
    p.add_argument("--workers", type=int, default=0, help="background processes that decode and resize images "
                   "while the model runs")
    p.add_argument("--out", help="write the detections: FILE.jsonl one JSON line per image as it is done (an "
                   "interruption loses nothing; see --resume), any other name one JSON list at the end; masks as "
                   "COCO RLE")
    p.add_argument("--resume", action="store_true", help="with --out FILE.jsonl: skip the images already in it")
    p.add_argument("--on-bad", choices=["skip", "fail"], default="skip",
                   help="an image that cannot be read or decoded: skip (default: one line, a record with an "
                        "'error' field in --out, the run goes on, and the exit code is 2 at the end) or fail (stop "
                        "at the first, before the model is built when its header is bad; so does a single image)")
    p.add_argument("--retry-bad", action="store_true", help="with --resume: try again the images recorded as "
                   "unreadable")
    p.add_argument("--coco-json", metavar="PREFIX", help="also write COCO results files PREFIX.bbox.json (and "
                   "PREFIX.segm.json) for evaluation; image ids from numeric file names or --ann")
    p.add_argument("--ann", metavar="FILE", help="with --coco-json: the COCO file whose image file names and "
                   "category names give the ids")
    p.add_argument("--draw", metavar="DIR", help="save each image with its detections drawn as DIR/<stem>.png")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (their images) or glob "
                   "patterns ('photos/**/*.jpg')")
    p.set_defaults(func=cmd_infer)

    from .train import add_parsers as add_train_parsers

    add_train_parsers(sub)

    from .data import add_parser as add_data_parser

    add_data_parser(sub)

    from .benchmark import add_parser as add_benchmark_parser

    add_benchmark_parser(sub)

    from .export import add_parser as add_export_parser

    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
