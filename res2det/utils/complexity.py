"""Parameter and MAC counts.

One documented method, the convention of the seed model-zoo tables: multiply-adds of convolution and linear
layers only (BN, activations, pooling and additions are not counted), measured by running the model once on
the given input. A deformable conv counts as the conv it replaces (its offset conv is a Conv2d and counts
too). GFLOPs in tables are these MACs in units of 1e9.
"""
from __future__ import annotations

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.Module, inputs, output) -> int:
    weight = module.weight  # [out, in/groups, kh, kw]; transposed: [in, out/groups, kh, kw]
    if isinstance(module, nn.ConvTranspose2d):
        return inputs[0].numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
    return output.numel() * weight[0].numel()


@torch.no_grad()
def count_macs(model: nn.Module, *inputs) -> int:
    """Multiply-adds of conv and linear layers for one forward pass on ``inputs``."""
    from ..ops import ModulatedDeformConv2d

    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            total += _conv_macs(module, args, output)

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, ModulatedDeformConv2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    try:
        model.eval()
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
