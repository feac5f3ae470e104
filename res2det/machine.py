"""What the machine is: CPU name and family, its instruction-set flags, the device's name, and whether a
reduced precision runs natively. Speed figures, kernel plans and the fast paths all depend on these."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

# CPU instructions that run each reduced precision natively (without them oneDNN emulates it, slower than fp32)
NATIVE_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
# The flags that decide which kernels are fast (named beside every measured figure, keyed into cached plans)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
               "amx_fp16")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def speed_flags() -> list[str]:
    """This CPU's flags among ``SPEED_FLAGS``, sorted."""
    return sorted(cpu_flags() & set(SPEED_FLAGS))


def native_cpu_precision(precision: str, flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with ``flags``) runs ``precision`` ('bf16', 'fp16') natively; fp32 always."""
    flags = cpu_flags() if flags is None else flags
    return precision == "fp32" or bool(flags & set(NATIVE_CPU_FLAGS.get(precision, ())))


def device_name(device: str) -> str:
    """The GPU's name for 'cuda', else the CPU's model name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_name() -> str:
    """CPU model and family, as measured figures depend on them."""
    info = _cpuinfo()
    if not info:
        return platform.processor() or platform.machine()
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')})"


def cpu_description() -> str:
    """``cpu_name`` with the speed-relevant flags, for the heading of a benchmark table."""
    return f"{cpu_name()}; flags {' '.join(speed_flags()) or 'none of ' + ' '.join(SPEED_FLAGS)}"


__all__ = ["cpu_flags", "speed_flags", "native_cpu_precision", "device_name", "cpu_name", "cpu_description",
           "NATIVE_CPU_FLAGS", "SPEED_FLAGS"]
