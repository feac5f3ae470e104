"""The one inference path of the detectors: images -> model input -> detections in original pixels.

``predict`` decodes each image (``images.to_rgb_uint8``), resizes and normalises it as the weights expect
(``images.detection_input``: mmcv's keep-ratio rule, optionally also fitting a fixed input size), pads a batch
(``images.pad_batch``), runs a detector on it and maps each result back with ``postprocess``. The detector is a
function, so the same code serves ``TwoStageDetector.predict`` (its ``detect``), the ONNX Runtime runner (a
session) and, through ``postprocess``, the COCO evaluation of dataset batches.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import Res2DetError
from .images import ImageLike, detection_input, image_list, pad_batch, to_rgb_uint8
from .models.heads.box_coder import clip_boxes
from .models.heads.mask_head import paste_mask_crops
from .structures import Detections, InstanceMasks, Preprocess

# (padded batch [N, 3, H, W], unpadded sizes (h, w)) -> per image dict(boxes, scores, labels[, mask_probs]) in
# input pixels: ``TwoStageDetector.detect(..., paste_masks=False)`` or an exported graph.
DetectFn = Callable[[Tensor, list[tuple[int, int]]], Sequence[Mapping[str, Tensor]]]


def postprocess(result: Mapping[str, Tensor], *, scale_factor: Sequence[float], orig_size: Sequence[int],
                mask_thr: float = 0.5, paste_clipped_boxes: bool = False, score_thr: float | None = None
                ) -> tuple[Tensor, Tensor, Tensor, InstanceMasks | None]:
    """One image's detections in input pixels -> ``(boxes, scores, labels, masks)`` on the CPU in the original
    image's pixels, by decreasing score; ``masks`` an ``InstanceMasks`` when ``result`` has ``mask_probs``.

    ``scale_factor`` is ``(sx, sy)``, input pixels per original pixel; ``orig_size`` is ``(H, W)``. Boxes are
    divided by the scale factors and clipped to the image; masks are pasted (bilinear, ``>= mask_thr``) at the
    original size from the unclipped boxes (mmdetection) or, with ``paste_clipped_boxes`` (PaddleDetection),
    from the clipped ones. ``score_thr`` keeps only detections scoring at least that much.
    """
    if "masks" in result and "mask_probs" not in result:
        raise ValueError("postprocess needs the mask probabilities: call detect(..., paste_masks=False)")
    sx, sy = (float(s) for s in scale_factor)
    size = (int(orig_size[0]), int(orig_size[1]))
    boxes = result["boxes"].float() / result["boxes"].new_tensor([sx, sy, sx, sy], dtype=torch.float32)
    scores, labels, probs = result["scores"].float(), result["labels"].long(), result.get("mask_probs")
    # Detections are by decreasing score (Paddle's NMS groups them by class; mmdet's are sorted already)
    order = torch.argsort(scores, descending=True, stable=True)
    if score_thr is not None:
        order = order[scores[order] >= score_thr]
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    if paste_clipped_boxes:
        boxes = clip_boxes(boxes, size)
    masks = None
    if probs is not None:
        masks = paste_mask_crops(probs[order], boxes, size, mask_thr).cpu()
    return clip_boxes(boxes, size).cpu(), scores.cpu(), labels.cpu(), masks


def predict(detect: DetectFn, images: ImageLike | Sequence[ImageLike], *, preprocess: Preprocess,
            class_names: Sequence[str], mask_thr: float = 0.5, paste_clipped_boxes: bool = False,
            score_thr: float | None = None, batch_size: int = 1, input_size: tuple[int, int] | None = None
            ) -> list[Detections]:
    """One ``Detections`` per image (paths, PIL images, arrays, tensors; one or a list), in original pixels.

    Images go through ``detection_input`` with ``preprocess`` and are padded to a multiple of 32 per batch of
    ``batch_size``, or to exactly ``input_size = (H, W)`` (an exported graph's fixed input; an image whose
    resized size does not fit is scaled down to fit). ``mask_thr``, ``paste_clipped_boxes`` and
    ``score_thr`` are ``postprocess``'s.
    """
    if batch_size < 1:
        raise Res2DetError(f"batch_size must be at least 1, got {batch_size}")
    items = image_list(images)
    out: list[Detections] = []
    for start in range(0, len(items), batch_size):
        rgbs = [to_rgb_uint8(x) for x in items[start:start + batch_size]]
        inputs = [detection_input(rgb, preprocess, fit=input_size) for rgb in rgbs]
        batch = pad_batch([x for x, _ in inputs], size=input_size)
        results = detect(batch, [tuple(x.shape[-2:]) for x, _ in inputs])
        for rgb, (_, scale), result in zip(rgbs, inputs, results):
            boxes, scores, labels, masks = postprocess(result, scale_factor=scale, orig_size=rgb.shape[:2],
                                                       mask_thr=mask_thr, paste_clipped_boxes=paste_clipped_boxes,
                                                       score_thr=score_thr)
            out.append(Detections(boxes=boxes, scores=scores, labels=labels,
                                  categories=[class_names[i] if i < len(class_names) else str(i)
                                              for i in labels.tolist()],
                                  masks=masks, width=int(rgb.shape[1]), height=int(rgb.shape[0])))
    return out


__all__ = ["predict", "postprocess", "DetectFn"]
