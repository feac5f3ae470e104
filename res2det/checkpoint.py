"""Reading and writing weights: safe loading, strict key checks, atomic writes, verified downloads.

res2det's own weight files are safetensors (or a .pth dict) that record the model name, so a checkpoint for
another model is refused by name before any tensor is compared.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import CheckpointError

StateDict = dict[str, torch.Tensor]
RES2DET_FORMAT = "res2det"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: str | os.PathLike, error: OSError) -> OSError:
    """``error`` (a failed create, write or rename: disk full, read-only file system, no permission) as the
    ``OSError`` of the same kind (``PermissionError`` for EACCES...) naming ``path``, the file the caller asked
    for, not a temporary file beside it. The command line prints it as one line: ``path: reason``."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder and rename it, so ``path`` is never half-written: on
    any failure the temporary file is removed and an existing ``path`` is left as it was. An ``OSError`` is
    raised naming ``path`` (``write_error``)."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


class _WriteRecorder:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's zip writer, finishing the
    archive after it, raises a RuntimeError ('unexpected pos') in its place."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save_through_python(obj, tmp: str) -> None:
    with open(tmp, "wb") as f:
        out = _WriteRecorder(f)
        try:
            torch.save(obj, out)
        except Exception:
            if out.error is not None:
                raise out.error from None
            raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError:
            # torch's own file writer reports a failed write (a full disk) as a RuntimeError that does not say
            # why ('unexpected pos', 'file write failed'); written again through Python's I/O, a failed write is
            # the OSError it is (and any other error is raised again)
            _torch_save_through_python(obj, tmp)

    atomic_write(Path(path), write)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (a log). A failed write is an ``OSError`` naming ``path``, and what was
    appended of ``text`` is cut off again, so the file never ends in a partial line."""
    path, data = Path(path), text.encode("utf-8")
    try:
        with open(path, "ab", buffering=0) as f:
            start = f.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view):]
            except OSError:
                with contextlib.suppress(OSError):
                    f.truncate(start)
                raise
    except OSError as e:
        raise write_error(path, e) from e


def save_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str,
                 options: dict | None = None) -> None:
    """Save ``model``'s weights as res2det's own format (.safetensors, else a .pth dict), atomically.
    ``options`` (JSON-able ``create_model`` overrides such as ``num_classes`` and ``class_names``) are recorded
    so that ``create_model(model_name, weights=path)`` rebuilds the same model."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": RES2DET_FORMAT, "model": model_name, "options": json.dumps(options or {})}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import save, save_file

        def write(tmp: str) -> None:
            try:
                save_file(state, tmp, metadata=meta)
            except SafetensorError:  # how it reports a full disk too: then again through Python's I/O
                data = save(state, metadata=meta)
                with open(tmp, "wb") as f:
                    f.write(data)

        atomic_write(path, write)
    else:
        atomic_torch_save({**meta, "state_dict": state}, path)


def read_weights(path: str | os.PathLike) -> tuple[StateDict, dict]:
    """Read a weight file into (state_dict, meta). ``meta`` has 'format' and 'model' for res2det's files.

    .pth files are unpickled with ``weights_only=True``: anything but tensors and plain containers is refused.
    Common wrappers ({'state_dict': ...}, {'model': ...}: res2det's training checkpoints too) and a DataParallel
    'module.' prefix are removed.
    """
    path = Path(path)
    fluid_folder = path.is_dir() and path.suffix not in (".pth", ".pt", ".bin", ".safetensors", ".pdparams")
    if fluid_folder or (path.suffix == ".tar" and path.is_file()):  # PaddlePaddle static graph: variable files
        from .fluid import read_fluid

        return read_fluid(path), {"format": "paddle-static"}
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    meta: dict = {}
    if path.suffix == ".pdparams":  # PaddlePaddle: a pickle of NumPy arrays, read by a restricted unpickler
        from .pdparams import read_pdparams

        return read_pdparams(path), {"format": "paddle"}
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
            f"(only weights-only checkpoints are loaded; {str(e).splitlines()[0]})"
        ) from None
    except Exception as e:  # zip/pickle corruption surfaces as many exception types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and obj.get("format") == RES2DET_FORMAT:
        meta = {"format": RES2DET_FORMAT, "model": obj.get("model"), "options": obj.get("options", "{}")}
    elif isinstance(obj, dict) and {"model", "optimizer", "iteration"} <= set(obj):  # a res2det training checkpoint
        meta = {"format": RES2DET_FORMAT, "model": obj.get("model_name"), "options": obj.get("options", "{}")}
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj), meta


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected, mis-shaped or mis-typed (integer vs float) key, and
    any NaN or infinite value, is an error listing them.

    ``num_batches_tracked`` counters may be absent (older and non-PyTorch checkpoints lack them); they do not
    affect outputs.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and state[k].shape != own[k].shape]
    # an integer tensor copied into a float weight would be converted silently, and the other way round cut
    mis_typed = [f"{k} {state[k].dtype} vs {own[k].dtype}" for k in own
                 if k in state and state[k].dtype.is_floating_point != own[k].dtype.is_floating_point]
    non_finite = [k for k in own if k in state and state[k].dtype.is_floating_point
                  and not bool(torch.isfinite(state[k]).all())]
    if missing or unexpected or mis_shaped or mis_typed or non_finite:
        parts = [f"{source}: checkpoint does not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches ({len(mis_shaped)}; checkpoint vs model): {_listing(mis_shaped, 6)}")
        if mis_typed:
            parts.append(f"integer / float mismatches ({len(mis_typed)}; checkpoint vs model): "
                         f"{_listing(mis_typed, 6)}")
        if non_finite:
            parts.append(f"NaN or infinite values ({len(non_finite)}): {_listing(non_finite)}")
        raise CheckpointError("; ".join(parts))
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k])


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("RES2DET_CACHE", Path.home() / ".cache" / "res2det"))


def download(url: str, filename: str | None = None, *, root: str | os.PathLike | None = None) -> Path:
    """Fetch ``url`` into the cache (once) and verify the sha256 prefix carried in its file name."""
    filename = filename or url.rsplit("/", 1)[-1]
    target = Path(root or cache_dir()) / filename
    m = _HASH_IN_NAME.search(filename)
    if target.is_file():
        return target

    def fetch(tmp: str) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as e:
            raise CheckpointError(f"{url}: download failed ({e})") from None
        if m and not digest.hexdigest().startswith(m.group(1)):
            raise CheckpointError(
                f"{url}: sha256 {digest.hexdigest()[:16]}... does not match the {m.group(1)} in its file name; "
                "the download is corrupt or not the published file"
            )

    atomic_write(target, fetch)
    return target


__all__ = ["read_weights", "save_weights", "load_state_dict_strict", "atomic_write", "atomic_torch_save", "append_text",
           "write_error", "download", "cache_dir"]
