"""``Loader``: PyTorch's ``DataLoader`` whose user errors come back from worker processes as themselves."""
from __future__ import annotations

import pickle
import signal
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

from .errors import Res2DetError
from .interrupt import SIGNALS, stopping_on_signals


class _Failed:
    """A user error (``Res2DetError``) raised while loading a sample, passed on as the sample (and then as the
    batch) so that it crosses from a worker process to the main process as itself."""

    def __init__(self, error: Res2DetError):
        self.error = error


class _Guarded(Dataset):
    """``dataset`` whose ``Res2DetError`` becomes a ``_Failed`` sample instead of an exception."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self.dataset[key]
        except Res2DetError as e:
            if get_worker_info() is not None:  # it is pickled to the main process: make sure it comes back
                try:
                    pickle.loads(pickle.dumps(e))
                except Exception:
                    e = Res2DetError(str(e))
            return _Failed(e)


class _GuardedCollate:
    """``collate_fn``, but a batch with a ``_Failed`` sample is that ``_Failed``."""

    def __init__(self, collate_fn: Callable | None):
        self.collate_fn = collate_fn or default_collate

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, _Failed):  # batch_size=None: one sample
            return batch
        if isinstance(batch, list):
            failed = next((s for s in batch if isinstance(s, _Failed)), None)
            if failed is not None:
                return failed
        return self.collate_fn(batch)


class _IgnoreStopSignals:
    """A worker's ``worker_init_fn``: SIGTERM / SIGINT are the main process's to handle (it stops at a safe point
    and ends its workers; a worker dying of the signal first would end the main process with a worker error),
    then the caller's own ``worker_init_fn``."""

    def __init__(self, then: Callable | None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class Loader(DataLoader):
    """PyTorch's ``DataLoader`` (same arguments), except that a ``Res2DetError`` raised while loading a sample
    (an unreadable image, a stuff map of the wrong size...) reaches the caller as itself: the same type and the
    same one-line message naming the file, whatever ``num_workers``. (PyTorch re-raises a worker's exception as
    a new one whose message is the worker's traceback.) What a dataset skips itself (``CocoDataset``'s
    ``on_bad="skip"``) it skips in a worker too. Training and evaluation both read their data through it."""

    def __init__(self, dataset: Dataset, *, collate_fn: Callable | None = None, **kwargs: Any):
        if stopping_on_signals() and kwargs.get("num_workers"):  # inside ``interrupt.stop_on_signals``
            kwargs["worker_init_fn"] = _IgnoreStopSignals(kwargs.get("worker_init_fn"))
        super().__init__(_Guarded(dataset), collate_fn=_GuardedCollate(collate_fn), **kwargs)

    def __iter__(self) -> Iterator:
        for batch in super().__iter__():
            if isinstance(batch, _Failed):
                raise batch.error
            yield batch



__all__ = ["Loader"]
