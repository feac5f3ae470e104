"""Bad input gets one clear error (naming the file / field and the problem), exit code 2 from the CLI, no
traceback, and nothing already written is changed. A first table of the cases found by hand (issue: every bad
input gets one clear error); more classes belong here as they are fixed."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from res2det.cli.main import main
from res2det.data import CocoDataset
from res2det.errors import DataError

from conftest import one_error_line
from test_data_coco import bad_ann, mini_coco


# --------------------------------------------------------------------------------------------- annotations
ANNOTATIONS = {  # case -> (skip reason, annotation, phrase of the message)
    "polygon coordinate 1e30 (segfaulted pycocotools)": (
        "bad_polygon", bad_ann(segmentation=[[5.0, 5.0, 1e30, 5.0, 15.0, 15.0]]), "1e+30 lies far outside"),
    "negative polygon far outside": (
        "bad_polygon", bad_ann(segmentation=[[5.0, 5.0, -1e9, 5.0, 15.0, 15.0]]), "far outside the 64x48 image"),
    "garbage compressed RLE": (
        "bad_rle", bad_ann(segmentation={"size": [48, 64], "counts": "garbage!!"}), "do not decode"),
    "compressed RLE of the wrong length": (
        "bad_rle", bad_ann(segmentation={"size": [48, 64], "counts": "0"}), "do not decode"),
    "negative RLE counts": (
        "bad_rle", bad_ann(segmentation={"size": [48, 64], "counts": [3072 + 5, -5]}), "non-negative"),
}


@pytest.mark.parametrize("case", sorted(ANNOTATIONS))
def test_bad_annotation_fails_or_is_skipped(tmp_path, case):
    reason, ann, phrase = ANNOTATIONS[case]
    ann_file, image_dir = mini_coco(tmp_path, [ann])
    with pytest.raises(DataError) as e:
        CocoDataset(ann_file, image_dir, train=True)
    assert str(ann_file) in str(e.value) and "annotation 555" in str(e.value) and phrase in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        ds = CocoDataset(ann_file, image_dir, train=False, on_bad="skip")
    assert ds.skipped == Counter({reason: 1}) and 555 not in ds.coco.getAnnIds()


def test_duplicate_annotation_ids(tmp_path):
    """COCOeval would hold every copy as another object: an error, or the later copy skipped."""
    ann_file, image_dir = mini_coco(tmp_path, [bad_ann(id=101)])  # 101 is image 1's annotation already
    with pytest.raises(DataError, match="duplicate annotation id 101"):
        CocoDataset(ann_file, image_dir, train=False)
    with pytest.warns(UserWarning, match="skipped 1 bad"):
        ds = CocoDataset(ann_file, image_dir, train=False, on_bad="skip")
    assert ds.skipped == Counter({"duplicate_annotation_id": 1}) and len(ds.coco.getAnnIds()) == 3


def test_image_id_that_is_a_list(tmp_path):
    import json

    ann_file, image_dir = mini_coco(tmp_path)
    data = json.loads(ann_file.read_text())
    data["images"][0]["id"] = [1]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"im1.png.* has id \[1\]; image ids must be integers or strings"):
        CocoDataset(ann_file, image_dir, train=False)


# ------------------------------------------------------------------------------------------------ configs
SET_VALUES = {  # --set edit -> phrase
    "recipe.epochs=0": "Recipe.epochs: 0", "max_iters=0": "TrainConfig.max_iters: 0",
    "max_iters=-1": "TrainConfig.max_iters: -1", "grad_clip=-1": "TrainConfig.grad_clip: -1",
    "checkpoint_every=-1": "TrainConfig.checkpoint_every: -1", "data.flip_prob=7": "DataConfig.flip_prob: 7",
    "batch_size=0": "TrainConfig.batch_size: 0", "batch_size=-1": "TrainConfig.batch_size: -1",
    "recipe.base_lr=-0.1": "Recipe.base_lr: -0.1", "device=tpu": "TrainConfig.device: 'tpu'",
    "data.scale=(0,0)": "DataConfig.scale: (0, 0)", "recipe.momentum=1.5": "Recipe.momentum: 1.5",
    "keep_last=0": "TrainConfig.keep_last: 0", "data.num_workers=-2": "DataConfig.num_workers: -2",
}


@pytest.mark.parametrize("edit", sorted(SET_VALUES))
def test_bad_config_values_are_refused_before_anything_runs(edit, tmp_path, capsys):
    assert main(["train", "shapes", "--set", edit, "--out", str(tmp_path / "runs")]) == 2
    assert SET_VALUES[edit] in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


CONFIG_FILES = {  # file body -> phrase
    "import sys\nsys.exit(0)\n": "the config file exited (sys.exit(0))",
    "raise ValueError('nope')\n": "running the config file raised ValueError: nope",
    "config = TrainConfig(model=\n": "syntax error in the config file",
    "from res2det.engine.train_config import TrainConfig\nconfig = TrainConfig(model='shapes', batch_size=0)\n":
        "TrainConfig.batch_size: 0",
}


@pytest.mark.parametrize("body", list(CONFIG_FILES), ids=["exit", "raises", "syntax", "bad-value"])
def test_bad_config_files(body, tmp_path, capsys):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    assert main(["train", str(path), "--out", str(tmp_path / "runs")]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and CONFIG_FILES[body] in line


# ------------------------------------------------------------------------------------------- run folders
def test_resume_never_picks_another_configs_run(tmp_path, capsys):
    """`--resume` of `shapes` with only `shapes_small` present: an error; shapes_small is untouched."""
    other = tmp_path / "runs" / "shapes_small"
    other.mkdir(parents=True)
    (other / "latest").write_text("iter_4.pth\n")
    (other / "config.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    assert main(["train", "shapes", "--resume", "--out", str(tmp_path / "runs")]) == 2
    assert "no run of 'shapes'" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_resume_finds_the_numbered_runs_of_its_own_config(tmp_path):
    from res2det.engine.trainer import latest_run_dir

    runs = tmp_path / "runs"
    for name in ("shapes", "shapes-2", "shapes_small", "shapes-x"):
        (runs / name).mkdir(parents=True)
        (runs / name / "latest").write_text("x\n")
    os.utime(runs / "shapes_small" / "latest", (4e9, 4e9))  # the newest, but another config's
    os.utime(runs / "shapes-x" / "latest", (4e9, 4e9))
    os.utime(runs / "shapes-2" / "latest", (3e9, 3e9))
    assert latest_run_dir(runs, "shapes") == runs / "shapes-2"


def test_atomic_writes_follow_the_umask(tmp_path):
    from res2det.checkpoint import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("size", [(5000, 1), (2, 4000)], ids=["1x5000", "4000x2"])
def test_extreme_aspect_images_are_detected_not_crashed(size, tmp_path, capsys):
    """A strip whose short side would round to zero rows at the model's scale keeps one row."""
    import json

    w, h = size
    path = tmp_path / "strip.png"
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)
    assert main(["infer", "--model", "mask_rcnn_r2_tiny_fpn", str(path), "--out", str(tmp_path / "d.json"),
                 "--draw", str(tmp_path / "drawn")]) == 0
    (record,) = json.loads((tmp_path / "d.json").read_text())
    assert (record["width"], record["height"]) == (w, h)
    assert Image.open(tmp_path / "drawn" / "strip.png").size == (w, h)


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("change, words", [
    (lambda sd, k: sd.__setitem__(k, sd[k].round().to(torch.int64)), "integer / float mismatches (1"),
    (lambda sd, k: sd[k].view(-1).__setitem__(0, float("nan")), "NaN or infinite values (1)"),
    (lambda sd, k: sd[k].view(-1).__setitem__(0, float("inf")), "NaN or infinite values (1)"),
], ids=["int64-into-float", "nan", "inf"])
def test_checkpoint_values_are_checked(change, words, tmp_path, capsys):
    import res2det

    model = res2det.create_model("mask_rcnn_r2_tiny_fpn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "roi_head.bbox_head.fc_cls.weight"
    change(state, key)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    assert main(["infer", "--model", "mask_rcnn_r2_tiny_fpn", "--weights", str(path), str(image)]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and words in line


# ------------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize("flag, target, words", [
    ("--out", "folder", "is a folder; --out takes the path of a file"),
    ("--out", "file/x.json", "is a file, so nothing can be written under it"),
    ("--draw", "file", "is a file; --draw takes the path of a folder"),
    ("--draw", "file/sub", "is a file, so nothing can be written under it"),
])
def test_infer_checks_output_paths_before_any_work(flag, target, words, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep me\n")
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    assert main(["infer", "--model", "mask_rcnn_r2_tiny_fpn", str(image), flag, str(tmp_path / target)]) == 2
    assert words in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "keep me\n" and not any((tmp_path / "folder").iterdir())


def test_train_checks_its_output_folder_first(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me\n")
    assert main(["train", "shapes", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; --out takes the path of a folder" in one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "keep me\n"


def test_pdparams_with_arrays_that_are_not_numbers(tmp_path, capsys):
    import pickle

    path = tmp_path / "obj.pdparams"
    path.write_bytes(pickle.dumps({"conv1_weights": np.array(["a", 1], dtype=object)}, protocol=2))
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    assert main(["infer", "--model", "faster_rcnn_res2net50_vb_26w_4s_fpn_1x_coco", "--weights", str(path),
                 str(image)]) == 2
    assert "arrays that are not numbers (1): ['conv1_weights (object)']" in one_error_line(capsys)


def test_test_refuses_a_checkpoint_trained_on_other_classes(tmp_path, capsys):
    """Same number of classes, other names: evaluating would score labels against the wrong categories."""
    import shutil

    import res2det
    from res2det.checkpoint import save_weights

    ann_file, image_dir = mini_coco(tmp_path / "mini")  # categories 'three' and 'seven'
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(ann_file, root / "annotations" / "instances_val.json")
    shutil.copytree(image_dir, root / "val")
    model = res2det.create_model("mask_rcnn_r2_tiny_fpn", num_classes=2, class_names=("cat", "dog"))
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights, model_name="mask_rcnn_r2_tiny_fpn",
                 options={"num_classes": 2, "class_names": ["cat", "dog"]})
    assert main(["test", "shapes", "--data", str(root), "--weights", str(weights), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert str(weights) in line and "trained on classes ['cat', 'dog']" in line and "'three'" in line


# ------------------------------------------------------------------------------------ data-loader workers
TINY_RUN = ["--set", "max_iters=2", "batch_size=1", "draw=0", "eval_every=0", "data.scale=(64,64)"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """A tiny shapes set (2 training, 2 validation images of 64 px): a training iteration takes a fraction of a
    second at data.scale=(64, 64)."""
    from res2det.data import shapes_dataset

    return shapes_dataset(tmp_path_factory.mktemp("data"), seed=3, num_train=2, num_val=2, image_size=64)


def _copy_with_unreadable(root: Path, dest: Path, split: str, count: int) -> list[Path]:
    """A copy of ``root`` whose first ``count`` ``split`` images are cut-off PNGs; those files."""
    import shutil

    shutil.copytree(root, dest)
    files = sorted((dest / split).iterdir())[:count]
    for f in files:
        f.write_bytes(f.read_bytes()[:60])
    return files


def test_an_unreadable_training_image_is_the_same_one_line_with_loader_workers(shapes_root, tmp_path, capsys):
    """With data.num_workers=1 PyTorch re-raised the worker's DataError with the worker's traceback as its
    message ("Caught DataError in DataLoader worker process 0 ... Original Traceback"); now the line is the one
    the main process gives with num_workers=0."""
    root = tmp_path / "data"
    bad = _copy_with_unreadable(shapes_root, root, "train", 2)
    lines = []
    for workers in (0, 1):
        out = tmp_path / f"runs{workers}"
        assert main(["train", "shapes", "--data", str(root), "--out", str(out), *TINY_RUN,
                     f"data.num_workers={workers}"]) == 2
        lines.append(one_error_line(capsys))
        assert not list(out.glob("*/iter_*.pth"))
    assert lines[0] == lines[1], lines
    (named,) = [f for f in bad if lines[1].startswith(f"res2det: error: {f}: not a readable image (")]
    assert lines[1].endswith(f"(image id {int(named.stem)} in {root / 'annotations' / 'instances_train.json'})")
    assert "Caught" not in lines[1]


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_gives_the_datasets_own_error_or_skips_with_workers(shapes_root, tmp_path, workers):
    """``Loader``, which training and evaluation (and ``build_loader``) read through: on_bad='fail' raises the
    dataset's own DataError, on_bad='skip' yields the readable images only."""
    from res2det.data import Loader, collate

    root = tmp_path / "data"
    (bad,) = _copy_with_unreadable(shapes_root, root, "val", 1)
    args = (root / "annotations" / "instances_val.json", root / "val")
    failing = CocoDataset(*args, train=False, scale=(64, 64))
    with pytest.raises(DataError) as direct:
        failing[0]
    with pytest.raises(DataError) as loaded:
        list(Loader(failing, batch_size=1, num_workers=workers, collate_fn=collate))
    assert type(loaded.value) is DataError and str(loaded.value) == str(direct.value)
    assert str(bad) in str(direct.value) and "Traceback" not in str(loaded.value)

    skipping = CocoDataset(*args, train=False, scale=(64, 64), on_bad="skip")
    with pytest.warns(UserWarning, match="skipped") if workers == 0 else contextlib.nullcontext():
        batches = list(Loader(skipping, batch_size=1, num_workers=workers, collate_fn=collate))
    files = [m["file"] for _, _, _, metas in batches for m in metas]
    assert len(files) == 2 and str(bad) not in files  # the unreadable image's place taken by the next one


def test_evaluate_model_with_workers_raises_the_datasets_error(shapes_root, tmp_path):
    import res2det
    from res2det.evaluation import evaluate_model

    root = tmp_path / "data"
    (bad,) = _copy_with_unreadable(shapes_root, root, "val", 1)
    ds = CocoDataset(root / "annotations" / "instances_val.json", root / "val", train=False, scale=(64, 64))
    model = res2det.create_model("mask_rcnn_r2_tiny_fpn", num_classes=ds.num_classes)
    with pytest.raises(DataError) as e:
        evaluate_model(model, ds, num_workers=1, progress=False, out_dir=tmp_path / "eval")
    assert str(e.value).startswith(f"{bad}: not a readable image") and "Caught" not in str(e.value)
    assert not (tmp_path / "eval").exists()


def test_res2det_test_names_an_unreadable_validation_image(shapes_root, tmp_path, capsys):
    """(``res2det test`` reads the data in its own process: data.num_workers is for training.)"""
    import res2det
    from res2det.checkpoint import save_weights

    root = tmp_path / "data"
    (bad,) = _copy_with_unreadable(shapes_root, root, "val", 1)
    names = CocoDataset(root / "annotations" / "instances_train.json", root / "train", train=True).class_names
    model = res2det.create_model("mask_rcnn_r2_tiny_fpn", num_classes=len(names), class_names=names)
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights, model_name="mask_rcnn_r2_tiny_fpn",
                 options={"num_classes": len(names), "class_names": list(names)})
    assert main(["test", "shapes", "--data", str(root), "--weights", str(weights), "--out", str(tmp_path / "o"),
                 "--set", "data.scale=(64,64)"]) == 2
    assert one_error_line(capsys).startswith(f"res2det: error: {bad}: not a readable image")


# ------------------------------------------------------------------------- outputs that cannot be written
OS_ERRORS = {name: getattr(errno, name) for name in ("ENOSPC", "EACCES", "EROFS")}


def _os_error(name: str, filename: str | None = None) -> OSError:
    code = OS_ERRORS[name]
    return OSError(code, os.strerror(code), *([filename] if filename else []))  # EACCES: a PermissionError


def refuse_creating(monkeypatch, folder: Path, error: str, name: str = "") -> None:
    """Creating a file (``atomic_write``'s temporary) under ``folder`` whose name starts with ``name`` fails
    with ``error``, as on a full disk, a read-only file system or a folder without write permission (the tests
    run as root, whom chmod does not stop)."""
    real = tempfile.mkstemp

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()) and \
                (prefix or "").startswith(f".{name}"):
            raise _os_error(error, os.path.join(dir, f"{prefix}k2j4h6{suffix}"))
        return real(suffix, prefix, dir, text)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


class _FullDisk:
    """A file that takes ``room`` bytes and then fails with ENOSPC, as a file filling the disk."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.room:
            self.file.write(view[:self.room])
            self.room = 0
            raise _os_error("ENOSPC")
        self.room -= len(view)
        return self.file.write(view)

    def __getattr__(self, name: str):  # flush, seek, truncate...
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def fill_disk_while_writing(monkeypatch, name: str, room: int = 4096, on_start=None) -> None:
    """Writing a file whose (temporary) name starts with ``.name.`` or is ``name`` fails as on a disk that fills
    up after ``room`` bytes: through Python's I/O in ``res2det.checkpoint`` with ENOSPC; ``torch.save`` and
    safetensors' ``save_file`` given the path fail as they do on a real full disk (seen on a full tmpfs): a
    RuntimeError 'unexpected pos' and a SafetensorError 'I/O error'. ``on_start(path)`` runs when such a
    write begins."""
    import builtins

    import safetensors.torch
    from safetensors import SafetensorError

    import res2det.checkpoint

    def victim(file) -> bool:
        if not isinstance(file, (str, os.PathLike)):
            return False
        base = Path(file).name
        hit = base.startswith(f".{name}.") or base == name
        if hit and on_start is not None:
            on_start(Path(file))
        return hit

    def fake_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _FullDisk(f, room) if ("w" in mode or "a" in mode) and victim(file) else f

    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def torch_save(obj, f, *args, **kwargs):
        if victim(f):
            Path(f).write_bytes(b"PK" * (room // 2))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")
        return real_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        if victim(filename):
            Path(filename).write_bytes(b"\0" * room)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(res2det.checkpoint, "open", fake_open, raising=False)
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("error", sorted(OS_ERRORS))
def test_train_on_a_full_or_read_only_disk_keeps_the_last_checkpoint(error, shapes_root, tmp_path, monkeypatch,
                                                                      capsys):
    """The second checkpoint cannot be written (ENOSPC part-way through torch.save, whose zip writer then
    raised a RuntimeError 'unexpected pos' in its place; EACCES / EROFS on creating it): one line naming the
    file and the reason, the first checkpoint is untouched and ``latest`` still names it, no temporary file."""
    from res2det.engine.run_checkpoints import load_training_checkpoint

    run = tmp_path / "runs" / "shapes"
    first = run / "iter_0000001.pth"
    before = {}
    if error == "ENOSPC":
        fill_disk_while_writing(monkeypatch, "iter_0000002.pth",
                                on_start=lambda _: before.update(first=first.read_bytes()))
    else:
        refuse_creating(monkeypatch, run, error, "iter_0000002.pth")
    assert main(["train", "shapes", "--data", str(shapes_root), "--out", str(tmp_path / "runs"), *TINY_RUN,
                 "checkpoint_every=1", "data.num_workers=0"]) == 2
    assert one_error_line(capsys) == f"res2det: error: {run / 'iter_0000002.pth'}: {os.strerror(OS_ERRORS[error])}"
    assert (run / "latest").read_text() == "iter_0000001.pth\n" and not (run / "iter_0000002.pth").exists()
    assert load_training_checkpoint(first)["iteration"] == 1
    if before:
        assert first.read_bytes() == before["first"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_weights_on_a_full_disk_keeps_the_file_there(suffix, tmp_path, monkeypatch):
    """safetensors' save_file reported a full disk as a SafetensorError, torch.save as a RuntimeError: now an
    OSError naming the file, and the weights already at that path are still there and load."""
    import res2det
    from res2det.checkpoint import read_weights, save_weights

    model = res2det.create_model("mask_rcnn_r2_tiny_fpn")
    path = tmp_path / f"w{suffix}"
    save_weights(model, path, model_name="mask_rcnn_r2_tiny_fpn")
    before = path.read_bytes()
    fill_disk_while_writing(monkeypatch, path.name)
    with pytest.raises(OSError) as e:
        save_weights(model, path, model_name="mask_rcnn_r2_tiny_fpn")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(path))
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    assert read_weights(path)[1]["model"] == "mask_rcnn_r2_tiny_fpn"


def test_a_log_line_that_does_not_fit_is_cut_off_again(tmp_path, monkeypatch):
    from res2det.checkpoint import append_text

    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1}\n')
    fill_disk_while_writing(monkeypatch, log.name, room=5)
    with pytest.raises(OSError) as e:
        append_text(log, '{"iter": 2, "loss": 1.5}\n')
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(log))
    assert log.read_text() == '{"iter": 1}\n'  # not '{"iter": 1}\n{"ite', which a resume could not read


@pytest.mark.parametrize("flag, error", [("--out", "ENOSPC"), ("--out", "EROFS"), ("--draw", "EACCES"),
                                         ("--draw", "ENOSPC")])
def test_infer_outputs_that_cannot_be_written(flag, error, tmp_path, monkeypatch, capsys):
    import res2det
    from res2det.checkpoint import save_weights

    weights = tmp_path / "w.safetensors"
    save_weights(res2det.create_model("mask_rcnn_r2_tiny_fpn"), weights, model_name="mask_rcnn_r2_tiny_fpn")
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "dets.json" if flag == "--out" else out / "drawn"
    if flag == "--out":
        target.write_text("[]\n")  # an earlier run's: kept as it was
    refuse_creating(monkeypatch, out, error)
    assert main(["infer", "--model", "mask_rcnn_r2_tiny_fpn", "--weights", str(weights), str(image), flag,
                 str(target)]) == 2
    written = target if flag == "--out" else target / "im.png"
    assert one_error_line(capsys) == f"res2det: error: {written}: {os.strerror(OS_ERRORS[error])}"
    if flag == "--out":
        assert target.read_text() == "[]\n"
    assert not written.exists() or flag == "--out"
    assert _leftovers(tmp_path) == []
