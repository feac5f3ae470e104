"""The seeded reference weights of ../shared (beside the repository) for the benchmark scripts."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from res2det.checkpoint import atomic_torch_save, cache_dir

# ../shared beside the repository, or RES2DET_SHARED (a device machine gets a copy inside the working tree)
SHARED = Path(os.environ.get("RES2DET_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def seeded_reference_weights(model_name: str) -> Path | None:
    """Deterministic seed-0 weights in the reference framework's own layout (../shared/reference), cached.

    They are not trained: a model loaded with them gives the same tensors as mmdetection/timm/Paddle with the
    same weights (the parity fixtures), which makes them a faithful stand-in where no released file is at hand.
    """
    script, layout = SHARED / "reference" / "seeded_weights.py", SHARED / "reference" / "layouts" / f"{model_name}.json"
    if not (script.is_file() and layout.is_file()):
        return None
    target = cache_dir() / "seeded" / f"{model_name}-seed0.pth"
    if not target.is_file():
        spec = importlib.util.spec_from_file_location("_res2det_seeded_weights", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        atomic_torch_save(module.seeded_state_dict(module.load_layout(layout), 0), target)
    return target
