"""Reading PaddlePaddle ``.pdparams`` files without Paddle, and without running arbitrary pickled code.

``paddle.save(state_dict)`` writes a pickle of ``{name: numpy.ndarray}`` plus a
``'StructuredToParameterName@@'`` name table. Unpickling is restricted to the handful of globals that NumPy
arrays need (their reconstructor, ``ndarray``, ``dtype``) and plain containers; any other global (a function
such as ``os.system``, an arbitrary class) is refused with a ``CheckpointError`` before it is imported.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import CheckpointError

NAME_TABLE = "StructuredToParameterName@@"

# (module, name) pairs a NumPy array pickle (protocol 2-5) refers to; NumPy 2 renamed numpy.core to numpy._core.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5 spells arrays as _frombuffer(bytes, dtype, shape, order)
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise CheckpointError(
                f"{self._path}: refused to unpickle global {module}.{name}: a .pdparams file may only hold "
                "NumPy arrays and plain containers"
            )
        if module == "_codecs":
            import _codecs

            return getattr(_codecs, name)
        if module.startswith(("numpy.core.", "numpy._core.")):  # NumPy 1.x writes numpy.core, 2.x numpy._core
            import importlib

            sub = module.split(".", 2)[2]
            for mod in (f"numpy._core.{sub}", f"numpy.core.{sub}"):  # the new name first: no warning
                try:
                    return getattr(importlib.import_module(mod), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def read_pdparams(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``paddle.save``\\d state dict (name table dropped), in file order, as float32 or the
    arrays' own dtype. Anything but ``{str: ndarray}`` (after removing the name table) is an error."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated / corrupt pickles raise many exception types
        raise CheckpointError(f"{path}: not a readable .pdparams file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of arrays, found {type(obj).__name__}")
    obj = {k: v for k, v in obj.items() if k != NAME_TABLE}
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad or not obj:
        raise CheckpointError(f"{path}: expected {{name: ndarray}}, found other entries: {bad[:6] or 'none at all'}")
    non_numeric = [f"{k} ({v.dtype})" for k, v in obj.items() if v.dtype.kind not in "biuf"]
    if non_numeric:
        raise CheckpointError(f"{path}: arrays that are not numbers ({len(non_numeric)}): {non_numeric[:6]}")
    return {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in obj.items()}


__all__ = ["read_pdparams", "NAME_TABLE"]
