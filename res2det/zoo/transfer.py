"""Fine-tuning from a checkpoint trained on other classes: class transfer by name.

Only the layers whose shape follows the classes are rebuilt: every box head's ``fc_cls`` (the classes and the
background, last), its ``fc_reg`` where regression is class-specific (4 rows per class), and every mask head's
``conv_logits`` (one channel per class), in every cascade stage and HTC mask branch. A class of the data whose
name matches one of the checkpoint's (``normalise_class_name``: case, spaces, '_' and '-' ignored), or that
``class_map`` pairs with one by hand, gets that class's rows; the background row is copied; the other rows keep
the head's own initialisation. Class-agnostic regression and every other layer load strictly, as always.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, Res2DetError
from ..models.heads import FCNMaskHead, Shared2FCBBoxHead

StateDict = dict[str, torch.Tensor]
# a checkpoint's layers that a model may lack: HTC's semantic branch when the data has no semantic maps
OPTIONAL_BRANCHES = ("roi_head.semantic_head.",)


def normalise_class_name(name: str) -> str:
    """``Dining Table`` = ``dining_table`` = ``diningtable``: lower case, spaces, '_' and '-' removed."""
    return "".join(ch for ch in str(name).lower() if not ch.isspace() and ch not in "_-")


def parse_class_map(pairs: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``['sofa=couch', ...]`` (or a mapping) -> ``{'sofa': 'couch'}``."""
    if not pairs:
        return {}
    if isinstance(pairs, Mapping):
        return {str(k): str(v) for k, v in pairs.items()}
    out = {}
    for pair in pairs:
        new, sep, old = str(pair).partition("=")
        if not sep or not new.strip() or not old.strip():
            raise Res2DetError(f"--class-map expects NEW=OLD (a class of the data = a class of the checkpoint), "
                               f"got {pair!r}")
        out[new.strip()] = old.strip()
    return out


@dataclass
class ClassTransfer:
    """What ``transfer_classes`` did (printed before training, saved as ``class_transfer.json``)."""

    source: str
    checkpoint_classes: list[str] | None  # None: the checkpoint does not name its classes
    transferred: list[tuple[str, str]] = field(default_factory=list)  # (class of the data, checkpoint class)
    new: list[str] = field(default_factory=list)
    rebuilt: list[str] = field(default_factory=list)  # layers, without .weight / .bias
    dropped: list[str] = field(default_factory=list)  # checkpoint branches the model does not have

    def lines(self) -> list[str]:
        n = len(self.transferred) + len(self.new)
        same = lambda a, b: normalise_class_name(a) == normalise_class_name(b)  # noqa: E731
        shown = [a if same(a, b) else f"{a} <- {b}" for a, b in self.transferred]
        out = [f"init weights: {self.source}"]
        if self.checkpoint_classes is None:
            out.append("  the checkpoint does not name its classes: no class transferred")
        out.append(f"  classes transferred ({len(self.transferred)}/{n}): {', '.join(shown) or 'none'}")
        out.append(f"  new classes ({len(self.new)}/{n}): {', '.join(self.new) or 'none'}")
        if self.rebuilt:
            out.append(f"  rebuilt for the data's classes: {', '.join(self.rebuilt)} (transferred classes' rows and "
                       "the background row copied, the rest the head's own initialisation)")
        if self.dropped:
            out.append(f"  not loaded: {', '.join(self.dropped)} (the model has no such branch)")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def class_layers(model: nn.Module) -> dict[str, str]:
    """The class-dependent layers of ``model``: name -> 'cls' (classes + background), 'reg' (4 per class) or
    'mask' (1 per class)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Shared2FCBBoxHead):
            out[f"{name}.fc_cls"] = "cls"
            if not module.reg_class_agnostic:
                out[f"{name}.fc_reg"] = "reg"
        elif isinstance(module, FCNMaskHead):
            out[f"{name}.conv_logits"] = "mask"
    return out


def match_classes(new: Sequence[str], old: Sequence[str], class_map: Mapping[str, str]) -> list[int | None]:
    """For each class of ``new``, the index of its class in ``old`` (by ``class_map``, else by name), or None."""
    old_index: dict[str, int] = {}
    for j, name in enumerate(old):
        old_index.setdefault(normalise_class_name(name), j)
    new_norm = {normalise_class_name(n) for n in new}
    by_hand = {}
    for a, b in class_map.items():
        if normalise_class_name(a) not in new_norm:
            raise Res2DetError(f"--class-map {a}={b}: {a!r} is not a class of the data (its classes: "
                               f"{', '.join(new)})")
        if normalise_class_name(b) not in old_index:
            raise Res2DetError(f"--class-map {a}={b}: {b!r} is not a class of the checkpoint (its classes: "
                               f"{', '.join(old[:20])}{', ...' if len(old) > 20 else ''})")
        by_hand[normalise_class_name(a)] = old_index[normalise_class_name(b)]
    return [by_hand.get(normalise_class_name(n), old_index.get(normalise_class_name(n))) for n in new]


def transfer_classes(model: nn.Module, state: StateDict, *, checkpoint_classes: Sequence[str] | None,
                     class_map: Mapping[str, str] | None = None, source: str) -> tuple[StateDict, ClassTransfer]:
    """``state`` (res2det keys) with its class-dependent tensors rebuilt for ``model.class_names``, and the
    report. The result is for ``load_state_dict_strict``: every other key must still fit exactly."""
    new_classes = list(model.class_names)
    own = model.state_dict()
    state = dict(state)
    report = ClassTransfer(source, None if checkpoint_classes is None else list(checkpoint_classes))
    for branch in OPTIONAL_BRANCHES:
        if not any(k.startswith(branch) for k in own) and any(k.startswith(branch) for k in state):
            state = {k: v for k, v in state.items() if not k.startswith(branch)}
            report.dropped.append(branch.rstrip("."))
    layers = class_layers(model)
    cls_key = next((f"{n}.weight" for n, kind in layers.items() if kind == "cls"), None)
    old_count = state[cls_key].shape[0] - 1 if cls_key in state else None
    old = list(checkpoint_classes) if checkpoint_classes else None
    if old is not None and old_count is not None and len(old) != old_count:
        raise CheckpointError(f"{source}: names {len(old)} classes but its {cls_key} has {old_count} class rows")
    if old is None and class_map:
        raise CheckpointError(f"{source}: the checkpoint does not name its classes, so --class-map cannot pair them")
    if old is None and old_count == len(new_classes):  # unnamed, same number: taken as the same classes
        matches: list[int | None] = list(range(len(new_classes)))
    elif old is None:
        matches = [None] * len(new_classes)
    else:
        matches = match_classes(new_classes, old, class_map or {})
    report.transferred = [(n, old[j] if old else n) for n, j in zip(new_classes, matches) if j is not None]
    report.new = [n for n, j in zip(new_classes, matches) if j is None]
    pairs = [(i, j) for i, j in enumerate(matches) if j is not None]
    if old_count is None:
        return state, report  # no box head in the checkpoint: the strict load names what is missing
    for layer, kind in layers.items():
        per = 4 if kind == "reg" else 1
        for key in (f"{layer}.weight", f"{layer}.bias"):
            if key not in state or key not in own or state[key].shape[1:] != own[key].shape[1:]:
                continue  # the strict load reports it
            rows = state[key].shape[0]
            expected = per * old_count + (kind == "cls")
            if rows != expected:
                raise CheckpointError(f"{source}: {key} has {rows} rows, {expected} expected for its {old_count} "
                                      "classes")
            if state[key].shape == own[key].shape and matches == list(range(len(new_classes))) \
                    and old_count == len(new_classes):
                continue  # the same classes in the same order: loaded as they are
            out = own[key].detach().clone()
            for i, j in pairs:
                out[per * i:per * (i + 1)] = state[key][per * j:per * (j + 1)]
            if kind == "cls":
                out[-1] = state[key][-1]  # background
            state[key] = out
            if layer not in report.rebuilt:
                report.rebuilt.append(layer)
    return state, report


__all__ = ["ClassTransfer", "class_layers", "match_classes", "normalise_class_name", "parse_class_map",
           "transfer_classes"]
