"""Reading PaddlePaddle static-graph (Fluid) parameter folders without Paddle.

``fluid.io.save_persistables`` writes one file per variable, named after it, into one folder (PaddleDetection's
static-graph releases ship that folder as a ``.tar``). A variable file (Paddle's ``SerializeToStream`` of a
``LoDTensor``; Paddle 3.3.1's ``paddle.base.core.save_dense_tensor`` still writes it), little-endian:

* ``uint32`` version (0); ``uint64`` number of LoD levels, each as ``uint64`` byte size + ``size_t`` offsets;
* ``uint32`` tensor version (0); ``int32`` byte size of a ``TensorDesc`` protobuf, then the protobuf
  (field 1 varint ``data_type``, field 2 ``dims`` as repeated varints, packed or not);
* the data, C order, ``prod(dims)`` elements of ``data_type``.

Nothing is unpickled or executed; a ``.tar`` is read member by member (never extracted to disk).
"""
from __future__ import annotations

import os
import struct
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import CheckpointError

# framework.proto VarType.Type -> NumPy dtype (BF16 is read as its raw 16 bits and converted below)
_DTYPES = {0: np.bool_, 1: np.int16, 2: np.int32, 3: np.int64, 4: np.float16, 5: np.float32, 6: np.float64,
           20: np.uint8, 21: np.int8, 22: np.uint16}
_BF16 = 22
# optimiser state and counters that save_persistables writes beside the weights
_OPTIMISER_SUFFIXES = ("_velocity_0", "_moment1_0", "_moment2_0", "_beta1_pow_acc_0", "_beta2_pow_acc_0")
_IGNORED_NAMES = {"@LR_DECAY_COUNTER@", "__model__", "learning_rate_0"}


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointError(f"{where}: malformed tensor description (bad varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _tensor_desc(buf: bytes, where: str) -> tuple[int, list[int]]:
    """(data_type, dims) from a serialised ``VarType.TensorDesc``."""
    data_type, dims, pos = None, [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
            if field == 1:
                data_type = value
            elif field == 2:
                dims.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif wire == 2:
            length, pos = _varint(buf, pos, where)
            end = pos + length
            if end > len(buf):
                raise CheckpointError(f"{where}: malformed tensor description (truncated field)")
            if field == 2:  # packed dims
                while pos < end:
                    value, pos = _varint(buf, pos, where)
                    dims.append(value - (1 << 64) if value >= 1 << 63 else value)
            pos = end
        else:
            raise CheckpointError(f"{where}: malformed tensor description (wire type {wire})")
    if data_type is None:
        raise CheckpointError(f"{where}: malformed tensor description (no data type)")
    return data_type, dims


def parse_variable(data: bytes, where: str) -> torch.Tensor:
    """One Fluid variable file's bytes -> a tensor (``where`` names the file in errors)."""
    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise CheckpointError(f"{where}: truncated Fluid variable file ({what}: needs {pos + n} bytes, the file "
                                  f"has {len(data)})")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    pos = 0
    (version,) = struct.unpack("<I", take(4, "version"))
    if version != 0:
        raise CheckpointError(f"{where}: not a Fluid variable file (version {version}, expected 0)")
    (levels,) = struct.unpack("<Q", take(8, "LoD level count"))
    if levels > 16:
        raise CheckpointError(f"{where}: not a Fluid variable file ({levels} LoD levels)")
    for _ in range(levels):
        (size,) = struct.unpack("<Q", take(8, "LoD level size"))
        take(size, "LoD offsets")  # sequence boundaries: nothing a weight needs
    (tensor_version,) = struct.unpack("<I", take(4, "tensor version"))
    if tensor_version != 0:
        raise CheckpointError(f"{where}: not a Fluid variable file (tensor version {tensor_version}, expected 0)")
    (desc_size,) = struct.unpack("<i", take(4, "tensor description size"))
    if not 0 < desc_size <= 4096:
        raise CheckpointError(f"{where}: not a Fluid variable file (tensor description of {desc_size} bytes)")
    data_type, dims = _tensor_desc(take(desc_size, "tensor description"), where)
    if data_type not in _DTYPES:
        raise CheckpointError(f"{where}: unsupported Fluid data type {data_type}")
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{where}: malformed tensor description (dims {dims})")
    dtype = np.dtype(_DTYPES[data_type]).newbyteorder("<")
    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
    raw = take(count * dtype.itemsize, f"data of {dims} {dtype.name}")
    if pos != len(data):
        raise CheckpointError(f"{where}: {len(data) - pos} unexpected bytes after the data of {dims} {dtype.name}")
    array = np.frombuffer(raw, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))
    if data_type == _BF16:
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16).clone()
    return torch.from_numpy(array.copy())


def _is_weight(name: str) -> bool:
    return not (name in _IGNORED_NAMES or name.endswith(_OPTIMISER_SUFFIXES) or name.startswith("."))


def _members(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(variable name, where, bytes) of every file of a tar, a folder (any depth) or a single file."""
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            yield file.name, str(file), file.read_bytes()
    elif tarfile.is_tarfile(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:  # streamed: one member in memory at a time
                    if member.isfile():
                        f = tar.extractfile(member)
                        yield Path(member.name).name, f"{path}:{member.name}", f.read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable tar archive ({e})") from None
    else:
        yield path.name, str(path), path.read_bytes()


def read_fluid(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a Fluid parameter ``.tar``, folder or single variable file, by variable name (optimiser
    state left out). A truncated or malformed variable file is a ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    state: dict[str, torch.Tensor] = {}
    where_of: dict[str, str] = {}
    for name, where, data in _members(path):
        if not _is_weight(name):
            continue
        if name in state:
            raise CheckpointError(f"{where}: variable {name!r} also in {where_of[name]}")
        state[name], where_of[name] = parse_variable(data, where), where
    if not state:
        raise CheckpointError(f"{path}: no Fluid variable files in it")
    return state


def write_variable(tensor: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``tensor`` as one Fluid variable file (no LoD), the bytes ``save_dense_tensor`` writes: for test
    fixtures and for converting weights back."""
    codes = {np.dtype(v): k for k, v in _DTYPES.items() if k != _BF16}
    array = tensor.detach().cpu().contiguous().numpy()
    if array.dtype not in codes:
        raise CheckpointError(f"{path}: cannot write dtype {array.dtype} as a Fluid variable")

    def varint(v: int) -> bytes:
        v &= (1 << 64) - 1
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    desc = b"\x08" + varint(codes[array.dtype]) + b"".join(b"\x10" + varint(d) for d in array.shape)
    header = struct.pack("<IQIi", 0, 0, 0, len(desc)) + desc
    Path(path).write_bytes(header + array.astype(array.dtype.newbyteorder("<")).tobytes())


__all__ = ["read_fluid", "parse_variable", "write_variable"]
