"""Issue #24: long runs survive what users and schedulers do. A folder ``infer`` goes on past unreadable files
(first, in the middle, last) and records them; run folders and caches written by processes started together do
not collide; SIGTERM / SIGINT at a random moment stop a training at an iteration with a checkpoint (exit
128 + signum, one line), and ``--resume`` gives bit for bit the uninterrupted run's weights (one process, and two
gloo processes stopping at the same iteration); a folder ``infer`` stopped by SIGTERM resumes to the
uninterrupted run's records."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res2det.cli.main import main

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = "mask_rcnn_r2_tiny_fpn"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "res2det.cli.main", *args], cwd=REPO, env=env or _env(),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _png(path: Path, seed: int, size=(64, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Fixed weights for the tiny detector, so that separate processes give the same detections."""
    import res2det
    from res2det.checkpoint import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(res2det.create_model(TINY), path, model_name=TINY)
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ unreadable files in a folder
@pytest.mark.slow
def test_folder_infer_goes_on_past_unreadable_files(tiny_weights, tmp_path, capsys):
    photos = tmp_path / "photos"
    good = [_png(photos / "b.png", 1), _png(photos / "d.png", 2)]
    cut = _png(tmp_path / "whole.png", 3).read_bytes()
    bad = {photos / "a.png": cut[: len(cut) // 2],  # first in name order: truncated pixels
           photos / "c.jpg": b"not a jpeg",  # in the middle: no image at all
           photos / "e.png": b""}  # last: empty
    for path, data in bad.items():
        path.write_bytes(data)
    weights = ["--model", TINY, "--weights", str(tiny_weights), "--score-thr", "0.9"]  # few masks to paste: fast
    alone = tmp_path / "alone.jsonl"  # the good images by themselves
    assert main(["infer", *weights, *map(str, good), "--out", str(alone)]) == 0
    capsys.readouterr()

    out = tmp_path / "dets.jsonl"
    assert main(["infer", *weights, str(photos), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    for path in bad:
        assert sum(f"res2det: warning: {path}: " in line and line.endswith("skipped") for line in lines) == 1, err
    assert lines[-1].startswith("res2det: error: 3 of 5 image(s) could not be read and were skipped") \
        and str(out) in lines[-1], lines[-1]
    records = _records(out)
    assert [r["file"] for r in records] == [str(p) for p in sorted([*good, *bad])]  # in order, one line each
    assert {r["file"]: r["error"] for r in records if "error" in r}.keys() == {str(p) for p in bad}
    assert all(r["error"].startswith(f"{r['file']}: not a readable image") for r in records if "error" in r)
    assert [r for r in records if "error" not in r] == _records(alone)

    # the same with a background worker and batches of two (a batch keeps its readable image)
    batched = tmp_path / "batched.jsonl"
    assert main(["infer", *weights, str(photos), "--out", str(batched), "--workers", "1", "--batch-size", "2"]) == 2
    assert sorted(_records(batched), key=lambda r: r["file"]) == records
    capsys.readouterr()

    # --resume does not try the recorded ones again, unless --retry-bad; a repaired file then gets its record
    assert main(["infer", *weights, str(photos), "--out", str(out), "--resume"]) == 0
    assert "5 image(s) already in" in capsys.readouterr().out and _records(out) == records
    _png(photos / "a.png", 3)
    assert main(["infer", *weights, str(photos), "--out", str(out), "--resume", "--retry-bad"]) == 2
    assert "2 of 3 image(s) could not be read" in capsys.readouterr().err
    again = {r["file"]: r for r in _records(out)}
    assert len(again) == len(_records(out)) == 5 and "detections" in again[str(photos / "a.png")]

    # --on-bad fail: today's stop at the first, before the model is built, nothing written
    assert main(["infer", *weights, str(photos), "--out", str(tmp_path / "fail.jsonl"), "--on-bad", "fail"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"res2det: error: {photos / 'c.jpg'}: not a readable image")
    assert not (tmp_path / "fail.jsonl").exists()


def test_a_json_list_out_records_unreadable_images_too(tiny_weights, tmp_path, capsys):
    good = [_png(tmp_path / "000000000001.png", 1), _png(tmp_path / "000000000003.png", 2)]
    bad = tmp_path / "000000000002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "dets.json"
    argv = ["infer", "--model", TINY, "--weights", str(tiny_weights), "--score-thr", "0.9", str(good[0]), str(bad),
            str(good[1])]
    assert main([*argv, "--out", str(out)]) == 2
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == [str(good[0]), str(bad), str(good[1])]
    assert "error" in records[1] and all("detections" in records[i] for i in (0, 2))


def test_new_run_dir_gives_processes_started_together_a_folder_each(tmp_path):
    from res2det.engine.trainer import new_run_dir

    (tmp_path / "runs" / "shapes").mkdir(parents=True)  # an earlier run
    start, made = threading.Barrier(8), []

    def claim():
        start.wait()
        made.append(new_run_dir(tmp_path / "runs", "shapes"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == sorted(f"shapes-{k}" for k in range(2, 10))
    assert all(p.is_dir() for p in made)


def test_second_signal_stops_at_once_and_ctrl_c_elsewhere_is_one_line(tmp_path):
    code = ("import os, signal, sys, time\n"
            "from res2det.interrupt import stop_on_signals, stop_requested\n"
            "with stop_on_signals():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    assert stop_requested() == signal.SIGTERM\n"
            "    print('recorded', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and done.stdout == "recorded\n", done
    assert "second SIGTERM: stopped at once" in done.stderr and "Traceback" not in done.stderr

    import argparse

    from res2det.cli.common import run

    def interrupted(args):  # Ctrl-C where nothing needs saving: one line, exit 130
        raise KeyboardInterrupt

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=interrupted)
    assert run(parser, []) == 130


# ----------------------------------------------------------------------------------------- training and signals
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from res2det.data import shapes_dataset

    return shapes_dataset(tmp_path_factory.mktemp("data"), seed=3, num_train=8, num_val=3, image_size=96)


def _tiny_config_file(folder: Path, root: Path, **changes) -> Path:
    from res2det.engine.train_config import DataConfig, Recipe, TrainConfig

    cfg = TrainConfig(model=TINY, data=DataConfig(root=str(root), train_split="train", val_split="val",
                                                  num_workers=1),
                      recipe=Recipe(epochs=2, milestones=(2,), optimizer="adamw", base_lr=1e-3, base_batch_size=2,
                                    weight_decay=0.05, warmup_iters=4),
                      batch_size=2, eval_every=0, log_every=3, draw=0, checkpoint_every=0, keep_last=2)
    cfg = dataclasses.replace(cfg, **changes)
    path = folder / "tiny.py"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("from res2det.engine.train_config import *\nconfig = " + repr(cfg) + "\n")
    return path


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model_final.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(shapes_root, tmp_path_factory):
    """(config file logging every iteration, final weights, seconds per iteration)."""
    folder = tmp_path_factory.mktemp("whole")
    config = _tiny_config_file(folder, shapes_root, log_every=1)
    whole = _cli("train", str(config), "--out", str(folder / "runs"))
    lines, times = [], []
    for line in whole.stdout:
        lines.append(line)
        if line.startswith("kind=train"):
            times.append(time.perf_counter())
    whole.wait(timeout=600)
    assert whole.returncode == 0, "".join(lines) + whole.stderr.read()
    assert len(times) == 8, "".join(lines)
    return config, _final_state(folder / "runs" / "tiny"), (times[-1] - times[0]) / 7


@pytest.mark.slow
def test_signal_at_a_random_moment_then_resume_is_bit_exact(uninterrupted, tmp_path):
    config, expected, per_iteration = uninterrupted
    seed = random.randrange(10**6)
    # SIGTERM or SIGINT (one handler; drawn, to keep the suite short) at a random moment of the training: after
    # its k-th iteration's log line (k = 0: its run folder's line, before the first step) plus a random part of
    # an iteration. Placed by the run's own progress, not by a clock measured on another run: under a test
    # worker's varying load a fixed delay could land after the end.
    rng = random.Random(seed)
    signum = rng.choice([signal.SIGTERM, signal.SIGINT])
    after, delay = rng.randrange(7), rng.uniform(0.0, 0.8 * per_iteration)
    out = tmp_path / "runs"
    # a new session: the signal goes to the whole process group, data-loader worker included, as Ctrl-C does
    run = _cli("train", str(config), "--out", str(out), start_new_session=True)
    logged = -1  # the run folder's line counts as iteration 0's
    for line in run.stdout:
        logged += line.startswith(("run folder:", "kind=train"))
        if logged == after:
            break
    time.sleep(delay)
    os.killpg(run.pid, signum)
    rest, err = run.communicate(timeout=600)
    context = f"seed {seed}, {delay:.2f} s after iteration {after}'s line ({per_iteration:.2f} s each):\n{rest}{err}"
    assert run.returncode == 128 + signum, context
    assert "Traceback" not in err, context
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    m = re.fullmatch(rf"res2det: {name}: stopped at iteration (\d+) of 8; checkpoint (\S+); to continue, run the "
                     rf"same command with --resume {re.escape(str(out / 'tiny'))}", last)
    assert m, context
    assert Path(m[2]) == out / "tiny" / f"iter_{int(m[1]):07d}.pth" and Path(m[2]).is_file(), context
    assert not (out / "tiny" / "model_final.safetensors").exists()

    resumed = _cli("train", str(config), "--out", str(out), "--resume", str(out / "tiny"))
    text, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, context + text + err
    got = _final_state(out / "tiny")
    assert got.keys() == expected.keys()
    diffs = {k: (got[k].double() - expected[k].double()).abs().max().item() for k in got if got[k].numel()}
    assert max(diffs.values()) == 0.0, (context, sorted(diffs.items(), key=lambda kv: -kv[1])[:5])
    iters = [r["iter"] for r in _records(out / "tiny" / "log.jsonl") if r["kind"] == "train"]
    assert iters == sorted(set(iters)), iters  # no iteration logged twice across the stop


@pytest.mark.slow
def test_two_trainings_and_two_exports_started_together(shapes_root, tiny_weights, tmp_path):
    config = _tiny_config_file(tmp_path, shapes_root, max_iters=2)
    runs = [_cli("train", str(config), "--out", str(tmp_path / "runs")) for _ in range(2)]
    outs = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert folders == ["tiny", "tiny-2"], folders
    printed = sorted(re.search(r"run folder: (\S+)", out)[1] for out, _ in outs)
    assert printed == [str(tmp_path / "runs" / f) for f in folders]
    for f in folders:  # each run's own log: its iterations once
        assert [r["iter"] for r in _records(tmp_path / "runs" / f / "log.jsonl") if r["kind"] == "train"] == [2]

    onnx = tmp_path / "out" / "tiny.onnx"
    exports = [_cli("export", TINY, "--weights", str(tiny_weights), "--out", str(onnx)) for _ in range(2)]
    outs = [r.communicate(timeout=600) for r in exports]
    assert [r.returncode for r in exports] == [0, 0], outs
    assert [p.name for p in onnx.parent.iterdir()] == ["tiny.onnx"]  # no partial or temporary file
    from res2det.deploy import OnnxDetector

    OnnxDetector(onnx, threads=1)  # a complete graph

    # two folder runs through the ONNX Runtime backend share a cache they both fill at once
    photos = [str(_png(tmp_path / "photos" / f"{k}.png", k)) for k in range(2)]
    env = _env(RES2DET_CACHE=str(tmp_path / "cache"))
    infers = [_cli("infer", "--model", TINY, "--weights", str(tiny_weights), "--backend", "onnxruntime", *photos,
                   "--out", str(tmp_path / f"dets{k}.jsonl"), env=env) for k in range(2)]
    outs = [r.communicate(timeout=600) for r in infers]
    assert [r.returncode for r in infers] == [0, 0], outs
    cached = sorted(p.suffix for p in (tmp_path / "cache" / "onnx").iterdir())
    assert cached == [".checked", ".onnx"], cached
    assert _records(tmp_path / "dets0.jsonl") == _records(tmp_path / "dets1.jsonl")


@pytest.mark.slow
def test_infer_stopped_by_sigterm_resumes_to_the_same_records(tiny_weights, tmp_path):
    photos = [_png(tmp_path / "photos" / f"{k:02d}.png", k) for k in range(16)]
    argv = ["infer", "--model", TINY, "--weights", str(tiny_weights), str(tmp_path / "photos")]
    whole = _cli(*argv, "--out", str(tmp_path / "whole.jsonl"))
    assert whole.wait(timeout=600) == 0, whole.communicate()
    out = tmp_path / "stopped.jsonl"
    run = _cli(*argv, "--out", str(out))
    deadline = time.time() + 300
    while time.time() < deadline and not (out.is_file() and out.read_text().count("\n") >= 2):
        time.sleep(0.01)
    run.send_signal(signal.SIGTERM)
    text, err = run.communicate(timeout=600)
    assert run.returncode == 128 + signal.SIGTERM, text + err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"res2det: SIGTERM: stopped after \d+ of 16 image\(s\); the records in {re.escape(str(out))} "
                        r"are complete; to continue, run the same command with --resume", last), err
    done = _records(out)  # every line whole
    assert 2 <= len(done) < len(photos), len(done)
    resumed = _cli(*argv, "--out", str(out), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.communicate()
    assert _records(out) == _records(tmp_path / "whole.jsonl")


# ------------------------------------------------------------------------------------ two gloo processes, a stop

def _ddp_stop_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    from res2det.engine.train_config import DataConfig, Recipe, TrainConfig
    from res2det.engine.trainer import Trainer
    from res2det.interrupt import Interrupted

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = TrainConfig(model=TINY, data=DataConfig(root=root, train_split="train", val_split="val", num_workers=0),
                      recipe=Recipe(epochs=2, milestones=(2,), optimizer="adamw", base_lr=1e-3, base_batch_size=2,
                                    weight_decay=0.05, warmup_iters=4),
                      batch_size=2, eval_every=0, log_every=1, draw=0, checkpoint_every=0, keep_last=2)
    whole = Trainer(cfg, Path(out) / "whole", progress=False)
    whole.fit()
    stopped = Trainer(cfg, Path(out) / "stopped", progress=False)
    if rank == 1:  # the signal reaches one rank only, during its second iteration
        step = stopped._step

        def signalled_step(*args):
            if stopped.iteration == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(*args)

        stopped._step = signalled_step
    result = {}
    try:
        stopped.fit()
    except Interrupted as e:
        result = {"signum": e.signum, "message": str(e), "iteration": stopped.iteration}
    resumed = Trainer(cfg, Path(out) / "stopped", resume=True, progress=False)
    resumed.fit()
    torch.save({"stop": result, "whole": whole.model.state_dict(), "resumed": resumed.model.state_dict()},
               Path(out) / f"rank{rank}.pth")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_iteration_and_resume_exactly(shapes_root, tmp_path):
    torch.multiprocessing.spawn(_ddp_stop_worker, args=(2, free_port(), str(shapes_root), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in (0, 1))
    assert r0["stop"]["iteration"] == r1["stop"]["iteration"] == 2  # both after the signalled rank's iteration
    assert r0["stop"]["signum"] == r1["stop"]["signum"] == signal.SIGTERM
    checkpoint = tmp_path / "stopped" / "iter_0000002.pth"
    assert r0["stop"]["message"] == f"SIGTERM: stopped at iteration 2 of 4; checkpoint {checkpoint}"
    assert r1["stop"]["message"] == ""  # rank 0 speaks (and writes the checkpoint)
    for r in (r0, r1):
        assert all(torch.equal(r["resumed"][k], r["whole"][k]) for k in r["whole"])
