"""Pictures for evaluation reports: error heat-maps, crops, side-by-side grids, histograms.

All arrays are uint8 (H, W, 3). Drawing uses Pillow only (no plotting library dependency).
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Absolute error (on [0, 1] pixels) shown at full colour: a fixed scale, so heat-maps of
# different codecs can be compared by eye. 0.25 is 64 grey levels.
HEATMAP_MAX = 0.25
# "inferno"-like ramp: black -> purple -> red -> orange -> pale yellow (dark = small error).
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], float)


def error_heatmap(x: np.ndarray, y: np.ndarray, vmax: float = HEATMAP_MAX) -> np.ndarray:
    """Mean absolute error over RGB, coloured on a fixed [0, vmax] scale -> (H, W, 3) uint8."""
    err = np.abs(x.astype(np.float32) - y.astype(np.float32)).mean(-1) / 255.0
    t = np.clip(err / vmax, 0, 1) * (len(_RAMP) - 1)
    stops = np.arange(len(_RAMP))
    rgb = np.stack([np.interp(t, stops, _RAMP[:, c]) for c in range(3)], -1)
    return rgb.round().astype(np.uint8)


def worst_window(x: np.ndarray, y: np.ndarray, size: int) -> tuple[int, int, int]:
    """(top, left, size) of the square window with the largest mean error (stride size/4)."""
    h, w = x.shape[:2]
    size = min(size, h, w)
    err = torch.from_numpy(np.abs(x.astype(np.float32) - y.astype(np.float32)).mean(-1))
    stride = max(1, size // 4)
    pooled = F.avg_pool2d(err[None, None], size, stride=stride)[0, 0]
    idx = int(pooled.flatten().argmax())
    row, col = divmod(idx, pooled.shape[1])
    return row * stride, col * stride, size


def crop(arr: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    top, left, size = window
    return arr[top : top + size, left : left + size]


def thumbnail_with_box(arr: np.ndarray, window: tuple[int, int, int], height: int) -> Image.Image:
    """The whole image scaled to ``height`` px with the crop window outlined."""
    img = Image.fromarray(arr)
    scale = height / img.height
    img = img.resize((max(1, round(img.width * scale)), height), Image.Resampling.BILINEAR)
    top, left, size = window
    box = [left * scale, top * scale, (left + size) * scale - 1, (top + size) * scale - 1]
    ImageDraw.Draw(img).rectangle(box, outline=(0, 255, 0), width=2)
    return img


def grid(rows: list[list[np.ndarray | Image.Image]], header: list[str], cell: int,
         pad: int = 4) -> Image.Image:
    """Cells (resized to ``cell`` px high, nearest neighbour so pixels stay visible) in rows,
    with a text header row."""
    font = ImageFont.load_default()
    cells = [[c if isinstance(c, Image.Image) else Image.fromarray(c) for c in r] for r in rows]
    cells = [[c.resize((max(1, round(c.width * cell / c.height)), cell), Image.Resampling.NEAREST)
              for c in r] for r in cells]
    ncol = max(len(r) for r in cells)
    widths = [max(r[i].width for r in cells if i < len(r)) for i in range(ncol)]
    head = 16
    out = Image.new("RGB", (sum(widths) + pad * (ncol + 1), head + len(cells) * (cell + pad) + pad),
                    "white")
    draw = ImageDraw.Draw(out)
    x = pad
    for i, w in enumerate(widths):
        if i < len(header):
            draw.text((x, 2), header[i][: max(4, w // 6)], fill="black", font=font)
        x += w + pad
    for j, r in enumerate(cells):
        x = pad
        for i, c in enumerate(r):
            out.paste(c, (x, head + pad + j * (cell + pad)))
            x += widths[i] + pad
    return out


def histogram(values: torch.Tensor, title: str, lo: float = -4.0, hi: float = 4.0,
              bins: int = 64, size: tuple[int, int] = (220, 140)) -> Image.Image:
    """One panel per latent channel: density histogram of ``values`` (C, N) over [lo, hi],
    with the N(0, 1) density drawn on top (what a diffusion model expects)."""
    font = ImageFont.load_default()
    w, h = size
    channels = values.shape[0]
    out = Image.new("RGB", (w * channels, h + 18), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), title, fill="black", font=font)
    width = (hi - lo) / bins
    xs = [lo + (i + 0.5) * width for i in range(bins)]
    normal = [math.exp(-v * v / 2) / math.sqrt(2 * math.pi) for v in xs]
    for c in range(channels):
        v = values[c].float()
        counts = torch.histc(v.clamp(lo, hi), bins=bins, min=lo, max=hi)
        density = (counts / max(1, v.numel()) / width).tolist()
        top = max(max(density), max(normal)) * 1.05
        x0, y0, pw, ph = c * w + 8, 18 + 14, w - 16, h - 30
        draw.rectangle([x0, y0, x0 + pw, y0 + ph], outline=(180, 180, 180))
        for i, d in enumerate(density):
            bx = x0 + i * pw / bins
            draw.rectangle([bx, y0 + ph - d / top * ph, bx + pw / bins - 1, y0 + ph],
                           fill=(70, 110, 200))
        pts = [(x0 + (i + 0.5) * pw / bins, y0 + ph - n / top * ph) for i, n in enumerate(normal)]
        draw.line(pts, fill=(220, 60, 30), width=2)
        outside = float(((v < lo) | (v > hi)).float().mean()) * 100
        draw.text((x0, 18), f"ch{c} mean {v.mean():+.2f} std {v.std():.2f}"
                  + (f" ({outside:.1f}% off-axis)" if outside >= 0.05 else ""),
                  fill="black", font=font)
        draw.text((x0, y0 + ph + 1), f"{lo:g}", fill="gray", font=font)
        draw.text((x0 + pw - 10, y0 + ph + 1), f"{hi:g}", fill="gray", font=font)
    return out


def data_uri(img: Image.Image | np.ndarray, fmt: str = "PNG") -> str:
    """An image as a ``data:`` URI, so report.html carries its pictures inside itself."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
