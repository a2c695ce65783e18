"""Image I/O and conversions between PIL images, uint8 arrays and [-1, 1] float tensors.

Every loader in the project goes through :func:`load_image`, so all of them agree on what a
"defined behaviour" for odd files is:

* EXIF orientation is applied (a photo shot in portrait comes out in portrait);
* greyscale (``L``, ``1``), palette (``P``), CMYK, YCbCr, LAB and HSV are converted to RGB;
* images with alpha (``RGBA``, ``LA``, ``PA``, palette with transparency) are composited
  onto white, the way a browser shows them;
* 16-bit and 32-bit integer greys (``I;16*``, ``I``) and float greys (``F``) are rescaled to
  8 bits by their real range (not clipped, which would turn most 16-bit files white): floats
  within [0, 1] as [0, 1], integers or floats within [0, 255] as 8-bit levels, anything else
  from its minimum to its maximum;
* animated images give their first frame;
* anything unreadable (empty, truncated, not an image, too large) raises
  :class:`ImageLoadError` naming the file and the reason, so callers can skip *and record*.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # GIF: its first frame


class ImageLoadError(ValueError):
    """A file that cannot be turned into an RGB image; the message says which file and why."""


def load_image(path, name: str | None = None) -> Image.Image:
    """Open ``path`` as an 8-bit RGB PIL image (see the module docstring for the rules).

    ``path`` may also be a binary file object (e.g. a tar member); ``name`` then labels errors.

    Raises :class:`ImageLoadError` (a ValueError) for every file that is missing or cannot be
    decoded, whatever PIL's decoders raise inside; nothing else comes out (fuzzed with
    hypothesis). Decompression-bomb *warnings* are PIL's, not errors.
    """
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
    label = name or path
    try:
        with Image.open(path) as img:
            img.seek(0)  # animated GIF/WebP/PNG: the first frame
            img = ImageOps.exif_transpose(img)
            img.load()  # force decoding now, inside the try: truncated files fail here
            return to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{label}: too large to decode safely ({exc})") from exc
    except Exception as exc:
        # PIL raises OSError/UnidentifiedImageError for truncated, empty and non-image files,
        # and its decoders let struct.error, IndexError, TypeError, ZeroDivisionError... out of
        # crafted ones (found by fuzzing, tests/test_untrusted_files.py): all mean "bad file".
        raise ImageLoadError(f"{label}: cannot read image ({type(exc).__name__}: {exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha onto white, high bit depths rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (arr.min(), max(arr.max(), 1))
        if img.mode == "F" and arr.min() >= 0 and arr.max() <= 1:
            lo, hi = 0.0, 1.0  # floats in [0, 1], the usual convention for float images
        elif img.mode in ("I", "F") and hi <= 255 and lo >= 0:
            lo, hi = 0.0, 255.0  # 8-bit data stored in a wide mode: keep it as is
        grey = np.clip((arr - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def list_images(source: str | os.PathLike) -> list[Path]:
    """All image files under a folder (recursively, sorted), or the paths listed in a text file.

    A file list has one path per line; relative paths are relative to the list's folder; blank
    lines and ``#`` comments are ignored. Raises FileNotFoundError when ``source`` is missing.
    """
    source = Path(source)
    if source.is_dir():
        # Every entry named like an image, broken or looping symbolic links included: they fail
        # to load and are then recorded as skipped, never silently passed over.
        return sorted(
            p for p in source.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_symlink() or p.is_file()) and not p.is_dir()
        )
    if source.is_file() and source.suffix.lower() in (".txt", ".lst", ".list"):
        paths = []
        for line in source.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else source.parent / p)
        return paths
    if source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS:
        return [source]
    raise FileNotFoundError(
        f"{source}: not an image folder, an image, or a file list (.txt with one path per line)"
    )


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return uint8_to_tensor(arr)


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 -> (3, H, W) or (B, 3, H, W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).float().div_(127.5).sub_(1.0)
    return t.movedim(-1, -3)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8, rounding to the nearest level."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).movedim(-3, -1).cpu().numpy()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] -> list of RGB PIL images."""
    return [Image.fromarray(a) for a in tensor_to_uint8(images)]


def to_batch(images) -> torch.Tensor:
    """Accept the inputs users have and return one (B, 3, H, W) float32 tensor in [-1, 1].

    Accepted: a PIL image or a list of them (same size), a uint8 array (H, W, 3) or (B, H, W, 3)
    or a list of (H, W, 3) arrays, and a float tensor (3, H, W) or (B, 3, H, W) in [-1, 1]
    ((B, 1, H, W) greyscale: its channel repeated).
    """
    if isinstance(images, Image.Image):
        return pil_to_tensor(images)[None]
    if isinstance(images, np.ndarray):
        return _array_to_batch(images)
    if isinstance(images, torch.Tensor):
        return _tensor_to_batch(images)
    if isinstance(images, (list, tuple)) and images:
        parts = [to_batch(im) for im in images]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(
                f"images in one batch must share a size, got {sorted(sizes)}; "
                "encode them one at a time or resize/crop them first"
            )
        return torch.cat(parts)
    raise TypeError(
        f"unsupported image input {type(images).__name__}; pass PIL images, uint8 (H, W, 3) "
        "arrays or float (B, 3, H, W) tensors in [-1, 1]"
    )


def _array_to_batch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype != np.uint8:
        raise TypeError(
            f"numpy images must be uint8 (H, W, 3), got dtype {arr.dtype}; for float data pass "
            "a torch tensor (B, 3, H, W) in [-1, 1]"
        )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"uint8 arrays must be (H, W, 3) or (B, H, W, 3), got {arr.shape}")
    return uint8_to_tensor(arr)


def _tensor_to_batch(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise TypeError(
            f"tensor images must be float in [-1, 1], got {t.dtype}; "
            "convert uint8 with codec.images.uint8_to_tensor or x / 127.5 - 1"
        )
    if t.ndim == 3:
        t = t[None]
    if t.ndim == 4 and t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)  # greyscale (MNIST digits): the RGB image with equal channels
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"tensor images must be (B, 3, H, W) (or (B, 1, H, W) greyscale), got {tuple(t.shape)}")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1.001 or hi > 1.001:
        hint = " (looks like [0, 255]: divide by 127.5 and subtract 1)" if hi > 2 else ""
        raise ValueError(f"tensor images must be in [-1, 1], got [{lo:.3g}, {hi:.3g}]{hint}")
    return t


def save_image(image: torch.Tensor | Image.Image, path: str | os.PathLike) -> Path:
    """Save one image ((3, H, W) / (1, 3, H, W) tensor in [-1, 1], or PIL) to ``path``."""
    if isinstance(image, torch.Tensor):
        image = tensor_to_pil(image if image.ndim == 4 else image[None])[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_grid_image(rows: Iterable[torch.Tensor], path: str | os.PathLike,
                    labels: Sequence[Sequence[str | None]] | None = None) -> Path:
    """Stack rows of (B, 3, H, W) tensors in [-1, 1] into one grid PNG (one row per tensor).

    ``labels[r][c]``: a short text written on cell (r, c) (an image's name, its PSNR, a class
    name), on a dark band so it reads on any picture; None or a missing entry writes nothing."""
    import torchvision.utils
    from PIL import ImageDraw

    rows = list(rows)
    nrow = max(r.shape[0] for r in rows)
    grid = torchvision.utils.make_grid(
        torch.cat([r.float().cpu() for r in rows]), nrow=nrow, padding=2, value_range=(-1, 1),
        normalize=True,
    )
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    if labels:
        draw = ImageDraw.Draw(picture)
        h, w = rows[0].shape[-2:]
        for r, row_labels in enumerate(labels):
            for c, text in enumerate(row_labels or []):
                if text:
                    x, y = 2 + c * (w + 2), 2 + r * (h + 2)  # make_grid's padding is 2
                    left, top, right, bottom = draw.textbbox((x + 1, y), str(text))
                    draw.rectangle((x, y, min(right + 1, x + w - 1), bottom + 1), fill=(0, 0, 0))
                    draw.text((x + 1, y), str(text), fill=(255, 255, 255))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def center_crop_multiple(images: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Crop (B, C, H, W) centrally so H and W are multiples of ``multiple``."""
    h, w = images.shape[-2:]
    nh, nw = h - h % multiple, w - w % multiple
    top, left = (h - nh) // 2, (w - nw) // 2
    return images[..., top : top + nh, left : left + nw]


def load_images(paths: Sequence[str | os.PathLike]) -> list[torch.Tensor]:
    """Load files as a list of (3, H, W) tensors in [-1, 1]; raises ImageLoadError on bad files."""
    return [pil_to_tensor(load_image(p)) for p in paths]
