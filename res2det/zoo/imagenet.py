"""ImageNet classifiers: every published Res2Net width/scale, Res2NeXt, v1b, and ResNet baselines."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..models.backbones import BackboneConfig, build_backbone
from .registry import ModelSpec, PublishedWeights, StateDict, register

OFFICIAL_URL = "https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net/"
TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class ClassifierConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 1000


def build_classifier(cfg: ClassifierConfig):
    if cfg.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 for a classifier, got {cfg.num_classes}")
    return build_backbone(cfg.backbone, num_classes=cfg.num_classes)


def _identity(state: StateDict) -> StateDict:
    # The official code, timm and torchvision share res2det's attribute names for these models.
    return dict(state)


def _detect(state: StateDict) -> str | None:
    if "layer1.0.conv1.weight" in state and ("conv1.weight" in state or "conv1.0.weight" in state):
        return "official"
    return None


CLASSIFIER_KEY_MAPS = {"official": _identity, "timm": _identity, "torchvision": _identity}

V1B = dict(stem="deep", shortcut="avg")
# name: (backbone options, published file, published ImageNet top-1 = 100 - the top-1 error in the official
# Res2Net-PretrainedModels README)
_ROWS = {
    "res2net50_26w_4s": (dict(), "res2net50_26w_4s-06e79181.pth", 77.99),
    "res2net50_48w_2s": (dict(base_width=48, scale=2), "res2net50_48w_2s-afed724a.pth", 77.32),
    "res2net50_14w_8s": (dict(base_width=14, scale=8), "res2net50_14w_8s-6527dddc.pth", 78.14),
    "res2net50_26w_6s": (dict(scale=6), "res2net50_26w_6s-19041792.pth", 78.58),
    "res2net50_26w_8s": (dict(scale=8), "res2net50_26w_8s-2c7c9f12.pth", 79.20),
    "res2net101_26w_4s": (dict(depth=101), "res2net101_26w_4s-02a759a1.pth", 79.19),
    "res2next50": (dict(base_width=4, scale=4, cardinality=8), "res2next50_4s-6ef7e7bf.pth", 78.24),
    "res2net50_v1b_26w_4s": (V1B, "res2net50_v1b_26w_4s-3cf99910.pth", 80.27),
    "res2net101_v1b_26w_4s": (dict(depth=101, **V1B), "res2net101_v1b_26w_4s-0812c246.pth", 81.23),
    "res2net152_v1b_26w_4s": (dict(depth=152, **V1B), None, None),  # no weights were released
}

for _name, (_opts, _file, _top1) in _ROWS.items():
    _weights = ()
    if _file:
        _metrics = {"top1": _top1} if _top1 is not None else {}
        _weights = (PublishedWeights("official", OFFICIAL_URL + _file, _metrics),)
    register(
        ModelSpec(
            name=_name,
            task="classification",
            config=ClassifierConfig(BackboneConfig(**_opts)),
            build=build_classifier,
            key_maps=CLASSIFIER_KEY_MAPS,
            detect_format=_detect,
            weights=_weights,
            description="Res2Net ImageNet classifier (official/timm first-block behaviour)",
            origin="Res2Net official",
        )
    )

# torchvision's IMAGENET1K_V1 weights and their published acc@1
for _name, _depth, _file, _top1 in (("resnet50", 50, "resnet50-19c8e357.pth", 76.13),
                                    ("resnet101", 101, "resnet101-5d3b4d8f.pth", 77.374)):
    register(
        ModelSpec(
            name=_name,
            task="classification",
            config=ClassifierConfig(BackboneConfig(block="resnet", depth=_depth, base_width=64)),
            build=build_classifier,
            key_maps=CLASSIFIER_KEY_MAPS,
            detect_format=_detect,
            weights=(PublishedWeights("torchvision", TORCHVISION_URL + _file, {"top1": _top1}),),
            description="plain ResNet baseline (torchvision layout)",
            origin="torchvision",
        )
    )
