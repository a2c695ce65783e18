"""Training data: random square crops and flips of the images of ``data.train``, with bad-file
handling (the order of items: :class:`train.common.sampler.EpochSampler`).

Sources are read by :mod:`codec.sources`, the layer ``vae-codec compress``, ``scale`` and
``eval`` use too: folders, file lists, tar shards (indexed by byte range once, then read at
random) and Hugging Face datasets by row, so a sharded dataset is sampled, split across
processes and resumed exactly like a folder (every image once per epoch, whichever process or
worker reads it). Streams (URLs, ``pipe:``, ``data.streaming``) are :mod:`codec.sources.stream`.

Reproducibility: the crop and flip of an item depend only on ``(seed, epoch, index)`` and the
order of items only on ``(seed, epoch)``. A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, whatever the number of DataLoader workers.

A file that cannot be used (unreadable, or smaller than the crop under ``small_images: skip``)
is replaced by the next usable item and reported in the batch's ``skipped`` list (records of
:func:`codec.sources.skip`, keyed by the input's full name), so batches keep their size (which
multi-process training needs) and nothing is silently lost.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from codec.images import IMAGE_EXTENSIONS, ImageLoadError, center_crop_multiple, list_images, load_image, pil_to_tensor
from codec.sources import Input, gather_inputs, read_input, skip


class FileImages:
    """Indexed images (:class:`codec.sources.Input`: files, tar members, dataset rows)."""

    def __init__(self, inputs: list[Input]):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def key(self, i: int) -> str:
        return self.inputs[i].where

    def open(self, i: int) -> Image.Image:
        return read_input(self.inputs[i])


def gather_images(sources: list[str | os.PathLike], image_column: str = "image", split: str = "train"):
    """The training images of ``data.train``: files, tar shards and Hugging Face datasets."""
    return FileImages(gather_inputs(sources, image_column, split))


def gather_files(sources: list[str | os.PathLike]) -> list[Path]:
    """All image files of several folders / file lists; a clear error when there are none."""
    files: list[Path] = []
    for src in sources:
        if not Path(src).exists():
            raise FileNotFoundError(f"data source {src} does not exist")
        found = list_images(src)
        if not found:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {src}")
        files += found
    return files


class Cropper:
    """The crop rule: a random ``crop_size`` square (and flip), drawn from a given generator.
    ``crop_mode="resized"`` first takes a random share of ``min_fraction``..1 of the short side
    and resizes it to ``crop_size`` (LDM's crops); ``native`` crops at the image's resolution."""

    def __init__(self, crop_size: int, small_images: str = "upscale", random_flip: bool = True,
                 crop_mode: str = "native", min_fraction: float = 0.5):
        self.crop_size, self.crop_mode, self.min_fraction = crop_size, crop_mode, min_fraction
        self.small_images, self.random_flip = small_images, random_flip

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        size = self.crop_size
        w, h = img.size
        if self.crop_mode == "resized":  # a random share of the short side, resized to the crop
            side = max(1, round(min(w, h) * rng.uniform(self.min_fraction, 1.0)))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            w, h = img.size
        if min(w, h) < size:
            if self.small_images == "skip":
                raise TooSmall(f"{w}x{h} is smaller than crop {size}")  # the caller names the file
            scale = size / min(w, h)  # upscale the short side to the crop size
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = img.size
        left = int(rng.integers(0, w - size + 1))
        top = int(rng.integers(0, h - size + 1))
        img = img.crop((left, top, left + size, top + size))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)


class CropDataset(Dataset):
    """Random crops (:class:`Cropper`) of images (an image source, or files / tar members as
    :class:`Input` or paths); indexed by ``(index, epoch)`` pairs."""

    MAX_REPLACEMENTS = 64

    def __init__(
        self,
        files,
        crop_size: "int | Cropper",
        small_images: str = "upscale",
        random_flip: bool = True,
        seed: int = 0,
        crop_mode: str = "native",
        min_fraction: float = 0.5,
    ):
        if not files:
            raise ValueError("the training set is empty")
        # files: an image source (FileImages, HFImages, ...) or a list of paths / Inputs
        self.files = files if hasattr(files, "open") else FileImages(
            [f if isinstance(f, Input) else Input(str(f), str(f)) for f in files])
        self.crop = (crop_size if isinstance(crop_size, Cropper)  # or the crop rule's settings
                     else Cropper(crop_size, small_images, random_flip, crop_mode, min_fraction))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        skipped = []
        for attempt in range(self.MAX_REPLACEMENTS):
            i = (index + attempt) % len(self.files)
            try:
                image = self.crop(self.files.open(i), np.random.default_rng((self.seed, epoch, i)))
                return {"pixels": image, "path": self.files.key(i), "skipped": skipped}
            except (ImageLoadError, TooSmall) as exc:
                skipped.append(skip(self.files.key(i), exc))
        raise RuntimeError(
            f"{self.MAX_REPLACEMENTS} consecutive unusable images starting at {self.files.key(index)}; "
            f"last reasons: {[s['reason'] for s in skipped[-3:]]}"
        )


class TooSmall(Exception):
    pass


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "paths": [it["path"] for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
    }


def load_validation_images(files: list[Path], count: int, crop: int) -> tuple[torch.Tensor | list, list[str]]:
    """Up to ``count`` held-out images, centre-cropped to ``crop`` (0: full size, cropped to a
    multiple of 8). Returns a batch tensor when all share a size, else a list, plus the paths used.
    Unreadable files are skipped and returned in the paths list with a reason."""
    images, used = [], []
    for path in files:
        if len(images) >= count:
            break
        try:
            x = pil_to_tensor(load_image(path))[None]
        except ImageLoadError as exc:
            used.append(f"skipped: {exc}")
            continue
        if crop:
            if min(x.shape[-2:]) < crop:
                used.append(f"skipped: {path} smaller than val_crop {crop}")
                continue
            h, w = x.shape[-2:]
            top, left = (h - crop) // 2, (w - crop) // 2
            x = x[..., top : top + crop, left : left + crop]
        images.append(center_crop_multiple(x))
        used.append(str(path))
    if images and len({im.shape for im in images}) == 1:
        return torch.cat(images), used
    return images, used
