"""What a latents job reads: image files, file lists and webdataset ``.tar`` members, each an
:class:`Input` with a unique key, decoded and fitted to size in DataLoader workers.

Sizes: ``resolution R`` resizes the short side to R (bicubic, antialiased) and centre-crops
R x R (smaller images are upscaled). Without it images keep their size, centre-cropped down to
multiples of 8 (at most 7 pixels per side; images under 8 x 8 are refused).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from codec.codec import DOWNSAMPLE
from codec.images import ImageLoadError
from codec.latents.buckets import fit_bucket
from codec.latents.conditioning import conditioning
from codec.sources import Input, input_record, list_inputs, read_input

__all__ = ["ImageInputs", "Input", "as_list", "fit", "list_inputs", "read_input"]


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

    def __init__(self, inputs: list[Input], indices: list[int], resolution: int | None, buckets: list | None = None,
                 classes: list[str] | None = None):
        self.inputs, self.indices, self.resolution, self.buckets = inputs, indices, resolution, buckets
        self.classes = classes  # string labels' class list (codec.latents.conditioning.class_index)

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
            item_input = self.inputs[index]
            extra = conditioning(item_input.key, item_input.sides, input_record(item_input), self.classes)
        except ImageLoadError as exc:
            item["error"] = str(exc)
            return item
        item.update(image=image, original_size=size, crop_top_left=crop, **extra)
        return item


def as_list(batch: list) -> list:
    """collate_fn: keep items apart (sizes differ; the encoder groups them by shape)."""
    return batch
