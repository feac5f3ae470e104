"""``res2det train`` and ``res2det test``: a run folder per run (config, log, checkpoints, plot, results)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

from ..errors import Res2DetError
from ..images import pad_batch
from .common import OPTIMIZE_HELP, check_output, optimized


def _config(args):
    from ..engine.train_config import RECIPES, apply_settings, load_config

    cfg = load_config(args.config)
    if args.data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=args.data))
    if getattr(args, "amp", None):
        cfg = dataclasses.replace(cfg, amp=args.amp)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.out:
        cfg = dataclasses.replace(cfg, out_dir=args.out)
    if getattr(args, "recipe", None):
        cfg = dataclasses.replace(cfg, recipe=RECIPES[args.recipe])
    if getattr(args, "init", None):
        cfg = dataclasses.replace(cfg, init_weights=args.init)
    if getattr(args, "class_map", None):
        cfg = dataclasses.replace(cfg, class_map=(*cfg.class_map, *args.class_map))
    cfg = apply_settings(cfg, args.set or [])
    check_output(cfg.out_dir, "--out", folder=True)  # before any data is read or model built
    return cfg


def _run_name(config: str) -> str:
    return Path(config).stem if config.endswith(".py") else config


@contextlib.contextmanager
def new_run_folder(out_dir: str | Path, name: str, dist) -> Iterator[Path]:
    """A new run folder ``out_dir/name[-k]`` (``new_run_dir``: made by rank 0, its path sent to every rank),
    removed again, with the folders above it that it needed, when the work inside fails before writing into it
    (a run that never started leaves nothing behind)."""
    from ..engine.distributed import broadcast_object
    from ..engine.trainer import new_run_dir

    made = [p for p in (Path(out_dir), *Path(out_dir).parents) if not p.exists()]
    run_dir = broadcast_object(new_run_dir(out_dir, name) if dist.is_main else None, dist)
    try:
        yield run_dir
    except BaseException:
        if dist.is_main:
            for folder in (run_dir, *made):
                with contextlib.suppress(OSError):  # only an empty folder is removed
                    folder.rmdir()
        raise


def print_metrics(metrics: dict[str, float]) -> None:
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        if f"{kind}_AP" in metrics:
            parts = [f"{k.split('_', 1)[1]} {metrics[k]:.3f}" for k in metrics if k.startswith(f"{kind}_AP")]
            print(f"{label} AP: " + ", ".join(parts))


def cmd_train(args) -> None:
    from ..interrupt import stop_on_signals

    with stop_on_signals():  # SIGTERM / SIGINT from here on: a checkpoint, one line, exit 128 + the signal number
        _train(args)


def _train(args) -> None:
    from ..engine.distributed import init_distributed
    from ..engine.trainer import Trainer, latest_run_dir
    from ..interrupt import Interrupted

    cfg = _config(args)
    dist = init_distributed(cfg.device)
    name = _run_name(args.config)
    resume = None
    if args.resume is not None:
        if args.resume == "latest":
            run_dir = latest_run_dir(cfg.out_dir, name)
            if run_dir is None:
                raise Res2DetError(f"--resume: no run of {name!r} with a checkpoint under {cfg.out_dir}/")
            resume = True
        else:
            target = Path(args.resume)
            run_dir, resume = (target, True) if target.is_dir() else (target.parent, target)
    if resume is not None:
        trainer = Trainer(cfg, run_dir, resume=resume, dist=dist)
    else:
        with new_run_folder(cfg.out_dir, name, dist) as run_dir:
            trainer = Trainer(cfg, run_dir, dist=dist)
    if dist.is_main:
        for line in trainer.notes:  # classes transferred / new, layers rebuilt, branches left out
            print(line, flush=True)
        print(f"run folder: {run_dir}  ({trainer.iters_per_epoch} iterations/epoch x {cfg.recipe.epochs} epochs, "
              f"{dist.world_size} process(es) x batch {cfg.batch_size}, device {dist.device})", flush=True)
    try:
        summary = trainer.fit()
    except Interrupted as e:
        raise Interrupted(e.signum, f"{e}; to continue, run the same command with --resume {run_dir}" if str(e)
                          else "") from None
    if not dist.is_main:
        return
    from ..checkpoint import save_weights

    final = run_dir / "model_final.safetensors"
    save_weights(trainer.model, final, model_name=cfg.model, options=trainer.model_options())
    if summary["already_finished"]:
        print(f"{run_dir}: this run had already finished its {summary['iterations']} iterations; weights: {final}; "
              "its final evaluation:")
    else:
        print(f"trained {summary['iterations']} iterations in {summary['seconds'] / 60:.1f} min; weights: {final}")
    print_metrics(summary["metrics"])
    if cfg.draw:
        drawn = draw_samples(trainer.model, trainer.val_set, run_dir / "drawn", cfg.draw)
        print(f"drew {len(drawn)} validation images: {run_dir / 'drawn'}")
    print(f"log: {run_dir / 'log.jsonl'}, plot: {run_dir / 'plot.png'}")


def draw_samples(model, dataset, out_dir: Path, count: int, score_thr: float = 0.5) -> list[Path]:
    """Draw the model's detections on the first ``count`` images of ``dataset``."""
    from ..checkpoint import atomic_write
    from ..images import to_rgb_uint8
    from ..visualize import draw_detections

    paths = []
    for file in [r.file for r in dataset.records[:count]]:
        rgb = to_rgb_uint8(file)
        (det,) = model.predict(rgb)
        picture = draw_detections(rgb, det, score_thr=score_thr)
        path = out_dir / f"{Path(file).stem}.png"
        atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def cmd_test(args) -> None:
    from ..engine.distributed import init_distributed
    from ..engine.trainer import build_dataset, model_preprocess
    from ..evaluation import evaluate_model
    from ..checkpoint import read_weights
    from ..zoo import SOURCES, checkpoint_classes, create_model, get_spec

    if args.optimize and args.precision != "fp32":
        raise Res2DetError("--optimize is the fp32 path's; leave out --precision")
    cfg = _config(args)
    dist = init_distributed(cfg.device)
    val = build_dataset(cfg, model_preprocess(cfg), "val")
    names = tuple(val.class_names)
    trained = checkpoint_classes(get_spec(cfg.model), read_weights(args.weights)[1], args.weights) \
        if args.weights not in SOURCES else get_spec(cfg.model).config.class_names
    if trained and tuple(trained) != names:  # same count, other classes: labels would map wrongly
        raise Res2DetError(f"{args.weights}: trained on classes {list(trained)[:5]}{'...' if len(trained) > 5 else ''} "
                           f"but {val.ann_file} has {list(names)[:5]}{'...' if len(names) > 5 else ''}; "
                           "evaluate on data with the same categories")
    model = create_model(cfg.model, weights=args.weights, **cfg.model_options, num_classes=len(names),
                         class_names=names).to(dist.device)
    if args.optimize:
        model = optimized(model.eval(), pad_batch([val[0]["image"]]).to(dist.device))
    with new_run_folder(cfg.out_dir, f"{_run_name(args.config)}-test", dist) as run_dir:
        metrics = evaluate_model(model, val, batch_size=cfg.batch_size, device=dist.device, out_dir=run_dir,
                                 precision=args.precision, num_workers=cfg.data.num_workers)
    if dist.is_main:
        print((run_dir / "coco_eval.txt").read_text())  # COCOeval's summary and the per-class AP tables
        print_metrics(metrics)
        print(f"results (COCO JSON: bbox.json{', segm.json' if 'segm_AP' in metrics else ''}), "
              f"metrics.json, coco_eval.txt: {run_dir}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from ..engine.train_config import RECIPES

    def common(p):
        p.add_argument("config", help="a preset (`shapes`, or a zoo detector name) or a .py file defining `config`")
        p.add_argument("--data", metavar="ROOT", help="data folder: COCO (annotations/instances_{split}.json, {split}/), "
                       "Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/) or YOLO (data.yaml); see `res2det data`")
        p.add_argument("--set", nargs="+", action="extend", metavar="KEY=VALUE",
                       help="edit config fields, e.g. recipe.epochs=1 batch_size=4 model.frozen_stages=0 (repeatable)")
        p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")
        p.add_argument("--out", help="parent folder of the run folders (default: runs)")

    p = sub.add_parser("train", help="train a detector (single process, or one per GPU under torchrun)")
    common(p)
    p.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue the latest run of this config, or the run folder / checkpoint PATH")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16 with loss scaling)")
    p.add_argument("--init", metavar="SOURCE", help="fine-tune from these weights (a file, or a published source "
                   "such as mmdet): class-dependent rows transferred by class name (= --set init_weights=SOURCE)")
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a training schedule in place of the preset's (finetune: small data from --init weights)")
    p.add_argument("--class-map", nargs="+", action="extend", metavar="NEW=OLD",
                   help="pair a class of the data with a class of the --init checkpoint by hand (sofa=couch)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="COCO box/mask AP of a checkpoint on the config's validation set")
    common(p)
    p.add_argument("--weights", required=True, help="checkpoint file (res2det, mmdet, Paddle ...)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision of the layers, as `res2det infer --precision`")
    p.add_argument("--optimize", action="store_true", help=OPTIMIZE_HELP)
    p.set_defaults(func=cmd_test)
