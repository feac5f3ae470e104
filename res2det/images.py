"""Reading images and turning them into model input."""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Res2DetError
from .structures import Preprocess

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image with its EXIF orientation applied; a clear error naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except FileNotFoundError:
        raise Res2DetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise Res2DetError(f"{path}: not a readable image ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit / float grayscale: scale to 0..255 before converting (PIL would clip). 16-bit modes
        # always span 0..65535; 'I'/'F' (how some files decode) only when their values exceed 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        wide = img.mode.startswith("I;16") or float(arr.max(initial=0)) > 255
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / 65535.0) if wide else arr), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def check_image(path: str | os.PathLike) -> None:
    """Cheap early check that ``path`` is an image file PIL can identify (reads the header only)."""
    try:
        with Image.open(path) as img:
            img.size
    except FileNotFoundError:
        raise Res2DetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise Res2DetError(f"{path}: not a readable image ({e})") from None


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image input as an HxWx3 uint8 RGB array."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] == 3 and t.shape[-1] != 3:
            t = t.permute(1, 2, 0)
        if t.is_floating_point():
            t = (t * 255 if float(t.max()) <= 1.0 else t).round().clamp(0, 255)
        image = t.to(torch.uint8).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise Res2DetError(f"expected an HxWx3 image array, got shape {image.shape}")
        return np.ascontiguousarray(image.astype(np.uint8, copy=False))
    raise Res2DetError(f"unsupported image input of type {type(image).__name__}")


def normalize(rgb: np.ndarray, pre: Preprocess) -> torch.Tensor:
    """HxWx3 uint8 RGB -> 3xHxW float tensor, ``(x - mean) / std`` with the weights' own statistics."""
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous().float()
    return x.sub_(torch.tensor(pre.mean).view(3, 1, 1)).div_(torch.tensor(pre.std).view(3, 1, 1))


def paddle_static_scale(height: int, width: int, short: int = 800, long: int = 1333) -> float:
    """PaddleDetection's static-graph ``ResizeImage`` scale: ``short / min(h, w)``, or ``long / max(h, w)`` when
    the long side would round above ``long``."""
    scale = short / min(height, width)
    if round(scale * max(height, width)) > long:
        scale = long / max(height, width)
    return scale


def _float_linear_taps(out_size: int, in_size: int, src_per_dst: float) -> tuple[torch.Tensor, ...]:
    """OpenCV's INTER_LINEAR taps along one axis: (first index, second index, weight of first, of second)."""
    f = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * src_per_dst - 0.5).to(torch.float32)
    i0 = torch.floor(f)
    f = f - i0
    i0 = i0.long()
    edge = (i0 < 0) | (i0 >= in_size - 1)  # OpenCV takes the border pixel with weight 1 there
    f = torch.where(edge, torch.zeros_like(f), f)
    i0 = i0.clamp(0, in_size - 1)
    return i0, (i0 + 1).clamp(max=in_size - 1), 1 - f, f


def resize_linear_float(image: torch.Tensor, out_size: Sequence[int],
                        src_per_dst: Sequence[float] | None = None) -> torch.Tensor:
    """``cv2.resize(..., INTER_LINEAR)`` of a float ``[..., H, W]`` tensor to ``out_size`` (h, w): half-pixel
    centres, border pixels repeated, no antialiasing, horizontal then vertical pass in float32.
    ``src_per_dst`` (y, x) is OpenCV's mapping scale: ``1 / fx`` when it is called with ``fx`` / ``fy``, else
    (default) input size / output size."""
    h, w = image.shape[-2:]
    oh, ow = int(out_size[0]), int(out_size[1])
    sy, sx = src_per_dst if src_per_dst is not None else (h / oh, w / ow)
    x0, x1, a0, a1 = _float_linear_taps(ow, w, sx)
    y0, y1, b0, b1 = _float_linear_taps(oh, h, sy)
    rows = image[..., x0] * a0 + image[..., x1] * a1
    return rows[..., y0, :] * b0[:, None] + rows[..., y1, :] * b1[:, None]


def classification_input(image: ImageLike, pre: Preprocess) -> torch.Tensor:
    """The ImageNet eval transform: resize the short side to size/crop_pct (bilinear), centre-crop, normalise."""
    img = Image.fromarray(to_rgb_uint8(image))
    h, w = pre.input_size
    short = int(h / (pre.crop_pct or 1.0))
    # torchvision's Resize(int): the short side becomes `short`, the long side is truncated, not rounded
    if img.width <= img.height:
        size = (short, int(short * img.height / img.width))
    else:
        size = (int(short * img.width / img.height), short)
    img = img.resize(size, Image.BILINEAR)
    left, top = round((img.width - w) / 2), round((img.height - h) / 2)
    return normalize(np.asarray(img.crop((left, top, left + w, top + h))), pre)


def rescale_size(width: int, height: int, bounds: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rule (``imrescale`` with a (short, long) bound pair): the largest scale at which the
    short side fits ``min(bounds)`` and the long side ``max(bounds)``; sizes are rounded half up.
    Returns the new ``(width, height)``."""
    scale = min(max(bounds) / max(width, height), min(bounds) / min(width, height))
    # at least one pixel a side: a 1 x 5000 strip would otherwise round to zero rows (mmcv then fails)
    return max(int(width * scale + 0.5), 1), max(int(height * scale + 0.5), 1)


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps along one axis: for each output index the first source index and the two
    weights in 11-bit fixed point, from ``fx = (float)((d + 0.5) * src / dst - 0.5)`` as ``cv::resize`` computes
    it (single precision, rounded to the nearest 1/2048)."""
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    first = np.floor(f).astype(np.int64)
    f = f - first.astype(np.float32)
    return first, np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32), \
        np.rint(f * np.float32(2048)).astype(np.int32)


def resize_bilinear(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """HxWxC uint8 -> ``height x width x C`` uint8 exactly as OpenCV's ``cv2.resize(..., INTER_LINEAR)`` (which
    mmcv, and so mmdetection's pipelines, use): half-pixel centres, no antialiasing, 11-bit fixed-point weights,
    a horizontal pass in integers and OpenCV's rounding of the vertical one. Integer arithmetic, so the result
    does not depend on the thread count (``F.interpolate``'s float rounding at .5 does). Checked equal to
    OpenCV 5.1 on 58 M values of real photos, up- and downscaled."""
    sh, sw = rgb.shape[:2]
    if (sh, sw) == (height, width):
        return rgb
    src = np.asarray(rgb, dtype=np.uint8).reshape(sh, sw, -1)
    first, a0, a1 = _linear_taps(sw, width)
    edge = (first < 0) | (first >= sw - 1)  # OpenCV: before the first / from the last column, that column alone
    a0[edge], a1[edge] = 2048, 0
    x0 = np.clip(first, 0, sw - 1)
    # the arithmetic in torch's integer kernels: exact as numpy's, and spread over the threads (the vertical pass
    # at the output size is most of the work: 800x1199 takes half of numpy's time at 2 threads)
    rows = torch.from_numpy(src[:, x0]).int() * torch.from_numpy(a0)[:, None]  # [sh, width, C] x 2048
    rows += torch.from_numpy(src[:, np.minimum(x0 + 1, sw - 1)]).int() * torch.from_numpy(a1)[:, None]
    rows >>= 4
    y0, b0, b1 = _linear_taps(sh, height)
    top, bottom = np.clip(y0, 0, sh - 1), np.clip(y0 + 1, 0, sh - 1)
    out = rows.index_select(0, torch.from_numpy(top)) * torch.from_numpy(b0)[:, None, None]
    out >>= 16
    lower = rows.index_select(0, torch.from_numpy(bottom)) * torch.from_numpy(b1)[:, None, None]
    lower >>= 16
    out += lower
    out += 2
    out >>= 2
    return out.clamp_(0, 255).to(torch.uint8).numpy().reshape(height, width, *rgb.shape[2:])


def detection_input(rgb: np.ndarray, pre: Preprocess, *, fit: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, tuple[float, float]]:
    """mmdetection's test pipeline for one HxWx3 uint8 RGB image (``pre.pipeline`` 'paddle_static': that era's,
    see ``paddle_static_scale``): keep-ratio resize to fit the
    ``pre.input_size`` (short, long) bounds, then normalise. ``fit=(H, W)`` (a fixed-size graph's input) also
    scales an image that would not fit down until it does (mmcv's rounding). Returns ``(3 x h' x w' tensor,
    (w'/w, h'/h))``, the per-axis scale factors that map original pixels to input pixels. Padding is done per
    batch (``pad_batch``)."""
    h, w = rgb.shape[:2]
    if h < 1 or w < 1:
        raise Res2DetError(f"empty image of size {w}x{h}")
    if pre.pipeline == "paddle_static":  # normalise, then cv2.resize(fx=scale, fy=scale) of the float image
        if fit is not None:
            raise Res2DetError("a fixed input size is not supported with PaddleDetection's static-graph pipeline")
        scale = paddle_static_scale(h, w, *pre.input_size)
        x = resize_linear_float(normalize(rgb, pre), (round(h * scale), round(w * scale)), (1 / scale, 1 / scale))
        return x, (scale, scale)
    new_w, new_h = rescale_size(w, h, pre.input_size)
    if fit is not None and (new_h > fit[0] or new_w > fit[1]):
        scale = min(fit[1] / w, fit[0] / h)
        new_w, new_h = max(min(int(w * scale + 0.5), fit[1]), 1), max(min(int(h * scale + 0.5), fit[0]), 1)
    return normalize(resize_bilinear(rgb, new_w, new_h), pre), (new_w / w, new_h / h)


def pad_batch(images: list[torch.Tensor], divisor: int = 32, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Stack ``3 x h x w`` tensors into ``N x 3 x H x W``, zero-padded on the bottom/right to the largest size
    rounded up to a multiple of ``divisor`` (mmdet's ``DetDataPreprocessor``, padding after normalisation), or
    to exactly ``size = (H, W)``."""
    if size is not None:
        ph, pw = size
    else:
        hs, ws = [x.shape[-2] for x in images], [x.shape[-1] for x in images]
        ph, pw = -(-max(hs) // divisor) * divisor, -(-max(ws) // divisor) * divisor
    return torch.stack([F.pad(x, (0, pw - x.shape[-1], 0, ph - x.shape[-2])) for x in images])


def image_list(images: Any) -> list:
    """One image or a list of images -> a list; a 4-d tensor / array is a batch of images."""
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (Sequence, torch.Tensor, np.ndarray)):
        return [images]  # a path, a PIL image, or something to_rgb_uint8 will name as unsupported
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images) if images.ndim == 4 else [images]
    return list(images)
