"""Named models and their published weights: ``create_model`` and ``list_models``."""
from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, Mapping, Sequence

from torch import nn

from ..checkpoint import download, load_state_dict_strict, read_weights
from ..errors import CheckpointError, Res2DetError
from ..overrides import apply_overrides
from . import imagenet  # noqa: F401  (registers the ImageNet models)
from . import mmdetection  # noqa: F401
from . import paddledetection  # noqa: F401
from . import paddledetection_static  # noqa: F401
from . import mmdetection_cascade  # noqa: F401
from .registry import MODELS, ModelSpec, Preprocess, PublishedWeights, register
from .transfer import ClassTransfer, parse_class_map, transfer_classes


def list_models(task: str | None = None) -> list[str]:
    """Names accepted by ``create_model``, optionally only those of one task."""
    return sorted(n for n, s in MODELS.items() if task is None or s.task == task)


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `res2det zoo` or res2det.list_models()"
        raise Res2DetError(f"unknown model {name!r}{hint}")
    return MODELS[name]


SOURCES = ("official", "timm", "torchvision", "mmdet", "paddle", "paddle-static")


def _resolve_weights(spec: ModelSpec, weights: str) -> tuple[str, str | None]:
    """A published source name ('official', 'mmdet', ...) is downloaded and verified; anything else is a path."""
    for pw in spec.weights:
        if weights == pw.source:
            return str(download(pw.url)), pw.source
    if weights in SOURCES:
        published = [pw.source for pw in spec.weights] or ["none"]
        raise Res2DetError(f"{spec.name}: no published {weights!r} weights (published: {', '.join(published)})")
    return weights, None


def _res2det_state(model: nn.Module, spec: ModelSpec, path: str, loaded: tuple[dict, dict],
                   weights_format: str | None) -> tuple[dict, str]:
    """A checkpoint's state dict in res2det's key names, and the format it was read as."""
    state, meta = loaded
    if meta.get("format") == "res2det":
        if meta.get("model") not in (None, spec.name):
            raise CheckpointError(f"{path}: this checkpoint is for model {meta['model']!r}, not {spec.name!r}")
        return state, "res2det"
    fmt = weights_format or spec.detect_format(state)
    if fmt is None:
        own = model.state_dict()
        if 2 * len(set(state) & set(own)) >= len(own):
            fmt = "res2det"  # a plain state dict in res2det's own names (torch.save(model.state_dict()))
    if fmt is None:
        known = ", ".join(["res2det's own names", *sorted(spec.key_maps)])
        raise CheckpointError(f"{path}: not a {spec.name} checkpoint in a layout res2det reads ({known}); "
                              f"its first keys: {list(state)[:3]}")
    if fmt != "res2det":
        if fmt not in spec.key_maps:
            raise CheckpointError(f"{path}: format {fmt!r} is not available for {spec.name}; use one of "
                                  f"{sorted(spec.key_maps)}")
        state = spec.key_maps[fmt](state)
    return state, fmt


def load_weights(model: nn.Module, spec: ModelSpec, path: str, *, weights_format: str | None = None,
                 loaded: tuple[dict, dict] | None = None) -> str:
    """Strictly load a checkpoint file into ``model`` (built from ``spec``); returns the format used.
    ``loaded`` is the file's ``read_weights`` result when the caller has read it already."""
    state, fmt = _res2det_state(model, spec, path, loaded or read_weights(path), weights_format)
    load_state_dict_strict(model, state, source=f"{path} ({fmt} format, model {spec.name})")
    return fmt


def checkpoint_classes(spec: ModelSpec, meta: dict, path: str) -> tuple[str, ...] | None:
    """The classes a checkpoint was trained on: recorded in a res2det file, else the row's (COCO's for the
    published detectors); None when neither names them."""
    names = _recorded_options(meta, path).get("class_names") or getattr(spec.config, "class_names", ())
    return tuple(names) or None


def load_weights_for_classes(model: nn.Module, spec: ModelSpec, weights: str, *,
                             class_map: Mapping[str, str] | Sequence[str] | None = None,
                             weights_format: str | None = None,
                             loaded: tuple[dict, dict] | None = None) -> ClassTransfer:
    """Load a checkpoint (a file, or a published source such as 'mmdet') trained on other classes into
    ``model`` (built for its own ``class_names``): class transfer by name (``res2det.zoo.transfer``), every
    class-independent layer strictly. Returns what was transferred, new and rebuilt."""
    path, source = (weights, None) if loaded is not None else _resolve_weights(spec, weights)
    loaded = loaded or read_weights(path)
    state, fmt = _res2det_state(model, spec, path, loaded, weights_format or source)
    state, report = transfer_classes(model, state, checkpoint_classes=checkpoint_classes(spec, loaded[1], path),
                                     class_map=parse_class_map(class_map), source=f"{path} ({fmt} format)")
    load_state_dict_strict(model, state, source=f"{path} ({fmt} format, model {spec.name})")
    return report


def _recorded_options(meta: dict, path: str) -> dict[str, Any]:
    """The ``create_model`` overrides a res2det checkpoint was saved with (JSON lists back to tuples)."""
    if meta.get("format") != "res2det":
        return {}
    try:
        options = json.loads(meta.get("options") or "{}")
    except (TypeError, ValueError):
        options = None
    if not isinstance(options, dict):
        raise CheckpointError(f"{path}: its recorded model options are not a JSON object: "
                              f"{meta.get('options')!r:.80}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def recorded_options(path: str) -> dict[str, Any]:
    """The ``create_model`` overrides (``num_classes``, ``class_names``) a res2det checkpoint file records; ``{}``
    for other checkpoints."""
    return _recorded_options(read_weights(path)[1], path)


def create_model(name: str, weights: str | None = None, *, weights_format: str | None = None, config: Any = None,
                 class_map: Mapping[str, str] | Sequence[str] | None = None, **overrides) -> nn.Module:
    """Build a named model; with ``weights`` (a file, or a published source such as 'official') load them
    strictly and return the model in eval mode. ``overrides`` replace config fields (e.g. ``frozen_stages=1``);
    a res2det checkpoint also brings the overrides it was saved with (``num_classes``, ``class_names``, ...),
    which explicit ``overrides`` replace. ``config`` replaces the row's whole config before the overrides
    (e.g. ``res2det.engine.step.exhaustive_sampling(get_spec(name).config)``); it must be of the same type.

    Fine-tuning: ``class_names`` other than those the checkpoint names (recorded in a res2det file, or the row's;
    ``num_classes`` follows them) loads the weights
    with class transfer by name (``load_weights_for_classes``; ``class_map={'sofa': 'couch'}`` pairs classes by
    hand); the model's ``class_transfer`` then says what was transferred, new and rebuilt."""
    spec = get_spec(name)
    if config is not None:
        if type(config) is not type(spec.config):
            raise Res2DetError(f"{name}: config must be a {type(spec.config).__name__}, got {type(config).__name__}")
        spec = dataclasses.replace(spec, config=config)
    loaded, transfer = None, False
    if weights is not None:
        path, source = _resolve_weights(spec, weights)
        loaded = read_weights(path)
        trained = checkpoint_classes(spec, loaded[1], path)
        if "class_names" in overrides and trained is not None:  # fine-tuning on other classes: transfer by name
            overrides.setdefault("num_classes", len(overrides["class_names"]))
            transfer = bool(class_map) or tuple(overrides["class_names"]) != trained
        overrides = {**_recorded_options(loaded[1], path), **overrides}
    elif class_map:
        raise Res2DetError("class_map pairs the data's classes with a checkpoint's: give weights too")
    config = apply_overrides(spec.config, overrides, what=f"{name} option" if weights is None else
                             f"{name} option (with the options recorded in {path})")
    try:
        model = spec.build(config)
    except (ValueError, RuntimeError) as e:  # RuntimeError: torch refusing a layer size (a negative num_classes)
        recorded = "" if loaded is None else f" (with the options recorded in {path})"
        raise Res2DetError(f"{name}: bad config value{recorded}: {e}") from None
    model.model_name = name
    model.config = config
    if not hasattr(model, "preprocess"):  # classifiers; a detector's is part of its config
        model.preprocess = spec.preprocess
    if transfer:
        model.class_transfer = load_weights_for_classes(model, spec, path, class_map=class_map,
                                                        weights_format=weights_format or source, loaded=loaded)
        model.eval()
    elif loaded is not None:
        load_weights(model, spec, path, weights_format=weights_format or source, loaded=loaded)
        model.eval()
    return model


def load_backbone_weights(model: nn.Module, weights: str, *, classifier: str) -> None:
    """Initialise a detector's backbone from ImageNet weights of the named classifier (a file, or a published
    source such as 'official'), as the detection recipes do: official/timm/torchvision keys, or mmdetection's
    backbone-only files (``stem.*``). Strict: only the classifier's ``fc`` and, for DCN backbones, the
    zero-initialised ``conv_offset`` layers (absent from ImageNet weights) may go unmatched."""
    spec = get_spec(classifier)
    path, source = _resolve_weights(spec, weights)
    state, _ = read_weights(path)
    if "stem.0.weight" in state:  # mmdetection's own ImageNet conversion
        from .mmdetection import mmdet_to_res2det

        state = {k[len("backbone."):]: v for k, v in mmdet_to_res2det({f"backbone.{k}": v for k, v in state.items()}).items()}
    else:
        fmt = source or spec.detect_format(state)
        if fmt not in spec.key_maps:
            raise CheckpointError(f"{path}: not {classifier} ImageNet weights (keys start {list(state)[:3]})")
        state = spec.key_maps[fmt](state)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    backbone = model.backbone
    for name, tensor in backbone.state_dict().items():
        if ".conv_offset." in name:
            state.setdefault(name, tensor)  # DCN offsets start at zero (mmcv's init), not in ImageNet weights
    load_state_dict_strict(backbone, state, source=f"{path} ({classifier} ImageNet weights -> backbone)")


__all__ = ["create_model", "recorded_options", "list_models", "get_spec", "load_weights", "load_weights_for_classes",
           "checkpoint_classes", "ClassTransfer", "load_backbone_weights",
           "MODELS", "ModelSpec", "Preprocess", "PublishedWeights", "register", "apply_overrides"]
