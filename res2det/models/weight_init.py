"""The initialisation that mmdetection's training recipes (and the official Res2Net ImageNet training) start
from, one rule per function; each module's constructor applies its own. The draws cannot equal mmdetection's
(another RNG sequence), the distributions do."""
from __future__ import annotations

from typing import Iterable

from torch import nn


def _zero_bias(m: nn.Module) -> None:
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


def kaiming_(modules: Iterable[nn.Module]) -> None:
    """He normal for ReLU, fan-out (mmcv's ``kaiming_init`` defaults: every ``ConvModule``, the backbones'
    convs, the mask heads' deconv and logits), zero bias."""
    for m in modules:
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        _zero_bias(m)


def xavier_(modules: Iterable[nn.Module]) -> None:
    """Glorot uniform, zero bias (the FPN's convs, the box heads' shared fcs)."""
    for m in modules:
        nn.init.xavier_uniform_(m.weight)
        _zero_bias(m)


def pytorch_default_(model: nn.Module) -> None:
    """Every conv / linear layer back to PyTorch's default initialisation (DCN offsets zero): for an untrained
    model run in eval mode (benchmarks, tests), whose activations Kaiming fan-out, meant for training with batch
    statistics, grows block by block until they overflow."""
    from ..ops import ModulatedDeformConv2d

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.reset_parameters()
    for m in model.modules():  # after their conv_offset children were reset above
        if isinstance(m, ModulatedDeformConv2d):
            m.reset_parameters()


def normal_(modules: Iterable[nn.Module], std: float) -> None:
    """N(0, std), zero bias (the RPN head: 0.01; box classifiers 0.01, box regressors 0.001)."""
    for m in modules:
        nn.init.normal_(m.weight, std=std)
        _zero_bias(m)
