"""``res2det.fluid``: PaddlePaddle static-graph (Fluid) variable files, read without Paddle. The fixtures in
tests/fixtures/fluid/vars were written by Paddle 3.3.1 (``make_fluid_fixtures.py``)."""
from __future__ import annotations

import io
import re
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from res2det.errors import CheckpointError
from res2det.fluid import parse_variable, read_fluid, write_variable

from fluid_names import static_names

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fluid"
VARS = FIXTURES / "vars"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def expected_value(name: str) -> torch.Tensor:
    spec = EXPECTED[name]
    if name == "lod_tensor":
        return torch.arange(6, dtype=torch.float32).reshape(3, 2)
    value = np.arange(int(np.prod(spec["shape"])), dtype=np.float64).reshape(spec["shape"]).astype(spec["dtype"])
    if spec["dtype"].startswith("float"):
        value = value * 0.5 - 1
    return torch.from_numpy(value)


def test_reads_paddles_files_with_their_dtypes_shapes_and_values():
    state = read_fluid(VARS)
    assert set(state) == set(EXPECTED)  # the optimiser's fc6_w_velocity_0 is left out
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, expected_value(name), rtol=0, atol=0)
    single = read_fluid(VARS / "fc6_w")
    assert list(single) == ["fc6_w"] and single["fc6_w"].shape == (4, 3)


def test_writer_is_byte_identical_to_paddle(tmp_path):
    for name in EXPECTED:
        if name == "lod_tensor":  # written with a LoD level; the writer writes none
            continue
        write_variable(expected_value(name), tmp_path / name)
        assert (tmp_path / name).read_bytes() == (VARS / name).read_bytes(), name


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_at_any_depth_read_member_by_member(tmp_path, mode):
    archive = tmp_path / "model.tar"
    with tarfile.open(archive, mode) as tar:
        tar.add(VARS, arcname="faster_rcnn_x/params")  # nested two folders deep
    state = read_fluid(archive)
    assert set(state) == set(EXPECTED)
    torch.testing.assert_close(state["fc6_w"], expected_value("fc6_w"))


def test_bad_files_are_named(tmp_path):
    data = (VARS / "fc6_w").read_bytes()
    cases = {
        "truncated_data": (data[:-5], "truncated Fluid variable file"),
        "truncated_header": (data[:10], "truncated Fluid variable file"),
        "trailing": (data + b"\0\0", "2 unexpected bytes"),
        "bad_version": (b"\x07" + data[1:], r"not a Fluid variable file \(version 7"),
        "bad_desc": (data[:24] + b"\xff" * 6 + data[30:], "malformed tensor description"),
        "text": (b"hello, this is not a tensor at all", "not a Fluid variable file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as err:
            read_fluid(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    archive = tmp_path / "cut.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(VARS, arcname="m")
    archive.write_bytes(buf.getvalue()[:1500])  # cut inside the archive
    with pytest.raises(CheckpointError, match="cut.tar"):
        read_fluid(archive)
    twice = tmp_path / "twice"
    shutil.copytree(VARS, twice / "a")
    shutil.copytree(VARS, twice / "b")
    with pytest.raises(CheckpointError, match="variable 'bn_conv1_mean' also in"):
        read_fluid(twice)
    with pytest.raises(CheckpointError, match="no Fluid variable files"):
        (tmp_path / "empty").mkdir()
        read_fluid(tmp_path / "empty")


def test_parse_rejects_huge_lod_and_unknown_dtype():
    header = (VARS / "fc6_w").read_bytes()
    with pytest.raises(CheckpointError, match="LoD levels"):
        parse_variable(header[:4] + (1000).to_bytes(8, "little") + header[12:], "x")
    desc_at = 4 + 8 + 4 + 4
    bad = bytearray(header)
    bad[desc_at + 1] = 99  # data_type 99
    with pytest.raises(CheckpointError, match="unsupported Fluid data type 99"):
        parse_variable(bytes(bad), "x")


# ------------------------------------------------------------------------------- static-graph key map
STATIC_ROWS = [("vb", False, False, 455), ("vb", True, False, 467), ("vd", True, False, 477), ("vd", True, True, 555)]


@pytest.mark.parametrize("variant, mask, dcn, count", STATIC_ROWS)
def test_static_variable_sets_load_strictly(variant, mask, dcn, count):
    """Each release's exact variable set maps onto the row's architecture key for key and shape for shape;
    fc weights are transposed and the background class (0) leaves the predictors."""
    from res2det.checkpoint import load_state_dict_strict
    from res2det.models.backbones import BackboneConfig
    from res2det.models.detectors import DetectorConfig, RoIHeadConfig, build_detector
    from res2det.zoo.mmdetection import COCO_CLASSES
    from res2det.zoo.paddledetection_static import fluid_to_res2det

    names = static_names(variant, mask, dcn)
    assert len(names) == len(set(names)) == count
    backbone = BackboneConfig(depth=50, stem="deep" if variant == "vd" else "original", stage_block="paddle",
                              shortcut="avg" if variant == "vd" else "conv", dcn_stages=(False, dcn, dcn, dcn))
    model = build_detector(DetectorConfig(backbone=backbone, roi_head=RoIHeadConfig(with_mask=mask),
                                          class_names=COCO_CLASSES))
    own = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    avg = variant == "vd"
    # static shapes from res2det's: fc weights [in, out], predictors with background (class 0) in front
    from res2det.zoo.paddledetection_static import _rename

    state, gen = {}, torch.Generator().manual_seed(0)
    for name in names:
        key = _rename(name, avg)
        assert key in own, (name, key)
        shape = list(own[key])
        if key.endswith(("conv_logits.weight", "conv_logits.bias")):  # fc_cls has its background already
            shape[0] += 1
        if key.endswith(("fc_reg.weight", "fc_reg.bias")):
            shape[0] += 4
        if re.search(r"(shared_fcs\.\d|fc_cls|fc_reg)\.weight$", key):
            shape = shape[::-1]
        state[name] = torch.randn(shape, generator=gen)
    mapped = fluid_to_res2det(state, avg_shortcut=avg)
    assert set(mapped) == set(own)
    load_state_dict_strict(model, mapped, source="static")
    head = model.roi_head.bbox_head
    torch.testing.assert_close(head.fc_cls.weight[-1], state["cls_score_w"][:, 0])  # background last
    torch.testing.assert_close(head.fc_cls.weight[0], state["cls_score_w"][:, 1])
    torch.testing.assert_close(head.fc_reg.bias, state["bbox_pred_b"][4:])
    torch.testing.assert_close(head.shared_fcs[0].weight, state["fc6_w"].t())
    if mask:
        torch.testing.assert_close(model.roi_head.mask_head.conv_logits.bias, state["mask_fcn_logits_b"][1:])
    shortcut = model.backbone.layer2[0].downsample
    torch.testing.assert_close(shortcut[1 if avg else 0].weight, state["res3a_branch1_weights"])
    with pytest.raises(CheckpointError, match="1 variable.*: fc8_w"):
        fluid_to_res2det({**state, "fc8_w": torch.zeros(1)}, avg_shortcut=avg)
