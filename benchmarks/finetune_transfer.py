"""Does class transfer help? Box AP of the classes a fine-tuning run shares by name with its checkpoint, after the
same number of iterations from that checkpoint and from scratch.

    python benchmarks/finetune_transfer.py [--threads 2] [--json OUT] [--pretrain-epochs 4] [--finetune-epochs 6]
                                           [--image-size 160] [--seeds 0 1]

Two disjoint synthetic shapes sets (res2det.data.synthetic, other seeds than the main job's):
* the checkpoint: ``mask_rcnn_r2_tiny_fpn`` trained on set A with the classes ``circle`` and ``square`` only
  (triangles are unlabelled background there);
* the fine-tuning data: a small set B (40 training images) with the classes ``Circle`` (transferred by name:
  case is ignored) and ``triangle`` (new).
The fine-tuning runs use the same recipe, seed, data order and iterations; only the start differs:
* ``by name``: the checkpoint through ``init_weights``, ``Circle`` taking ``circle``'s rows;
* ``rows rebuilt``: the same checkpoint, the circle class named ``disc`` in B so that no name matches: every
  class row gets the head's own initialisation (what mmdetection and detectron2 do with other class counts);
* ``scratch``: no checkpoint (the shapes preset's start: no ImageNet weights either).
The table gives box AP (0.5:0.95) on B's 40 validation images for the circle class and for triangle, and their
mean. Use ``--threads 1`` on a machine shared with other work: OpenMP threads that wait for a busy core slowed
2-thread training by about 10x here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from res2det.checkpoint import atomic_write, save_weights  # noqa: E402
from res2det.data import shapes_dataset  # noqa: E402
from res2det.engine.train_config import SHAPES, DataConfig, Recipe  # noqa: E402
from res2det.engine.trainer import Trainer  # noqa: E402
from res2det.evaluation.coco_eval import coco_evaluate  # noqa: E402

from inference import cpu_name  # noqa: E402


def subset(source: Path, target: Path, keep: dict[str, str]) -> Path:
    """``source`` with only the categories in ``keep`` (old name -> new name); images linked, not copied."""
    for split in ("train", "val"):
        data = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        cats = {c["id"]: keep[c["name"]] for c in data["categories"] if c["name"] in keep}
        data["categories"] = [{"id": i, "name": n} for i, n in cats.items()]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in cats]
        (target / "annotations").mkdir(parents=True, exist_ok=True)
        (target / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        if not (target / split).exists():
            os.symlink((source / split).resolve(), target / split)
    return target


def config(root: Path, out: Path, epochs: int, seed: int, size: int, **changes):
    recipe = Recipe(epochs=epochs, milestones=(epochs,), optimizer="adamw", base_lr=0.001, base_batch_size=4,
                    weight_decay=0.05, warmup_iters=20)
    data = DataConfig(root=str(root), train_split="train", val_split="val", num_workers=0, scale=(size, size))
    return dataclasses.replace(SHAPES, data=data, recipe=recipe, eval_every=0, draw=0, log_every=10, out_dir=str(out),
                               seed=seed, **changes)


def train(cfg, run: Path) -> tuple[Trainer, float]:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run, progress=False)
    trainer.fit()
    return trainer, time.perf_counter() - t0


def per_class_ap(trainer: Trainer, run: Path) -> dict[str, float]:
    results = json.loads(next(run.glob("eval/epoch_*/bbox.json")).read_text())
    rows = coco_evaluate(trainer.val_set.coco, results, "bbox").per_class
    return {r.name: r.AP for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--image-size", type=int, default=160, help="shapes image size = the model's input size")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="finetune_transfer."))
    a = subset(shapes_dataset(work / "src", seed=101, num_train=200, num_val=10, image_size=args.image_size),
               work / "A", {"circle": "circle", "square": "square"})
    b_src = shapes_dataset(work / "src", seed=202, num_train=40, num_val=40, image_size=args.image_size)
    b = subset(b_src, work / "B", {"circle": "Circle", "triangle": "triangle"})
    b_renamed = subset(b_src, work / "B_renamed", {"circle": "disc", "triangle": "triangle"})
    pre, pre_s = train(config(a, work / "runs", args.pretrain_epochs, 0, args.image_size), work / "runs" / "pretrain")
    ckpt = work / "pretrained.safetensors"
    save_weights(pre.model, ckpt, model_name=SHAPES.model, options=pre.model_options())
    print(f"checkpoint: {pre.max_iters} iterations on A (circle, square) in {pre_s / 60:.1f} min", flush=True)
    rows = []
    for seed in args.seeds:
        for start, data, changes in (("by name", b, {"init_weights": str(ckpt)}),
                                     ("rows rebuilt", b_renamed, {"init_weights": str(ckpt)}), ("scratch", b, {})):
            run = work / "runs" / f"{start.replace(' ', '_')}-{seed}"
            trainer, seconds = train(config(data, work / "runs", args.finetune_epochs, seed, args.image_size,
                                            **changes), run)
            ap = per_class_ap(trainer, run)
            circle = ap.get("Circle", ap.get("disc"))
            rows.append({"start": start, "seed": seed, "iterations": trainer.max_iters, "seconds": round(seconds, 1),
                         "circle": round(circle, 4), "triangle": round(ap["triangle"], 4),
                         "mean": round((circle + ap["triangle"]) / 2, 4)})
            if trainer.class_transfer is not None:
                print("\n".join(trainer.class_transfer.lines()))
            print(rows[-1], flush=True)
    print(f"\nCPU: {cpu_name()}, {args.threads} threads; fine-tuning on B: {rows[0]['iterations']} iterations\n")
    print("| start | seed | circle box AP (in the checkpoint) | triangle box AP (new) | mean | time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {r['seed']} | {r['circle']:.3f} | {r['triangle']:.3f} | {r['mean']:.3f} | "
              f"{r['seconds']:.0f} |")
    if args.json:
        text = json.dumps({"cpu": cpu_name(), "threads": args.threads, "pretrain_iterations": pre.max_iters,
                           "rows": rows}, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
