"""One override mechanism: dotted paths (or a field name that occurs once) for create_model and --set."""
from __future__ import annotations

import pytest

import res2det
from res2det.engine.train_config import apply_settings, load_config
from res2det.errors import Res2DetError
from res2det.overrides import apply_overrides
from res2det.zoo import get_spec

HTC = "htc_r2_101_fpn_20e_coco"


def test_dotted_paths_bare_names_and_tuple_indices():
    cfg = get_spec(HTC).config
    out = apply_overrides(cfg, {"backbone.frozen_stages": 0, "num_classes": 3,
                                "roi_head.stages.2.train.sampler.num": 64, "rpn.rpn_train.allowed_border": 5,
                                "score_thr": 0.3})
    assert out.backbone.frozen_stages == 0 and out.roi_head.num_classes == 3
    assert [t.train.sampler.num for t in out.roi_head.stages] == [512, 512, 64]
    assert out.rpn.rpn_train.allowed_border == 5 and out.roi_head.rcnn_test.score_thr == 0.3
    assert cfg.backbone.frozen_stages == 1  # the zoo row's config is untouched (frozen dataclasses)


@pytest.mark.parametrize("overrides, words", [
    ({"assigner": None}, "ambiguous .* rpn.rpn_train.assigner, roi_head.stages.0.train.assigner"),
    ({"frozen_stage": 1}, "no field 'frozen_stage'"),
    ({"backbone.depth": 34}, "not a valid value"),
    ({"roi_head.stages.3.train.sampler.num": 1}, "not an index"),
    ({"backbone.frozen_stages.x": 1}, "has no field 'x'"),
])
def test_bad_overrides_name_the_key(overrides, words):
    with pytest.raises(Res2DetError, match=words):
        apply_overrides(get_spec("mask_rcnn_r2_101_fpn_2x_coco" if "assigner" in overrides else HTC).config,
                        overrides)


def test_create_model_and_set_share_the_paths():
    model = res2det.create_model("mask_rcnn_r2_tiny_fpn", **{"backbone.frozen_stages": 2, "roi_head.num_classes": 5})
    assert model.config.backbone.frozen_stages == 2 and model.roi_head.bbox_head.num_classes == 5
    cfg = apply_settings(load_config("shapes"), ["model.backbone.frozen_stages=2", "model.num_classes=5",
                                                 "recipe.epochs=2", "epochs=3"])
    assert cfg.model_options == {"backbone.frozen_stages": 2, "num_classes": 5} and cfg.recipe.epochs == 3
    with pytest.raises(Res2DetError, match="--set recipe.epoch: no field 'epoch'"):
        apply_settings(cfg, ["recipe.epoch=1"])
