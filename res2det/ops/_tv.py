"""Optional torchvision fast paths, probed once at import.

Each name is the torchvision kernel when ``import torchvision`` works *and* a tiny
smoke call succeeds (a CPU-only or ABI-mismatched torchvision can import but fail to
run), else ``None``. Callers fall back to the pure-PyTorch implementations.
Tests set these to ``None`` to force the pure path.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch


def _probe(name: str, smoke: Callable[[Callable], object]) -> Callable | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "failed to load image extension"
            import torchvision.ops as tv_ops

            fn = getattr(tv_ops, name)
            smoke(fn)
        return fn
    except Exception:  # ImportError, missing/ABI-broken C++ ops, ...
        return None


nms = _probe("nms", lambda f: f(torch.zeros(1, 4), torch.zeros(1), 0.5))
roi_align = _probe(
    "roi_align",
    lambda f: f(torch.zeros(1, 1, 2, 2), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]), 1, 1.0, 0, True),
)
deform_conv2d = _probe(
    "deform_conv2d",
    lambda f: f(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1),
                mask=torch.ones(1, 1, 2, 2)),
)
