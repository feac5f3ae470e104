"""The variable names of PaddleDetection's static-graph Res2Net-50 R-CNN releases (PADDLE_STATIC.md's rules), and
a res2det state dict written back under them: what the Fluid-format tests and fixtures build checkpoints from."""
from __future__ import annotations

import re

import torch


def static_names(variant: str, mask: bool, dcn: bool) -> list[str]:
    def conv(name: str) -> list[str]:
        bn = "bn_conv1" if name == "conv1" else "bn" + name[3:]
        return [f"{name}_weights"] + [f"{bn}_{leaf}" for leaf in ("scale", "offset", "mean", "variance")]

    names = [n for c in (["conv1"] if variant == "vb" else ["conv1_1", "conv1_2", "conv1_3"]) for n in conv(c)]
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for j in range(blocks):
            block = f"res{stage}{'abcdef'[j]}"
            for branch in ["branch2a", "branch2b_1", "branch2b_2", "branch2b_3", "branch2c"] + ["branch1"] * (j == 0):
                names += conv(f"{block}_{branch}")
                if dcn and stage >= 3 and branch.startswith("branch2b"):
                    names += [f"{block}_{branch}_conv_offset.w_0", f"{block}_{branch}_conv_offset.b_0"]
    heads = ["fpn_inner_res5_sum", *(f"fpn_inner_res{s}_sum_lateral" for s in (4, 3, 2)),
             *(f"fpn_res{s}_sum" for s in (5, 4, 3, 2)), "conv_rpn_fpn2", "rpn_cls_logits_fpn2",
             "rpn_bbox_pred_fpn2", "fc6", "fc7", "cls_score", "bbox_pred"]
    if mask:
        heads += [f"mask_inter_feat_{i}" for i in range(1, 5)] + ["conv5_mask", "mask_fcn_logits"]
    return names + [f"{h}_{leaf}" for h in heads for leaf in ("w", "b")]


def to_fluid(state: dict[str, torch.Tensor], names: list[str], *, avg_shortcut: bool,
             background: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """res2det tensors under the static names: fc weights [in, out], predictors with a background class 0 in
    front (``background`` rows, default zeros; ``fc_cls`` moves its last row to the front)."""
    from res2det.zoo.paddledetection_static import _rename

    out = {}
    for name in names:
        key = _rename(name, avg_shortcut)
        value = state[key]
        if key.startswith("roi_head.bbox_head.fc_cls"):
            value = torch.cat([value[-1:], value[:-1]])
        elif key.startswith(("roi_head.bbox_head.fc_reg", "roi_head.mask_head.conv_logits")):
            extra = 4 if "fc_reg" in key else 1
            value = torch.cat([torch.zeros(extra, *value.shape[1:]) if background is None else background, value])
        if re.search(r"(shared_fcs\.\d|fc_cls|fc_reg)\.weight$", key):
            value = value.t()
        out[name] = value.contiguous()
    return out


def run_static_row(name: str, photo, folder) -> dict:
    """A static-graph zoo row with the seed-0 reference weights, written as a Fluid ``.tar`` under the release's
    variable names and loaded by name, run on ``photo``: the tensors entering each stage and the results."""
    import tarfile

    import res2det
    from res2det.fluid import write_variable
    from res2det.images import detection_input, pad_batch, to_rgb_uint8
    from res2det.zoo import get_spec

    from conftest import _load_module

    spec = get_spec(name)
    b = spec.config.backbone
    variant, dcn, mask = ("vd" if b.stem == "deep" else "vb"), any(b.dcn_stages), spec.config.roi_head.with_mask
    layout_model = spec.build(spec.config)
    # the FPN convs under mmdetection's ConvModule names, so that the seeded recipe gives them its zero-sum
    # kernels (else one class wins every box)
    conv_module = re.compile(r"^(neck\.(?:fpn|lateral)_convs\.\d+)\.")
    layout = {conv_module.sub(r"\1.conv.", k): list(v.shape) for k, v in layout_model.state_dict().items()}
    seeded = _load_module("seeded_weights").seeded_state_dict(layout, 0)
    state = {re.sub(r"^(neck\.(?:fpn|lateral)_convs\.\d+)\.conv\.", r"\1.", k): v for k, v in seeded.items()}
    variables = to_fluid(state, static_names(variant, mask, dcn), avg_shortcut=variant == "vd")
    (folder / name).mkdir()
    for var, value in variables.items():
        write_variable(value, folder / name / var)
    archive = folder / f"{name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder / name, arcname=name)
    model = res2det.create_model(name, weights=str(archive))
    rgb = to_rgb_uint8(photo)
    x, scale = detection_input(rgb, model.preprocess)
    meta = {"scale_factor": scale, "orig_size": rgb.shape[:2]}
    capture: dict = {}
    with torch.inference_mode():
        (result,) = model.detect(pad_batch([x]), [tuple(x.shape[-2:])], capture=capture, paste_masks=False,
                                 image_metas=[meta])
    boxes, scores, labels, masks = model.postprocess(result, scale_factor=scale, orig_size=rgb.shape[:2])
    out = {"input": x, "scale": torch.tensor(scale[0], dtype=torch.float64), "orig_size": torch.tensor(rgb.shape[:2]),
           "proposals": capture["rpn_proposals.bboxes"], "proposal_scores": capture["rpn_proposals.scores"],
           "rois": capture["roi_head.bbox_roi_extractor.call0.rois"][:, 1:],
           "cls_score": capture["roi_head.bbox_head.call0.cls_score"],
           "bbox_pred": capture["roi_head.bbox_head.call0.bbox_pred"],
           "final_boxes": boxes, "final_scores": scores, "final_labels": labels}
    for lvl in range(5):
        out[f"rpn_cls_{lvl}"] = capture[f"rpn_head.cls_scores.{lvl}"]
        out[f"rpn_reg_{lvl}"] = capture[f"rpn_head.bbox_preds.{lvl}"]
    if masks is not None:
        # each final detection's probabilities, in the order of ``final_boxes`` (postprocess sorts by score)
        order = torch.argsort(result["scores"], descending=True, stable=True)
        out["mask_probs"] = result["mask_probs"][order]
        out["final_masks"] = masks.to_tensor()
    return out
