"""Checkpoints: formats, strict loading with listed keys, safe unpickling, atomic writes, verified downloads."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch

import res2det
from res2det.checkpoint import download, save_weights
from res2det.errors import CheckpointError, Res2DetError

NAME = "res2net50_26w_4s"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return res2det.create_model(NAME).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_own_format_round_trip(model, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    save_weights(model, path, model_name=NAME)
    loaded = res2det.create_model(NAME, weights=str(path))
    assert not loaded.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_checkpoint_for_another_model_is_refused_by_name(model, tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(model, path, model_name=NAME)
    with pytest.raises(CheckpointError, match=f"for model '{NAME}', not 'res2net101_26w_4s'"):
        res2det.create_model("res2net101_26w_4s", weights=str(path))


def test_missing_and_unexpected_keys_are_listed(model, tmp_path):
    state = dict(model.state_dict())
    del state["layer2.0.convs.1.weight"]
    state["layer9.extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        res2det.create_model(NAME, weights=str(path))
    msg = str(e.value)
    assert str(path) in msg and "layer2.0.convs.1.weight" in msg and "layer9.extra.weight" in msg


def test_shape_mismatch_is_reported(tmp_path):
    other = res2det.create_model("res2net50_48w_2s")
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches|missing keys"):
        res2det.create_model(NAME, weights=str(path))


def test_official_checkpoint_without_counters_and_with_module_prefix(model, tmp_path):
    state = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "official.pth"
    torch.save(state, path)
    loaded = res2det.create_model(NAME, weights=str(path), weights_format="official")
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        res2det.create_model(NAME, weights=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        res2det.create_model(NAME, weights=str(tmp_path / "nope.pth"))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        res2det.create_model(NAME, weights=str(path))


def test_unknown_model_and_bad_config_values():
    with pytest.raises(Res2DetError, match="did you mean res2net50_26w_4s"):
        res2det.create_model("res2net50_26w4s")
    with pytest.raises(Res2DetError, match="depth"):
        res2det.create_model(NAME, depth=34)
    with pytest.raises(Res2DetError, match="no field 'widht'"):
        res2det.create_model(NAME, widht=26)
    with pytest.raises(Res2DetError, match="no published 'mmdet' weights"):
        res2det.create_model(NAME, weights="mmdet")


def test_overrides_reach_nested_config():
    model = res2det.create_model(NAME, frozen_stages=1, num_classes=10)
    assert model.fc.out_features == 10 and not model.layer1[0].conv1.weight.requires_grad


def test_atomic_save_keeps_the_old_file_on_failure(model, tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    save_weights(model, path, model_name=NAME)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, path, model_name=NAME)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]


def test_download_verifies_hash_in_file_name(model, tmp_path, http_server, monkeypatch):
    served, base = http_server
    raw = tmp_path / "raw.pth"
    torch.save(model.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good = f"res2net50_26w_4s-{digest[:8]}.pth"
    (served / good).write_bytes(raw.read_bytes())
    (served / "res2net50_26w_4s-deadbeef.pth").write_bytes(raw.read_bytes())
    cache = tmp_path / "cache"
    monkeypatch.setenv("RES2DET_CACHE", str(cache))

    path = download(f"{base}/{good}")
    assert path == cache / good and path.read_bytes() == raw.read_bytes()
    with pytest.raises(CheckpointError, match="does not match"):
        download(f"{base}/res2net50_26w_4s-deadbeef.pth")
    assert sorted(p.name for p in cache.iterdir()) == [good]  # nothing half-written left behind
    # file:// URLs work the same way
    assert download(raw.as_uri(), root=tmp_path / "c2").read_bytes() == raw.read_bytes()


def test_create_model_with_published_source_downloads(model, tmp_path, http_server, monkeypatch):
    """weights='official' goes through the spec's URL; point the spec at the local server."""
    import dataclasses

    from res2det.zoo import MODELS

    served, base = http_server
    raw = tmp_path / "raw.pth"
    torch.save(model.state_dict(), raw)
    name = f"res2net50_26w_4s-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    (served / name).write_bytes(raw.read_bytes())
    spec = MODELS[NAME]
    local = dataclasses.replace(spec.weights[0], url=f"{base}/{name}")
    monkeypatch.setitem(MODELS, NAME, dataclasses.replace(spec, weights=(local,)))
    monkeypatch.setenv("RES2DET_CACHE", str(tmp_path / "cache"))
    loaded = res2det.create_model(NAME, weights="official")
    torch.testing.assert_close(loaded.state_dict()["fc.bias"], model.state_dict()["fc.bias"])
