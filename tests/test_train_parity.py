"""Training fidelity: one res2det training step against mmdetection 3.3.0's, term by term and gradient by gradient.

Each fixture (``$RES2DET_TRAIN_FIXTURES``, default ``../shared/reference/parity/train``; every ``*.pt`` whose
``meta.config`` is a res2det detector) holds mmdetection's losses, per-parameter gradient norms and the full
predictor gradients of one step with exhaustive sampling, on seeded weights and one photo with its targets. The
same step runs here through ``res2det.engine.step.training_step`` and must agree within:

* loss terms: relative 1e-4 (absolute 1e-6 below 1e-2); ``acc``: within one sampled RoI (100 / N percent);
* gradient L2 norms of every trainable parameter above 1e-6 x the largest: relative 1e-3, backbone 2e-3 (see
  GRAD_NORM_RTOL); the same parameters trainable and frozen;
* full predictor gradients: max |difference| <= 1e-3 x max |reference|.

``python -m pytest -s tests/test_train_parity.py`` prints the worst differences per detector; with
``RES2DET_TRAIN_PARITY_FLOAT64=1`` res2det runs the step in float64, so the printed differences are the
reference's own float32 error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from res2det.checkpoint import load_state_dict_strict
from res2det.data import collate
from res2det.data.coco_dataset import decode_mask
from res2det.images import normalize
from res2det.engine.step import exhaustive_sampling, training_step
from res2det.zoo import get_spec, list_models

from conftest import REFERENCE

FIXTURES = Path(os.environ.get("RES2DET_TRAIN_FIXTURES") or REFERENCE / "parity" / "train")
LAYOUTS = REFERENCE / "layouts"

LOSS_RTOL, LOSS_ATOL, SMALL_LOSS = 1e-4, 1e-6, 1e-2
GRAD_FLOOR = 1e-6  # gradient norms below this fraction of the largest are not compared
# The deep backbone's gradient norms carry float32 rounding noise of about 1e-3 in the reference itself: against
# res2det run in float64 on the same weights and targets, mmdetection's float32 gradients differ by up to
# 1.1e-3 (layer3 of R2-101), and res2det's own float32 run at 1 and at 2 threads differs by 6e-4. The 1e-3
# is kept everywhere else; the backbone gets 2e-3, still far below what a wrong rule gives (the missing
# allowed_border=0 of the cascade RPN moved FPN/RPN gradients by 3-30%).
GRAD_NORM_RTOL = {"backbone.": 2e-3, "": 1e-3}
PREDICTOR_RTOL = 1e-3
FLOAT64 = os.environ.get("RES2DET_TRAIN_PARITY_FLOAT64") == "1"


def _fixtures() -> list[Path]:
    if not FIXTURES.is_dir():
        if os.environ.get("RES2DET_TRAIN_FIXTURES"):
            raise FileNotFoundError(f"RES2DET_TRAIN_FIXTURES={FIXTURES} is not a folder")
        return []
    known = set(list_models())
    return [p for p in sorted(FIXTURES.glob("*.pt"))
            if torch.load(p, weights_only=True)["meta"]["config"] in known]


FIXTURE_FILES = _fixtures()


def _load_fixture(path: Path) -> dict:
    fx = torch.load(path, weights_only=True)
    name = fx["meta"]["config"]
    spec = get_spec(name)
    to_res2det = spec.key_maps["mmdet"]
    rename = lambda d: dict(zip(to_res2det({k: torch.zeros(1) for k in d}), d.values()))  # noqa: E731
    fx["grad_norm"], fx["grads"] = rename(fx["grad_norm"]), rename(fx["grads"])
    fx["frozen"] = set(to_res2det({k: torch.zeros(1) for k in fx["frozen"]}))
    return fx


def seeded_model(name: str, layout: str, seed: int, seeded_weights, *, exhaustive: bool = True):
    """The zoo detector with every sampler exhaustive, the seeded mmdetection-layout weights loaded strictly."""
    spec = get_spec(name)
    model = spec.build(exhaustive_sampling(spec.config) if exhaustive else spec.config)
    state = seeded_weights.seeded_state_dict(seeded_weights.load_layout(LAYOUTS / layout), seed)
    load_state_dict_strict(model, spec.key_maps["mmdet"](state), source=f"{layout} seed {seed}")
    return model


def fixture_sample(folder: Path, meta: dict, preprocess) -> dict:
    """The fixture's image and targets as one ``CocoDataset`` sample (normalised, not resized, not flipped)."""
    from PIL import Image

    gt = json.loads((folder / meta["gt"]).read_text())
    rgb = np.asarray(Image.open(folder / meta["image"]).convert("RGB"))
    sample = {"image": normalize(rgb, preprocess), "boxes": torch.tensor(gt["boxes"], dtype=torch.float32),
              "labels": torch.tensor(gt["labels"], dtype=torch.long), "image_id": 0, "file": meta["image"],
              "orig_size": rgb.shape[:2], "scale_factor": (1.0, 1.0), "flipped": False}
    if gt.get("masks_rle"):
        h, w = rgb.shape[:2]
        sample["masks"] = torch.from_numpy(np.stack([decode_mask(r, h, w) for r in gt["masks_rle"]]))
    if gt.get("sem_seg_png"):
        sample["semantic"] = torch.from_numpy(np.asarray(Image.open(folder / gt["sem_seg_png"])).astype(np.int64))
    return sample


def count_rois(model) -> dict[str, int]:
    """Hooks recording how many RoIs each box head classifies in the next forward: ``{loss prefix: N}`` (``""``
    for a single head, ``"s0."``, ``"s1."``, ... for cascade stages)."""
    from res2det.models.heads import Shared2FCBBoxHead

    counts: dict[str, int] = {}
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, Shared2FCBBoxHead)]
    for name, head in heads:
        prefix = f"s{name.rsplit('.', 1)[1]}." if len(heads) > 1 else ""
        head.register_forward_hook(lambda m, args, out, p=prefix: counts.__setitem__(p, args[0].shape[0]))
    return counts


def check_losses(losses: dict[str, float], fx: dict, num_rois: dict[str, int]) -> dict[str, float]:
    """Every loss term and ``acc`` against the fixture; returns the worst differences."""
    assert set(losses) == set(fx["losses"]), (sorted(losses), sorted(fx["losses"]))
    worst = {"loss_rel": 0.0, "acc_abs": 0.0}
    for k, ref in fx["losses"].items():
        ours = losses[k]
        if k.split(".")[-1] == "acc":
            # one RoI more or less classified right moves acc by 100 / N (N: the RoIs that head classified)
            limit = 100.0 / num_rois[k[:-len("acc")]] + 1e-6
            assert abs(ours - ref) <= limit, (k, ours, ref, limit)
            worst["acc_abs"] = max(worst["acc_abs"], abs(ours - ref))
            continue
        if abs(ref) < SMALL_LOSS:
            assert abs(ours - ref) <= LOSS_ATOL, (k, ours, ref)
        else:
            assert abs(ours - ref) <= LOSS_RTOL * abs(ref), (k, ours, ref)
        worst["loss_rel"] = max(worst["loss_rel"], abs(ours - ref) / max(abs(ref), 1e-12))
    return worst


def compare_step(result, fx: dict, num_rois: dict[str, int]) -> dict[str, float]:
    """Assert every check of the module docstring; returns the worst measured differences."""
    worst = {**check_losses(result.losses, fx, num_rois), "grad_norm_rel": 0.0,
             "grad_norm_rel_outside_backbone": 0.0, "predictor_rel": 0.0}
    assert abs(result.total - fx["total"]) <= LOSS_RTOL * abs(fx["total"]), (result.total, fx["total"])

    assert set(result.frozen) == fx["frozen"], sorted(set(result.frozen) ^ fx["frozen"])
    assert set(result.grads) == set(fx["grad_norm"]), sorted(set(result.grads) ^ set(fx["grad_norm"]))
    norms = result.grad_norms()
    largest = max(fx["grad_norm"].values())
    failures = []
    for k, ref in fx["grad_norm"].items():
        if ref <= GRAD_FLOOR * largest:
            continue
        rel = abs(norms[k] - ref) / ref
        rtol = next(t for prefix, t in GRAD_NORM_RTOL.items() if k.startswith(prefix))
        if rel > rtol:
            failures.append(f"{k}: {norms[k]:.6g} vs {ref:.6g} ({rel:.2e} > {rtol:g})")
        worst["grad_norm_rel"] = max(worst["grad_norm_rel"], rel)
        if not k.startswith("backbone."):
            worst["grad_norm_rel_outside_backbone"] = max(worst["grad_norm_rel_outside_backbone"], rel)
    assert not failures, "gradient norms differ:\n" + "\n".join(failures)

    for k, ref in fx["grads"].items():
        diff = float((result.grads[k].double() - ref.double()).abs().max())
        scale = float(ref.abs().max())
        assert diff <= PREDICTOR_RTOL * scale, (k, diff, scale)
        worst["predictor_rel"] = max(worst["predictor_rel"], diff / scale)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_training_step_matches_mmdetection(path, seeded_weights):
    fx = _load_fixture(path)
    meta = fx["meta"]
    name = meta["config"]
    model = seeded_model(name, meta["layout"], meta["seed"], seeded_weights)
    images, targets, sizes, _ = collate([fixture_sample(path.parent, meta, get_spec(name).preprocess)])
    assert tuple(meta["image_hw"]) == sizes[0]
    if FLOAT64:
        model, images = model.double(), images.double()
    num_rois = count_rois(model)
    result = training_step(model, images, targets, sizes)
    worst = compare_step(result, fx, num_rois)
    print(f"\n{name}{' (float64)' if FLOAT64 else ''}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


def test_fixture_folder_is_used():
    """The default fixture folder (or the one RES2DET_TRAIN_FIXTURES names) holds fixtures res2det knows."""
    if not FIXTURES.is_dir():
        pytest.skip(f"{FIXTURES} not found (../shared must sit beside the repository)")
    assert FIXTURE_FILES, f"no fixture of a res2det detector in {FIXTURES}"


def test_exhaustive_sampling_reaches_every_sampler():
    from res2det.engine.step import EXHAUSTIVE
    from res2det.models.heads import RandomSampler

    def samplers(cfg):
        import dataclasses

        if isinstance(cfg, RandomSampler):
            return [cfg]
        if isinstance(cfg, tuple):
            return [s for c in cfg for s in samplers(c)]
        if dataclasses.is_dataclass(cfg):
            return [s for f in dataclasses.fields(cfg) for s in samplers(getattr(cfg, f.name))]
        return []

    for name in ("faster_rcnn_r2_101_fpn_2x_coco", "htc_r2_101_fpn_20e_coco"):
        cfg = get_spec(name).config
        before, after = samplers(cfg), samplers(exhaustive_sampling(cfg))
        assert len(before) == len(after) == (2 if name.startswith("faster") else 4)
        assert all(s.num == EXHAUSTIVE for s in after) and all(s.num < EXHAUSTIVE for s in before)
        assert [s.pos_fraction for s in before] == [s.pos_fraction for s in after]
