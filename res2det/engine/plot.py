"""A PNG of the training curves (losses per iteration, AP per evaluation) drawn with Pillow alone."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from ..visualize import label_color, load_font

W, H, PAD = 640, 300, 48


def _panel(draw: ImageDraw.ImageDraw, top: int, title: str, series: dict[str, Sequence[tuple[float, float]]],
           xlabel: str) -> None:
    font = load_font(12)
    x0, y0, x1, y1 = PAD, top + 24, W - 140, top + H - PAD // 2
    draw.text((PAD, top + 4), title, fill=(0, 0, 0), font=font)
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    points = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not points:
        draw.text((x0 + 10, y0 + 10), "no data yet", fill=(90, 90, 90), font=font)
        return
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    ymin, ymax = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    xmax, ymax = (xmax if xmax > xmin else xmin + 1), (ymax if ymax > ymin else ymin + 1)
    sx = lambda x: x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)
    sy = lambda y: y1 - (y - ymin) / (ymax - ymin) * (y1 - y0)
    for value in (ymin, (ymin + ymax) / 2, ymax):
        draw.text((4, sy(value) - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
    draw.text((x0, y1 + 4), f"{xmin:g}", fill=(0, 0, 0), font=font)
    draw.text((x1 - 40, y1 + 4), f"{xmax:g} {xlabel}", fill=(0, 0, 0), font=font)
    for i, (name, pts) in enumerate(series.items()):
        color = label_color(i)
        xy = [(sx(x), sy(y)) for x, y in pts if math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy[-1:] if len(xy) > 1 else xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((x1 + 8, y0 + 14 * i), name, fill=color, font=font)


def plot_training(records: Sequence[dict], path: str | Path) -> None:
    """Losses from the ``train`` records and AP from the ``eval`` records of a run's log, one PNG."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    losses = sorted({k for r in train for k in r if k.startswith("loss")})
    metrics = [k for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50") if any(k in r for r in evals)]
    image = Image.new("RGB", (W, 2 * H), "white")
    draw = ImageDraw.Draw(image)
    _panel(draw, 0, "training losses", {k: [(r["iter"], r[k]) for r in train if k in r] for k in losses}, "iter")
    _panel(draw, H, "validation AP", {k: [(r["epoch"], r[k]) for r in evals if k in r] for k in metrics}, "epoch")
    from ..checkpoint import atomic_write

    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
