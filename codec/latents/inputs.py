"""What a latents job reads: image files, file lists and webdataset ``.tar`` members, each an
:class:`Input` with a unique key, decoded and fitted to size in DataLoader workers.

Sizes: ``resolution R`` resizes the short side to R (bicubic, antialiased) and centre-crops
R x R (smaller images are upscaled). Without it images keep their size, centre-cropped down to
multiples of 8 (at most 7 pixels per side; images under 8 x 8 are refused).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from codec.codec import DOWNSAMPLE
from codec.images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image
from codec.latents.buckets import fit_bucket
from codec.latents.conditioning import (
    SIDE_EXTENSIONS,
    Side,
    conditioning,
    read_metadata_jsonl,
    read_range,
    side_files,
)

COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


# ------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Input:
    """One input image: a file, or a member of an uncompressed tar (``offset``/``size`` >= 0)."""

    key: str
    path: str
    offset: int = -1
    size: int = -1
    sides: tuple[Side, ...] = ()  # its caption / label / JSON side data (codec.latents.conditioning)
    record: str | None = None  # its metadata.jsonl row (JSON text)


def list_inputs(source: str | os.PathLike) -> list[Input]:
    """Every input image under ``source``, sorted by key; keys are unique.

    ``source`` is a folder (images found recursively, keyed by relative path, plus every
    ``.tar`` in it, whose images are keyed ``relative/shard.tar/member``), a single ``.tar``
    (keyed by member name), a file list (.txt) or one image.
    """
    source = Path(source)
    if source.is_file() and source.name.lower().endswith(COMPRESSED_TARS):
        _refuse_compressed(source)
    if source.is_file() and source.name.endswith(".tar"):
        return _sorted_unique(_tar_members(source, prefix=""))
    if source.is_dir():
        metadata = read_metadata_jsonl(source)
        items = [Input(key, str(p), sides=side_files(p), record=metadata.get(key))
                 for p in list_images(source) for key in [p.relative_to(source).as_posix()]]
        for archive in sorted(source.rglob("*")):
            name = archive.name.lower()
            if name.endswith(COMPRESSED_TARS):
                _refuse_compressed(archive)
            if name.endswith(".tar") and archive.is_file():
                items += _tar_members(archive, prefix=archive.relative_to(source).as_posix() + "/")
        return _sorted_unique(items)
    files = list_images(source)  # a file list or one image; raises FileNotFoundError otherwise
    base = source.parent
    return _sorted_unique(
        Input(p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p), str(p))
        for p in files
    )


def _refuse_compressed(archive: Path):
    raise ValueError(
        f"{archive}: compressed tar archives cannot be read by random access; "
        "decompress it (e.g. `gunzip`) to a plain .tar, or extract it"
    )


def _tar_members(path: Path, prefix: str) -> list[Input]:
    """Image members of an uncompressed tar with their byte ranges (webdataset layout), each
    with the side members of its sample (same name, .txt / .cls / .json)."""
    images, sides = [], {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                suffix = Path(m.name).suffix.lower()
                if m.isfile() and suffix in IMAGE_EXTENSIONS:
                    images.append(m)
                elif m.isfile() and suffix in SIDE_EXTENSIONS:
                    sides.setdefault(str(Path(m.name).with_suffix("")), []).append(
                        Side(suffix, str(path), m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ValueError(f"{path}: cannot list this tar ({exc}); repair or remove it") from exc
    return [Input(prefix + m.name, str(path), m.offset_data, m.size,
                  sides=tuple(sides.get(str(Path(m.name).with_suffix("")), ()))) for m in images]


def _sorted_unique(items) -> list[Input]:
    items = sorted(items, key=lambda it: it.key)
    for a, b in zip(items, items[1:]):
        if a.key == b.key:
            raise ValueError(f"two inputs share the key {a.key!r} ({a.path}, {b.path}); rename one")
    return items


def read_input(item: Input) -> Image.Image:
    if item.offset < 0:
        return load_image(item.path)
    try:
        data = read_range(item.path, item.offset, item.size)
    except OSError as exc:
        raise ImageLoadError(f"{item.key}: cannot read {item.path} ({exc})") from exc
    if len(data) != item.size:
        raise ImageLoadError(f"{item.key}: tar member cut short ({len(data)} of {item.size} bytes)")
    return load_image(io.BytesIO(data), name=item.key)


def fit(img: Image.Image, resolution: int | None, buckets: list | None = None
        ) -> tuple[torch.Tensor, list[int], list[int]]:
    """RGB image -> ((3, h, w) uint8 tensor, original [h, w], crop top-left [top, left]).

    The crop's corner is in the resized image (what SDXL-style size conditioning wants). With
    ``buckets`` the image goes to its aspect-ratio bucket (:mod:`codec.latents.buckets`).
    """
    w, h = img.size
    buckets = buckets or ([(resolution, resolution)] if resolution else None)  # --resolution: one square bucket
    if buckets:
        crop, corner = fit_bucket(img, buckets)
    else:
        if w < DOWNSAMPLE or h < DOWNSAMPLE:
            raise ImageLoadError(
                f"{w}x{h} is smaller than {DOWNSAMPLE}x{DOWNSAMPLE} pixels; "
                "pass --resolution to upscale it"
            )
        corner = [h % DOWNSAMPLE // 2, w % DOWNSAMPLE // 2]
        crop = img.crop((corner[1], corner[0], corner[1] + w - w % DOWNSAMPLE, corner[0] + h - h % DOWNSAMPLE))
    arr = np.asarray(crop, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1), [h, w], corner


class ImageInputs(Dataset):
    """Decoded, fitted images of ``inputs[indices]``; a bad file gives an item with ``error``."""

    def __init__(self, inputs: list[Input], indices: list[int], resolution: int | None, buckets: list | None = None):
        self.inputs, self.indices, self.resolution, self.buckets = inputs, indices, resolution, buckets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        item = {"index": index, "image": None, "error": None}
        try:
            image, size, crop = fit(read_input(self.inputs[index]), self.resolution, self.buckets)
        except ImageLoadError as exc:
            item["error"] = str(exc)
            return item
        try:
            extra = conditioning(self.inputs[index].key, self.inputs[index].sides, self.inputs[index].record)
        except ImageLoadError as exc:
            item["error"] = str(exc)
            return item
        item.update(image=image, original_size=size, crop_top_left=crop, **extra)
        return item


def as_list(batch: list) -> list:
    """collate_fn: keep items apart (sizes differ; the encoder groups them by shape)."""
    return batch
