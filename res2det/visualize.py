"""Drawing detections on their image: translucent masks, boxes and "category score" labels (Pillow + numpy)."""
from __future__ import annotations

import colorsys
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import Res2DetError
from .images import ImageLike, to_rgb_uint8
from .structures import Detections, InstanceMasks

MASK_ALPHA = 0.45


def label_color(label: int) -> tuple[int, int, int]:
    """A fixed, well-spread RGB colour per class index (golden-ratio hue steps)."""
    hue = (int(label) * 0.618033988749895 + 0.1) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font only
        return ImageFont.load_default()


def _field(detections: Any, name: str) -> Any:
    return detections[name] if isinstance(detections, Mapping) else getattr(detections, name)


def draw_detections(image_rgb_uint8: ImageLike, detections: Any, *, score_thr: float = 0.3) -> Image.Image:
    """The image with every detection scoring at least ``score_thr`` drawn on it: a translucent mask (mask
    models), its box and a "category score" label, coloured by class. ``detections`` is a ``Detections`` (or a
    dict with its fields: ``boxes``, ``scores``, ``labels``, optional ``categories`` and ``masks``) in the
    image's own pixels. Higher scores are drawn on top. Returns a new RGB PIL image of the image's size."""
    rgb = to_rgb_uint8(image_rgb_uint8)
    h, w = rgb.shape[:2]
    boxes = np.asarray(_field(detections, "boxes"), dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(_field(detections, "scores"), dtype=np.float64).reshape(-1)
    labels = np.asarray(_field(detections, "labels")).reshape(-1).astype(np.int64)
    try:
        categories = list(_field(detections, "categories") or [])
    except (KeyError, AttributeError):
        categories = []
    if isinstance(detections, Detections):
        masks = detections.instance_masks  # per-box crops: no full-image masks in memory
    else:
        try:
            masks = _field(detections, "masks")
        except (KeyError, AttributeError):
            masks = None
    if not len(boxes) == len(scores) == len(labels):
        raise Res2DetError(f"detections disagree in length: {len(boxes)} boxes, {len(scores)} scores, "
                           f"{len(labels)} labels")
    if masks is not None:
        if not isinstance(masks, InstanceMasks):
            masks = InstanceMasks.from_tensor(torch.as_tensor(np.asarray(masks)))
        if tuple(masks.shape) != (len(boxes), h, w):
            raise Res2DetError(f"masks of shape {tuple(masks.shape)} do not fit {len(boxes)} detections on a "
                               f"{w}x{h} image")
    # lowest score first, so that the best detections end up on top
    order = [i for i in np.argsort(scores, kind="stable") if scores[i] >= score_thr]

    out = rgb.copy()  # blended mask by mask inside its crop: no float copy of a (possibly huge) image
    if masks is not None:
        for i in order:
            crop, (x0, y0) = masks.crops[i].cpu().numpy(), masks.origins[i]
            region = out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]]
            blended = region[crop] * (1 - MASK_ALPHA) + np.asarray(label_color(labels[i]), np.float32) * MASK_ALPHA
            region[crop] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(out)

    draw = ImageDraw.Draw(img)
    line = max(1, round(min(h, w) / 300))
    font = load_font(max(10, min(24, round(min(h, w) / 40))))
    for i in order:
        color = label_color(labels[i])
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=line)
        name = categories[i] if i < len(categories) else str(int(labels[i]))
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        tx = min(max(x1, 0.0), max(w - tw, 0))
        ty = y1 - th if y1 - th >= 0 else max(y1, 0.0)  # above the box, or inside it at the top edge
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=color)
        luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=(0, 0, 0) if luma > 140 else (255, 255, 255), font=font)
    return img


__all__ = ["draw_detections", "label_color"]
