"""The training loop: DDP-aware, mixed precision, exact resume, atomic checkpoints, evaluation, logging."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import append_text, atomic_write
from ..errors import Res2DetError
from ..interrupt import Interrupted, signal_name, stop_on_signals, stop_requested
from .run_checkpoints import CheckpointManager, load_training_checkpoint, rng_state, set_rng_state
from .train_config import TrainConfig, config_to_dict
from .distributed import (DistInfo, all_reduce_max, all_reduce_mean, any_rank, barrier, broadcast_object,
                          init_distributed)
from .plot import plot_training
from .schedule import build_optimizer, build_scheduler
from ..models.losses import total_loss
from .step import detector_losses


class NonFiniteLossError(Res2DetError):
    """A loss term became NaN or infinite; the weights were not updated with it."""


# ------------------------------------------------------------------------------------------------------ set-up
def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_dataset(cfg: TrainConfig, preprocess: Any, split: str):
    """The ``'train'`` or ``'val'`` dataset of ``cfg.data`` (the embedded shapes set when ``root`` is None), in
    whichever layout its folder has; masks are read only for a model with a mask head."""
    from ..data import CocoDataset, shapes_dataset
    from ..data.coco_dataset import MasksMissingError
    from ..data.layouts import detect_format, read_split, split_name
    from ..errors import DataError

    d = cfg.data
    root = Path(d.root) if d.root is not None else shapes_dataset()
    fmt = detect_format(root) if d.format == "auto" else d.format
    name = split_name(root, fmt, d.train_split if split == "train" else d.val_split, split)
    source = read_split(root, name, fmt=fmt, classes=d.classes, on_bad=d.on_bad)
    common = dict(preprocess=preprocess, scale=d.scale, on_bad=d.on_bad, coco_data=source.coco_data,
                  with_masks=model_config(cfg).roi_head.with_mask)
    try:
        if split == "train":
            dataset = CocoDataset(source.ann_file, source.image_dir, train=True, flip_prob=d.flip_prob,
                                  scale_range=d.train_scale_range,
                                  stuff_dir=(root / d.stuff_dir) if d.stuff_dir else None, **common)
        else:
            dataset = CocoDataset(source.ann_file, source.image_dir, train=False, **common)
    except MasksMissingError as e:
        raise DataError(f"{e}; {box_only_alternative(cfg.model)}") from None
    dataset.skipped.update(source.skipped)
    return dataset


def box_only_alternative(model: str) -> str:
    """What trains on boxes instead of ``model`` (a row with a mask head)."""
    from ..zoo import MODELS

    for box_row in (model.replace("cascade_mask_rcnn", "cascade_rcnn"), model.replace("htc_", "cascade_rcnn_"),
                    model.replace("mask_rcnn", "faster_rcnn")):
        if box_row != model and box_row in MODELS and MODELS[box_row].task == "detection":
            return f"train the box-only row {box_row} on it"
    return f"train {model} without its mask head on it (--set model.with_mask=False)"


def model_config(cfg: TrainConfig) -> Any:
    """The config of the model ``cfg`` builds (the row's, with ``model_options`` applied)."""
    from ..overrides import apply_overrides
    from ..zoo import get_spec

    spec = get_spec(cfg.model)
    options = dict(cfg.model_options)
    config = options.pop("config", spec.config)
    return apply_overrides(config, options)


def fit_to_data(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """``cfg`` adapted to what its data has, with a line saying each change: HTC without semantic label maps
    trains without its semantic branch (mmdetection's htc-without-semantic)."""
    htc = getattr(getattr(model_config(cfg), "roi_head", None), "htc", None)
    if htc is None or not htc.with_semantic:
        return cfg, []
    d = cfg.data
    maps = None if d.stuff_dir is None or d.root is None else Path(d.root) / d.stuff_dir
    if maps is not None and maps.is_dir():
        return cfg, []
    cfg = dataclasses.replace(cfg, model_options={**cfg.model_options, "with_semantic": False},
                              data=dataclasses.replace(d, stuff_dir=None))
    where = "no data.stuff_dir" if maps is None else f"no semantic label maps at {maps}"
    return cfg, [f"{cfg.model}: {where}: training without the semantic branch (mmdetection's htc-without-semantic)"]


def model_preprocess(cfg: TrainConfig) -> Any:
    """The input normalisation and resize bounds the model of ``cfg`` will have (a detector's is part of its
    config, so ``model_options`` may change it), for the datasets that feed it."""
    from ..zoo import get_spec

    return getattr(model_config(cfg), "preprocess", get_spec(cfg.model).preprocess)


def build_model(cfg: TrainConfig, class_names: tuple[str, ...]) -> nn.Module:
    from ..zoo import create_model

    options = {**cfg.model_options, "num_classes": len(class_names), "class_names": tuple(class_names)}
    if cfg.exhaustive_sampling:
        from ..zoo import get_spec
        from .step import exhaustive_sampling

        options["config"] = exhaustive_sampling(options.get("config", get_spec(cfg.model).config))
    model = create_model(cfg.model, **options)
    if cfg.init_weights:  # fine-tuning: class transfer by name, the rest strictly (model.class_transfer says)
        from ..zoo import get_spec, load_weights_for_classes

        model.class_transfer = load_weights_for_classes(model, get_spec(cfg.model), cfg.init_weights,
                                                        class_map=cfg.class_map)
    elif cfg.backbone_init:
        from ..zoo import load_backbone_weights

        classifier, weights = cfg.backbone_init
        load_backbone_weights(model, weights, classifier=classifier)
    return model


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (KiB on Linux)


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``... so that an earlier run is never overwritten: the folder is
    created here, and taken only by the process whose ``mkdir`` made it (atomic on every file system), so runs
    started at the same moment (a sweep, a job array) get a folder each."""
    base = Path(out_dir) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        run = base if k == 1 else base.with_name(f"{name}-{k}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            k += 1


def latest_run_dir(out_dir: str | Path, name: str) -> Path | None:
    """The most recently checkpointed run of ``name``: ``out_dir/name`` or one of its numbered siblings
    ``name-2``, ``name-3``... (never another config's run whose name merely starts the same)."""
    pattern = re.compile(re.escape(name) + r"(-[0-9]+)?")
    folder = Path(out_dir)
    runs = [p for p in folder.iterdir() if pattern.fullmatch(p.name) and (p / "latest").is_file()] \
        if folder.is_dir() else []
    return max(runs, key=lambda p: (p / "latest").stat().st_mtime) if runs else None


# ----------------------------------------------------------------------------------------------------- training
class Trainer:
    """``Trainer(cfg, run_dir).fit()``; ``resume`` = a checkpoint path, or True for ``run_dir/latest``."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: str | Path | bool | None = None,
                 progress: bool = True, dist: DistInfo | None = None):
        cfg, self.notes = fit_to_data(cfg)
        self.cfg = cfg
        self.dist = dist or init_distributed(cfg.device)
        self.run_dir = Path(run_dir)
        self.progress = progress and self.dist.is_main
        seed_everything(cfg.seed)  # the same initial weights on every rank
        preprocess = model_preprocess(cfg)
        self.train_set = build_dataset(cfg, preprocess, "train")
        self.val_set = build_dataset(cfg, preprocess, "val")
        self.model = build_model(cfg, self.train_set.class_names).to(self.dist.device)
        self.class_transfer = getattr(self.model, "class_transfer", None)
        if self.class_transfer is not None:
            self.notes += self.class_transfer.lines()
        if cfg.sync_bn and self.dist.distributed:
            if self.dist.device.type != "cuda":
                raise Res2DetError("sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU implementation)")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        from ..data import AspectRatioBatchSampler

        self.sampler = AspectRatioBatchSampler(self.train_set.aspect_groups, cfg.batch_size, train=True,
                                               seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
                                               shuffle=cfg.data.shuffle)
        self.iters_per_epoch = len(self.sampler)
        if self.iters_per_epoch == 0:
            raise Res2DetError(f"{len(self.train_set)} training images make no batch of {cfg.batch_size} "
                               f"on {self.dist.world_size} process(es)")
        self.optimizer = build_optimizer(self.model, cfg.recipe, cfg.batch_size * self.dist.world_size)
        self.scheduler = build_scheduler(self.optimizer, cfg.recipe, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.dist.device.type, enabled=cfg.amp == "fp16")
        self.ckpt = CheckpointManager(self.run_dir, cfg.keep_last)
        self.iteration, self.best, self._saved_at = 0, None, -1
        self._lr_used = self.optimizer.param_groups[0]["lr"]
        seed_everything(cfg.seed + self.dist.rank)  # sampling inside the heads differs per rank
        if resume:
            self._resume(self.ckpt.latest() if resume is True else Path(resume))
        self.ddp = self.model
        if self.dist.distributed:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.max_iters = cfg.recipe.epochs * self.iters_per_epoch
        if cfg.max_iters is not None:
            self.max_iters = min(self.max_iters, cfg.max_iters)

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self, rng: list[dict] | None = None) -> dict[str, Any]:
        """Everything to continue exactly; ``rng`` holds every rank's RNG states (default: this process's)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.iteration // self.iters_per_epoch, "iteration": self.iteration,
                "rng": rng or [rng_state()], "best": self.best, "model_name": self.cfg.model,
                "options": json.dumps(self.model_options()), "config": json.dumps(config_to_dict(self.cfg))}

    def model_options(self) -> dict[str, Any]:
        """The ``create_model`` overrides that rebuild this model from its weights (recorded in every file)."""
        names = self.train_set.class_names
        return {"num_classes": len(names), "class_names": list(names)}

    def _resume(self, path: Path | None) -> None:
        if path is None:
            raise Res2DetError(f"{self.run_dir}: nothing to resume (no 'latest' checkpoint there)")
        state = load_training_checkpoint(path)
        if state.get("model_name") != self.cfg.model:
            raise Res2DetError(f"{path}: a checkpoint of {state.get('model_name')!r}, not {self.cfg.model!r}")
        from ..checkpoint import load_state_dict_strict

        load_state_dict_strict(self.model, state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.best = int(state["iteration"]), state["best"]
        best_file = self.run_dir / "best.json"  # evaluations run after their checkpoint is written
        if best_file.is_file():
            b = json.loads(best_file.read_text())
            self.best = (b["metric"], b["value"], b["epoch"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:  # each rank continues its own sampling stream
            set_rng_state(rng[self.dist.rank])
        else:  # resumed on another number of processes: a fresh stream per rank
            torch.manual_seed(self.cfg.seed + self.dist.rank + self.iteration)

    def _save(self) -> Path | None:
        """Write a checkpoint on rank 0 (once per iteration) with every rank's RNG states."""
        if self._saved_at == self.iteration:
            return self.ckpt.latest() if self.dist.is_main else None
        self._saved_at = self.iteration
        rng = [rng_state()]
        if self.dist.distributed:  # as bytes: object collectives fail on tensors' storages (torch 2.13, gloo)
            buffer, blobs = io.BytesIO(), [None] * self.dist.world_size
            torch.save(rng[0], buffer)
            torch.distributed.all_gather_object(blobs, buffer.getvalue())
            rng = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
        path = self.ckpt.save(self.state_dict(rng), self.iteration) if self.dist.is_main else None
        barrier(self.dist)
        return path

    # -------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config_to_dict(cfg), indent=2) + "\n"
            atomic_write(self.run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))
            if self.class_transfer is not None and self.iteration == 0:  # what the fine-tuning started from
                transfer = json.dumps(self.class_transfer.to_dict(), indent=2) + "\n"
                atomic_write(self.run_dir / "class_transfer.json", lambda tmp: Path(tmp).write_text(transfer))
            for stale in self.run_dir.glob(".*.tmp"):  # an atomic write cut short by a kill
                stale.unlink(missing_ok=True)
        log = self.run_dir / "log.jsonl"
        records = self._log_records_up_to_checkpoint(log)
        already_finished = self.iteration >= self.max_iters
        bar = None
        if self.progress and sys.stderr.isatty():  # as evaluation: elsewhere (a log file) the log lines are printed
            from tqdm import tqdm

            bar = tqdm(total=self.max_iters, initial=self.iteration, unit="it", dynamic_ncols=True,
                       desc=f"train {cfg.model}")
        t0 = time.perf_counter()
        try:
            with stop_on_signals():  # SIGTERM / SIGINT: a checkpoint after the current iteration, then Interrupted
                metrics = self._train(log, bar, t0)
        finally:  # an error (a bad image, a full disk) is then printed on a line of its own
            if bar is not None:
                bar.close()
        if already_finished:  # resumed after the last iteration: report (or finish) the final evaluation
            final = [r for r in records if r["kind"] == "eval" and r["iter"] == self.iteration]
            if final:
                metrics = {k: v for k, v in final[-1].items() if k not in ("kind", "iter", "epoch")}
            else:  # killed during it
                metrics = self.evaluate(math.ceil(self.iteration / self.iters_per_epoch), log, self.ckpt.latest())
        return {"run_dir": str(self.run_dir), "iterations": self.iteration, "metrics": metrics,
                "seconds": time.perf_counter() - t0, "already_finished": already_finished}

    def _train(self, log: Path, bar, t0: float) -> dict[str, float]:
        """The iterations from ``self.iteration`` to ``max_iters``, with checkpoints and evaluations; the metrics
        of the last evaluation ({} if none ran)."""
        cfg, dev = self.cfg, self.dist.device
        metrics: dict[str, float] = {}
        window: list[torch.Tensor] = []
        names: list[str] = []
        self.model.train()
        while self.iteration < self.max_iters:
            epoch = self.iteration // self.iters_per_epoch
            skip = self.iteration - epoch * self.iters_per_epoch  # batches this epoch already ran (resume)
            for images, targets, sizes, _ in self._batches(epoch, skip):
                if self.iteration >= self.max_iters:
                    break
                self._stop_if_signalled(log, window, names, epoch, t0, bar)
                self._lr_used = self.optimizer.param_groups[0]["lr"]  # logged: the step changes it for the next
                losses = self._step(images.to(dev, non_blocking=True),
                                    [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in targets],
                                    sizes)
                self.iteration += 1
                if losses is not None:
                    names = list(losses)
                    window.append(torch.stack([v.detach().float() for v in losses.values()]))
                if bar is not None:
                    bar.update(1)
                if self.iteration % cfg.log_every == 0 and window:
                    self._log(log, window, names, epoch, t0, bar)
                    window = []
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self._save()
            epoch_done = self.iteration % self.iters_per_epoch == 0
            finished = self.iteration >= self.max_iters
            if epoch_done or finished:
                if window:
                    self._log(log, window, names, epoch, t0, bar)
                    window = []
                path = self._save()
                done_epochs = math.ceil(self.iteration / self.iters_per_epoch)
                if finished or (cfg.eval_every and done_epochs % cfg.eval_every == 0):
                    metrics = self.evaluate(done_epochs, log, path)
                    self.model.train()
        return metrics

    def _stop_if_signalled(self, log: Path, window: list[torch.Tensor], names: list[str], epoch: int, t0: float,
                           bar) -> None:
        """Between two iterations: if a stop signal reached any rank (``interrupt.stop_on_signals``), every rank
        stops here, at the same iteration: the losses since the last log line are logged, rank 0 writes a
        checkpoint, and ``Interrupted`` is raised. Resuming from that checkpoint continues exactly."""
        signum = int(all_reduce_max(torch.tensor([stop_requested() or 0], device=self.dist.device), self.dist))
        if not signum:
            return
        if window:
            self._log(log, window, names, epoch, t0, bar)
        path = self._save()
        where = f"at iteration {self.iteration} of {self.max_iters}"
        raise Interrupted(signum, f"{signal_name(signum)}: stopped {where}; checkpoint {path}" if self.dist.is_main
                          else "")

    def _log_records_up_to_checkpoint(self, log: Path) -> list[dict]:
        """The log's records, without those written after the checkpoint this run continues from (a resumed run
        repeats those iterations; the log must not hold them twice), rewritten so on the main rank."""
        if not log.is_file():
            return []
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r.get("iter", 0) <= self.iteration]
        if len(kept) != len(records) and self.dist.is_main:
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(log, lambda tmp: Path(tmp).write_text(text))
        return kept

    def _batches(self, epoch: int, start: int):
        """The epoch's batches from the ``start``-th on. Each sample's augmentation is seeded by the sampler,
        so a resumed epoch sees exactly the batches the interrupted one would have."""
        from ..data import Loader, collate

        self.sampler.set_epoch(epoch)
        batches = list(self.sampler)[start:]
        workers = self.cfg.data.num_workers if len(batches) > 1 else 0
        # its own generator: creating the iterator must not draw from the global RNG, or a resumed run's
        # sampling inside the heads would drift from the uninterrupted run's
        return Loader(self.train_set, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=self.dist.device.type == "cuda", generator=torch.Generator())

    def _step(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], sizes) -> dict | None:
        cfg = self.cfg
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        buffers = [b.detach().clone() for b in self.model.buffers()]  # BN statistics, restored after a bad step
        with torch.autocast(self.dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses, total = detector_losses(self.ddp, images, targets, sizes)
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        if any_rank(bool(bad), self.dist):
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            message = (f"non-finite loss at iteration {self.iteration + 1} (epoch {self.iteration // self.iters_per_epoch + 1})"
                       f": {', '.join(f'{k}={losses[k].item()}' for k in bad) or 'on another rank'}")
            if cfg.on_nonfinite == "skip":
                if self.dist.is_main:
                    print(f"warning: {message}; step skipped", flush=True)
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                return None
            raise NonFiniteLossError(f"{message}; training stopped before the update, the weights are those of "
                                     f"iteration {self.iteration} (set on_nonfinite='skip' to skip such steps)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return losses

    def _log(self, log: Path, window: list[torch.Tensor], names: list[str], epoch: int, t0: float, bar) -> None:
        mean = all_reduce_mean(torch.stack(window).mean(0).to(self.dist.device), self.dist).tolist()
        terms = dict(zip(names, mean))
        record = {"kind": "train", "iter": self.iteration, "epoch": epoch + 1,
                  "lr": self._lr_used,  # the last iteration's rate (mmengine logs the one each iteration used)
                  "loss": total_loss(terms), **terms,
                  "memory_mb": round(_memory_mb(self.dist.device), 1), "time": round(time.perf_counter() - t0, 2)}
        if self.dist.is_main:
            append_text(log, json.dumps(record) + "\n")
            if bar is not None:
                shown = {k.replace("loss_", ""): f"{v:.3f}" for k, v in terms.items()}
                bar.set_postfix(loss=f"{record['loss']:.3f}", **shown, lr=f"{record['lr']:.2e}",
                                mem=f"{record['memory_mb']:.0f}M", refresh=False)
            else:
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                      flush=True)

    # -------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, epoch: int, log: Path, checkpoint: Path | None) -> dict[str, float]:
        from ..evaluation import evaluate_model

        out = self.run_dir / "eval" / f"epoch_{epoch}"
        metrics = evaluate_model(self.model, self.val_set, batch_size=self.cfg.batch_size, device=self.dist.device,
                                 out_dir=out, progress=self.progress)
        if self.dist.is_main:
            key = "segm_AP" if "segm_AP" in metrics else "bbox_AP"
            record = {"kind": "eval", "iter": self.iteration, "epoch": epoch, **metrics}
            append_text(log, json.dumps(record) + "\n")
            if checkpoint is not None and (self.best is None or metrics[key] > self.best[1]):
                self.best = (key, metrics[key], epoch)
                self.ckpt.mark_best(checkpoint)
                atomic_write(self.run_dir / "best.json", lambda tmp: Path(tmp).write_text(json.dumps(
                    {"metric": key, "value": metrics[key], "epoch": epoch, "checkpoint": checkpoint.name}) + "\n"))
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            plot_training(records, self.run_dir / "plot.png")
        self.best = broadcast_object(self.best, self.dist)
        return metrics
