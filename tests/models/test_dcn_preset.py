"""mmdetection's Res2Net-50 Mask R-CNN with DCNv2 in layer2..layer4: key map and parity with the mmdet fixture."""
from __future__ import annotations


import pytest

import res2det
from res2det.zoo.mmdetection import mmdet_to_res2det

from conftest import REFERENCE
from test_det_parity import run_parity

NAME = "mask_rcnn_r2_50_dcnv2_fpn_2x_coco"


def test_dcn_preset_keys_match_mmdet_layout(seeded_weights):
    layout = seeded_weights.load_layout(REFERENCE / "layouts" / f"{NAME}.json")
    model = res2det.create_model(NAME)
    mapped = mmdet_to_res2det({k: None for k in layout})
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert {k for k in mapped if not k.endswith("num_batches_tracked")} == own
    assert any(k.endswith("convs.0.conv_offset.weight") for k in own)
    assert not any(k.startswith("backbone.layer1.") and "conv_offset" in k for k in own)
    assert res2det.zoo.get_spec(NAME).weights == ()


@pytest.mark.slow
def test_dcn_preset_parity(seeded_checkpoint, check_parity):
    assert "masks" in run_parity(NAME, seeded_checkpoint(NAME), check_parity)
