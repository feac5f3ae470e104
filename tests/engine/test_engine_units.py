"""Training engine, fast checks: recipes and lr schedule, config presets and --set edits, checkpoint files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from res2det.engine.run_checkpoints import CheckpointManager, load_training_checkpoint, rng_state, set_rng_state
from res2det.engine.train_config import RECIPES, Recipe, TrainConfig, apply_settings, load_config, presets
from res2det.engine.schedule import build_optimizer, build_scheduler, lr_factor, scaled_lr
from res2det.errors import CheckpointError, Res2DetError
from res2det.zoo import MODELS


# ------------------------------------------------------------------------------------------- recipes, schedule
def test_recipes_are_mmdetections():
    assert (RECIPES["1x"].epochs, RECIPES["1x"].milestones) == (12, (8, 11))
    assert (RECIPES["2x"].epochs, RECIPES["2x"].milestones) == (24, (16, 22))
    assert (RECIPES["20e"].epochs, RECIPES["20e"].milestones) == (20, (16, 19))
    for name in ("1x", "2x", "20e"):
        r = RECIPES[name]
        assert (r.base_lr, r.base_batch_size, r.momentum, r.weight_decay) == (0.02, 16, 0.9, 1e-4)
        assert (r.warmup_iters, r.warmup_ratio) == (500, 0.001)
    # mmdetection's fine-tuning guide: lr 0.01 per 8 images (the same lr per image), 8 epochs, decay after the 7th
    ft = RECIPES["finetune"]
    assert (ft.epochs, ft.milestones, ft.base_lr / ft.base_batch_size) == (8, (7,), 0.02 / 16)
    assert lr_factor(8 * 100 - 1, 100, ft) == pytest.approx(0.1) and lr_factor(7 * 100 - 1, 100, ft) == 1.0


def test_linear_scaling_and_optimizer():
    r = RECIPES["1x"]
    assert scaled_lr(r, 16) == pytest.approx(0.02) and scaled_lr(r, 2) == pytest.approx(0.0025)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)  # frozen parameters take no step
    opt = build_optimizer(model, r, 8)
    group = opt.param_groups[0]
    assert len(group["params"]) == 3 and group["lr"] == pytest.approx(0.01)
    assert (group["momentum"], group["weight_decay"]) == (0.9, 1e-4)


def test_warmup_then_steps_at_milestone_epochs():
    r = Recipe(epochs=12, milestones=(8, 11), warmup_iters=500, warmup_ratio=0.001)
    ipe = 100  # iterations per epoch
    assert lr_factor(0, ipe, r) == pytest.approx(0.001)
    # mmengine's LinearLR(begin=0, end=500) spans 499 steps: full rate at iteration 499
    assert lr_factor(250, ipe, r) == pytest.approx(0.001 + 0.999 * 250 / 499)
    assert lr_factor(498, ipe, r) < 1.0 and lr_factor(499, ipe, r) == 1.0 and lr_factor(799, ipe, r) == 1.0
    assert lr_factor(800, ipe, r) == pytest.approx(0.1)  # first iteration of epoch 9
    assert lr_factor(1099, ipe, r) == pytest.approx(0.1) and lr_factor(1100, ipe, r) == pytest.approx(0.01)
    # the scheduler follows the same curve step by step
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.02)
    sched = build_scheduler(opt, r, ipe)
    seen = []
    for _ in range(1200):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.02 * 0.001) and seen[600] == pytest.approx(0.02)
    assert seen[850] == pytest.approx(0.002) and seen[1150] == pytest.approx(0.0002)


def mmengine_lrs(lr: float, recipe: Recipe, iters_per_epoch: int, n: int) -> list[float]:
    """The lr of each of ``n`` iterations under mmdetection's ``param_scheduler`` pair, computed the way
    mmengine 0.10 steps it (``_ParamScheduler.step`` and the chainable ``_get_value`` of ``LinearLR`` and
    ``MultiStepLR``): both start with one ``step()`` at construction and step once after every iteration;
    each changes the lr only while its step counter is in ``[begin, end)``. ``LinearLR(start_factor=ratio,
    begin=0, end=W, by_epoch=False)``: ``total_iters = end - begin - 1``; step 0 multiplies by the start factor,
    step k by ``1 + (1 - start) / (total_iters * start + (k - 1) * (1 - start))``. ``MultiStepLR`` by epoch,
    converted to iterations by ``build_iter_from_epoch``: milestones ``m * epoch_length``, multiply by gamma there."""
    start, end = recipe.warmup_ratio, recipe.warmup_iters
    milestones = {m * iters_per_epoch for m in recipe.milestones}
    value, lrs = lr, []
    for step in range(n):  # step k runs after k iterations (k = 0: at construction)
        if step < end:
            total = end - 1
            value *= start if step == 0 else 1 + (1 - start) / (total * start + (step - 1) * (1 - start))
        if step in milestones:
            value *= recipe.gamma
        lrs.append(value)
    return lrs


@pytest.mark.parametrize("warmup,ipe,milestones", [(500, 100, (8, 11)), (3, 1, (16, 22)), (2, 5, (1, 3)),
                                                   (7, 3, (1, 2)), (0, 4, (2,))])
def test_schedule_is_mmengines(warmup, ipe, milestones):
    """Warm-up and step decay give mmengine's learning rates, including a milestone inside the warm-up."""
    r = Recipe(epochs=100, milestones=milestones, warmup_iters=warmup, warmup_ratio=0.001)
    n = 1300 if warmup == 500 else 40
    ref = mmengine_lrs(0.02, r, ipe, n)
    ours = [0.02 * lr_factor(i, ipe, r) for i in range(n)]
    assert max(abs(a - b) / b for a, b in zip(ours, ref)) < 1e-12
    if warmup == 3:  # the trajectory fixtures' warm-up: 2.5e-6, 0.00125125, then 0.0025 (lr 0.0025)
        assert [0.0025 * lr_factor(i, ipe, r) for i in range(4)] == pytest.approx([2.5e-6, 0.00125125, 0.0025, 0.0025],
                                                                                   rel=1e-12)


def test_schedule_against_installed_mmengine():
    """Where mmengine is installed (it is not a dependency), its own schedulers give the same rates."""
    sched = pytest.importorskip("mmengine.optim.scheduler")
    for warmup, ipe, milestones in [(500, 100, (8, 11)), (7, 3, (1, 2))]:
        r = Recipe(epochs=100, milestones=milestones, warmup_iters=warmup, warmup_ratio=0.001)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02)
        linear = sched.LinearLR(opt, start_factor=0.001, by_epoch=False, begin=0, end=warmup)
        steps = sched.MultiStepLR.build_iter_from_epoch(opt, milestones=list(milestones), gamma=0.1, by_epoch=True,
                                                        epoch_length=ipe)
        for i in range(1200):
            assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * lr_factor(i, ipe, r), rel=1e-12), i
            opt.step()
            linear.step()
            steps.step()


def test_warmup_of_one_iteration_is_refused():
    with pytest.raises(Res2DetError, match="warmup_iters"):
        Recipe(warmup_iters=1)


# ------------------------------------------------------------------------------------------------------ config
def test_one_preset_per_detector_row_with_its_recipe():
    p = presets()
    detectors = {n for n, s in MODELS.items() if s.task != "classification" and not n.endswith("_tiny_fpn")
                 and s.config.conventions != "paddle_static"}  # inference only
    assert detectors <= set(p) and "shapes" in p
    with pytest.raises(Res2DetError, match="no training"):
        load_config("mask_rcnn_res2net50_vb_26w_4s_fpn_2x_static")
    assert p["mask_rcnn_r2_101_fpn_2x_coco"].recipe == RECIPES["2x"]
    assert p["cascade_rcnn_r2_101_fpn_20e_coco"].recipe == RECIPES["20e"]
    assert p["faster_rcnn_res2net50_vb_26w_4s_fpn_1x_coco"].recipe == RECIPES["1x"]
    assert p["mask_rcnn_r2_101_fpn_2x_coco"].batch_size * 8 == 16  # 2 images x 8 GPUs, as published


def test_set_edits_typed_fields():
    cfg = apply_settings(load_config("shapes"), ["recipe.epochs=3", "batch_size=8", "data.root=/tmp/x",
                                                 "grad_clip=35", "amp=bf16", "model.frozen_stages=1",
                                                 "data.scale=(640, 480)"])
    assert cfg.recipe.epochs == 3 and cfg.batch_size == 8 and cfg.data.root == "/tmp/x"
    assert cfg.grad_clip == 35.0 and isinstance(cfg.grad_clip, float) and cfg.amp == "bf16"
    assert cfg.model_options == {"frozen_stages": 1} and cfg.data.scale == (640, 480)
    for bad, words in (["recipe.epoch=3", "no field 'epoch'"], ["batch_size=two", "not a valid value"],
                       ["amp=fp8", "not a valid value"], ["batch_size", "key=value"]):
        with pytest.raises(Res2DetError, match=words):
            apply_settings(cfg, [bad])



def test_repeated_set_options_all_apply():
    """`--set a=1 --set b=2` keeps both edits (a plain store action silently kept only the last one)."""
    from res2det.cli.main import build_parser

    args = build_parser().parse_args(["train", "shapes", "--set", "max_iters=30", "eval_every=0", "--set", "draw=0"])
    assert args.set == ["max_iters=30", "eval_every=0", "draw=0"]

def test_config_file_and_unknown_preset(tmp_path):
    path = tmp_path / "my.py"
    path.write_text(textwrap.dedent("""
        from res2det.engine.train_config import TrainConfig, RECIPES
        config = TrainConfig(model="mask_rcnn_r2_tiny_fpn", recipe=RECIPES["1x"], batch_size=3)
    """))
    cfg = load_config(str(path))
    assert isinstance(cfg, TrainConfig) and cfg.batch_size == 3
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(Res2DetError, match="must define `config"):
        load_config(str(tmp_path / "empty.py"))
    with pytest.raises(Res2DetError, match="did you mean mask_rcnn_r2_101_fpn_2x_coco"):
        load_config("mask_rcnn_r2_101_fpn_2x_cocoo")


# ------------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_keep_last_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for it in (10, 20, 30):
        mgr.save({"iteration": it, "w": torch.full((3,), float(it))}, it)
    assert sorted(p.name for p in tmp_path.glob("iter_*.pth")) == ["iter_0000020.pth", "iter_0000030.pth"]
    assert mgr.latest().name == "iter_0000030.pth"
    mgr.mark_best(tmp_path / "iter_0000020.pth")
    mgr.save({"iteration": 40}, 40)  # pruning iter_20 leaves best.pth intact
    assert torch.load(tmp_path / "best.pth", weights_only=True)["iteration"] == 20


def test_bad_training_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_training_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {}}, tmp_path / "weights_only.pth")
    with pytest.raises(CheckpointError, match=r"weights_only.pth: not a res2det training checkpoint \(missing"):
        load_training_checkpoint(tmp_path / "weights_only.pth")
    mgr = CheckpointManager(tmp_path)
    good = mgr.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 0, "iteration": 5, "rng": {}}, 5)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable"):
        load_training_checkpoint(tmp_path / "truncated.pth")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pth")
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_killed_writer_never_corrupts_latest(tmp_path):
    """A process killed while it writes checkpoints in a loop leaves ``latest`` naming a complete file."""
    script = textwrap.dedent(f"""
        import torch
        from res2det.engine.run_checkpoints import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r}, keep_last=2)
        torch.manual_seed(0)
        big = torch.randn(2_000_000)
        it = 0
        while True:
            it += 1
            mgr.save({{"model": {{"w": big + it}}, "optimizer": {{}}, "scheduler": {{}}, "epoch": 0,
                      "iteration": it, "rng": {{}}}}, it)
            print(it, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(3):  # let it write a few, then kill it in the middle of the next one
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = CheckpointManager(tmp_path).latest()
    state = load_training_checkpoint(latest)
    torch.manual_seed(0)
    assert state["iteration"] >= 3 and torch.equal(state["model"]["w"], torch.randn(2_000_000) + state["iteration"])


# ------------------------------------------------------------------------------------- ImageNet initialisation
@pytest.mark.slow
def test_backbone_init_from_imagenet_weights(seeded_checkpoint, tmp_path):
    import res2det
    from res2det.zoo import load_backbone_weights

    # timm/official layout of Res2Net-50 v1b into the DCNv2 Mask R-CNN: all but fc and the zero DCN offsets
    path = seeded_checkpoint("res2net50d")
    source = torch.load(path, weights_only=True)
    model = res2det.create_model("mask_rcnn_r2_50_dcnv2_fpn_2x_coco")
    load_backbone_weights(model, str(path), classifier="res2net50_v1b_26w_4s")
    assert torch.equal(model.backbone.layer3[0].convs[0].weight, source["layer3.0.convs.0.weight"])
    assert torch.equal(model.backbone.conv1[0].weight, source["conv1.0.weight"])
    assert model.backbone.layer3[0].convs[0].conv_offset.weight.abs().sum() == 0
    # mmdetection's backbone-only ImageNet files use its own names (stem.*)
    detector = seeded_checkpoint("mask_rcnn_r2_101_fpn_2x_coco")
    full = torch.load(detector, weights_only=True)
    torch.save({k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")}, tmp_path / "bb.pth")
    model = res2det.create_model("mask_rcnn_r2_101_fpn_2x_coco")
    load_backbone_weights(model, str(tmp_path / "bb.pth"), classifier="res2net101_v1b_26w_4s")
    reference = res2det.create_model("mask_rcnn_r2_101_fpn_2x_coco", weights=str(detector)).backbone.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.backbone.state_dict().items())
    # weights of another architecture: one error naming the file and the keys
    with pytest.raises(CheckpointError, match="res2net50d.pth"):
        load_backbone_weights(res2det.create_model("mask_rcnn_r2_101_fpn_2x_coco"), str(path),
                              classifier="res2net101_v1b_26w_4s")
    presets_ = presets()
    assert presets_["htc_r2_101_fpn_20e_coco"].backbone_init == ("res2net101_v1b_26w_4s", "official")
    assert presets_["mask_rcnn_r2_50_dcnv2_fpn_2x_coco"].backbone_init == ("res2net50_v1b_26w_4s", "official")
