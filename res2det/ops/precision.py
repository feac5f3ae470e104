"""Precision helpers for the parts of a detector that must not run in reduced precision."""
from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half / bfloat16 tensor (autocast outputs), else unchanged, so that a model
    run in float64 stays in float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
