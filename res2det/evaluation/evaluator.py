"""``evaluate_model``: run a detector over a COCO dataset (each DDP rank a share) and score it with pycocotools."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from ..checkpoint import atomic_write
from ..errors import Res2DetError
from ..inference import autocast_dtype
from ..loading import Loader
from ..images import pad_batch
from .coco_eval import IOU_TYPES, coco_evaluate, format_per_class, to_coco_results, write_results_json

# Per image id: (bbox records, segm records); an image without detections has two empty lists.
ImageRecords = dict[int, tuple[list[dict], list[dict]]]


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _eval_collate(samples: list[Mapping[str, Any]]) -> tuple[torch.Tensor, list[tuple[int, int]], list[dict]]:
    """(images zero-padded to a multiple of 32, unpadded sizes, metas): all inference needs; the ground truth a
    sample may carry is not batched."""
    metas = [{k: s[k] for k in ("image_id", "orig_size", "scale_factor")} for s in samples]
    return pad_batch([s["image"] for s in samples]), [tuple(s["image"].shape[-2:]) for s in samples], metas


def evaluate_model(model: nn.Module, dataset: Any, *, batch_size: int = 1, device: str | torch.device | None = None,
                   out_dir: str | Path | None = None, progress: bool = True, num_workers: int = 0,
                   label_to_cat_id: Sequence[int] | None = None, precision: str = "fp32") -> dict[str, float]:
    """COCO box (and, for mask models, mask) metrics of a detector on ``dataset``.

    ``dataset`` yields samples with ``image`` (normalised ``[3, h, w]``, unpadded), ``image_id``, ``orig_size``
    ``(H, W)`` and ``scale_factor`` ``(sx, sy)``, and has ``coco`` (its pycocotools ``COCO``). Contiguous label
    ``k`` is category ``label_to_cat_id[k]`` (default: ``dataset.label_to_cat_id``, else the sorted category
    ids, as ``CocoDataset`` numbers them).
    The model runs in eval mode under ``torch.inference_mode`` on ``device`` (default: where its parameters
    are; given, the model is moved there); its previous mode is restored. Detections go to original pixels
    through ``model.postprocess`` (as ``predict`` does). ``precision`` is ``predict``'s (autocast of the layers
    where the device runs it natively, ``res2det.inference.autocast_dtype``).

    Under ``torch.distributed`` each rank runs every world_size-th image, results are gathered on rank 0,
    which evaluates and writes ``out_dir`` (``bbox.json``, ``segm.json``, ``coco_eval.txt`` with COCOeval's
    summary and per-class AP tables, ``metrics.json``); every rank returns the metrics (see ``coco_evaluate``).
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if getattr(net, "conventions", None) == "paddle_static":  # the dataset resizes as mmdetection does
        raise Res2DetError("COCO evaluation of the PaddleDetection static-graph rows is not available here (their "
                           "pre-processing differs); `res2det infer --coco-json PREFIX --ann FILE` writes results "
                           "files for COCOeval")
    if device is not None:
        net.to(device)
    if label_to_cat_id is None:
        label_to_cat_id = getattr(dataset, "label_to_cat_id", None)
        if label_to_cat_id is None:
            label_to_cat_id = sorted(dataset.coco.getCatIds())
    rank, world = _rank_and_world()
    loader = Loader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size, shuffle=False,
                    num_workers=num_workers, collate_fn=_eval_collate)
    param = next(net.parameters())
    dtype = autocast_dtype(precision, param.device)
    results: ImageRecords = {}
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(), torch.autocast(param.device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            bar = tqdm(loader, desc="evaluate", unit="batch",
                       disable=not (progress and rank == 0 and sys.stderr.isatty()))
            for images, sizes, metas in bar:
                detections = net.detect(images.to(param.device, param.dtype), sizes, paste_masks=False,
                                        image_metas=metas)
                for r, meta in zip(detections, metas):
                    boxes, scores, labels, masks = net.postprocess(r, scale_factor=meta["scale_factor"],
                                                                   orig_size=meta["orig_size"])
                    image_id = int(meta["image_id"])
                    results[image_id] = to_coco_results(image_id, boxes, scores, labels, masks,
                                                        label_to_cat_id=label_to_cat_id)
    finally:
        net.train(was_training)
    iou_types = IOU_TYPES if net.roi_head.with_mask else ("bbox",)
    return gather_and_evaluate(dataset.coco, results, iou_types=iou_types, out_dir=out_dir)


def gather_and_evaluate(coco_gt: Any, results: ImageRecords, *, iou_types: Sequence[str] = ("bbox",),
                        out_dir: str | Path | None = None) -> dict[str, float]:
    """Gather each rank's per-image records on rank 0 (a no-op without ``torch.distributed``), evaluate them
    there over exactly the images that have an entry, write ``out_dir``, and return the metrics on every rank.
    An error on rank 0 is raised on every rank rather than leaving the others waiting."""
    rank, world = _rank_and_world()
    if world > 1:
        # gather to rank 0 only (not all_gather): the records of a large val set need not sit on every rank
        shards: list[ImageRecords] | None = [{} for _ in range(world)] if rank == 0 else None
        dist.gather_object(results, shards, dst=0)
        if rank == 0:
            results = {k: v for shard in shards for k, v in shard.items()}
    outcome: Any = None
    if rank == 0:
        try:
            outcome = _evaluate_records(coco_gt, results, iou_types, out_dir)
        except Exception as e:
            if world == 1:
                raise
            outcome = e
    if world > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _evaluate_records(coco_gt: Any, results: ImageRecords, iou_types: Sequence[str],
                      out_dir: str | Path | None) -> dict[str, float]:
    img_ids = sorted(results)
    metrics: dict[str, float] = {}
    report = []
    for iou_type in iou_types:
        records = [rec for i in img_ids for rec in results[i][IOU_TYPES.index(iou_type)]]
        if out_dir is not None:
            write_results_json(records, Path(out_dir) / f"{iou_type}.json")
        ev = coco_evaluate(coco_gt, records, iou_type, img_ids=img_ids)
        metrics.update(ev.metrics)
        report += [f"== {iou_type} ==", ev.summary, format_per_class(ev.per_class, f"{iou_type} AP per class")]
    if out_dir is not None:
        atomic_write(Path(out_dir) / "coco_eval.txt", lambda tmp: Path(tmp).write_text("\n".join(report)))
        atomic_write(Path(out_dir) / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=1)))
    return metrics
