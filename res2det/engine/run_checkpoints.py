"""Training checkpoints: everything needed to continue exactly (model, optimiser, scheduler, loss scaler,
epoch/iteration, RNG states), written atomically, the last N kept plus the best.

A checkpoint file is complete before ``latest`` (a one-line text file, itself replaced atomically) names it,
and older files are deleted only after that, so a process killed at any moment leaves a loadable latest."""
from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_torch_save, atomic_write, write_error
from ..errors import CheckpointError


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointManager:
    """``iter_{n:07d}.pth`` files in ``run_dir``, the newest named by ``run_dir/latest``; ``best.pth`` is a
    hard link (or copy) of the best one."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        self.run_dir = Path(run_dir)
        self.keep_last = max(1, keep_last)

    def save(self, state: dict[str, Any], iteration: int) -> Path:
        path = self.run_dir / f"iter_{iteration:07d}.pth"
        atomic_torch_save(state, path)
        atomic_write(self.run_dir / "latest", lambda tmp: Path(tmp).write_text(path.name + "\n"))
        self._prune()
        return path

    def mark_best(self, path: Path) -> None:
        best, tmp = self.run_dir / "best.pth", self.run_dir / ".best.pth.tmp"
        try:
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:  # file systems without hard links
                import shutil

                shutil.copyfile(path, tmp)
            os.replace(tmp, best)
        except OSError as e:  # best.pth is as it was
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise write_error(best, e) from e

    def latest(self) -> Path | None:
        pointer = self.run_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.run_dir / pointer.read_text().strip()
        return path if path.is_file() else None

    def _prune(self) -> None:
        files = sorted(p for p in self.run_dir.glob("iter_*.pth") if re.fullmatch(r"iter_\d+\.pth", p.name))
        for old in files[:-self.keep_last]:
            old.unlink(missing_ok=True)


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{path}: not a readable res2det training checkpoint ({type(e).__name__}: {e})") from None
    missing = {"model", "optimizer", "scheduler", "epoch", "iteration", "rng"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"{path}: not a res2det training checkpoint (missing {sorted(missing)}); "
                              "to start from weights only, set init_weights")
    return state
