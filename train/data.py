"""Training data: image folders, webdataset tar shards and file lists; random square crops and
flips; bad-file handling.

Sources (``data.train``) are listed by :func:`codec.latents.inputs.list_inputs`, the same
listing ``vae-codec compress`` uses: tar members are indexed by byte range once, then read at
random, so a sharded dataset is sampled, split across processes and resumed exactly like a
folder (every image once per epoch, whichever process or worker reads it). Brace patterns
(``train-{000000..000099}.tar``) expand with ``braceexpand``, as in webdataset. Hugging Face
``datasets`` (``hf:NAME`` on the Hub, or a ``save_to_disk`` folder) are read by index too, from
their ``image_column``, with the images decoded by our loader (same conversions and errors).

Reproducibility: the crop and flip of an item depend only on ``(seed, epoch, index)`` and the
order of items only on ``(seed, epoch)``. A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, whatever the number of DataLoader workers.

A file that cannot be used (unreadable, or smaller than the crop under ``small_images: skip``)
is replaced by the next usable item and reported in the batch's ``skipped`` list, so batches
keep their size (which multi-process training needs) and nothing is silently lost.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from codec.images import IMAGE_EXTENSIONS, ImageLoadError, center_crop_multiple, list_images, load_image, pil_to_tensor
from codec.latents.inputs import Input, list_inputs, read_input


class FileImages:
    """Images that are files or tar members (:class:`Input`), opened by :func:`read_input`."""

    def __init__(self, inputs: list[Input]):
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def key(self, i: int) -> str:
        return self.inputs[i].key

    def open(self, i: int) -> Image.Image:
        return read_input(self.inputs[i])


class HFImages:
    """The ``column`` of a Hugging Face dataset (map-style: random access, exact resume)."""

    def __init__(self, name: str, column: str = "image", split: str = "train"):
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"{name}: reading Hugging Face datasets needs `pip install vae-codec[hf]` "
                              "(the datasets library)") from exc

        local = Path(name)
        if local.is_dir():
            data = datasets.load_from_disk(str(local))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{name}: no split {split!r} (it has {sorted(data)}); set data.hf_split")
                data = data[split]
        else:
            data = datasets.load_dataset(name, split=split)
        if column not in data.column_names:
            raise ValueError(f"{name}: no column {column!r} (columns: {data.column_names}); set data.image_column")
        if isinstance(data.features[column], datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))  # bytes: decoded by load_image
        self.data, self.column, self.name = data, column, name

    def __len__(self) -> int:
        return len(self.data)

    def key(self, i: int) -> str:
        return f"{self.name}[{i}]"

    def open(self, i: int) -> Image.Image:
        import io

        value = self.data[i][self.column]
        if isinstance(value, dict) and value.get("bytes") is not None:
            return load_image(io.BytesIO(value["bytes"]), name=self.key(i))
        if isinstance(value, dict) and value.get("path"):
            return load_image(value["path"])
        if isinstance(value, Image.Image):
            return load_image(_png_bytes(value), name=self.key(i))
        raise ImageLoadError(f"{self.key(i)}: column {self.column!r} holds {type(value).__name__}, not an image")


class ConcatImages:
    """Several image sources, indexed one after the other."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int):
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part], i - int(self.starts[part])

    def key(self, i: int) -> str:
        part, j = self._locate(i)
        return part.key(j)

    def open(self, i: int) -> Image.Image:
        part, j = self._locate(i)
        return part.open(j)


def _png_bytes(img: Image.Image):
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    buf.seek(0)
    return buf


def is_hf_dataset(source: str | os.PathLike) -> bool:
    """``hf:NAME`` or a folder written by ``datasets``' ``save_to_disk``."""
    path = Path(source)
    return str(source).startswith("hf:") or (path.is_dir() and any(
        (path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")))


def gather_images(sources: list[str | os.PathLike], image_column: str = "image", split: str = "train"):
    """The training images of ``data.train``: files, tar shards and Hugging Face datasets."""
    parts = []
    files = []
    for source in sources:
        if is_hf_dataset(source):
            parts.append(HFImages(str(source).removeprefix("hf:"), image_column, split))
        else:
            files += gather_inputs([source])
    if files:
        parts.insert(0, FileImages(files))
    return parts[0] if len(parts) == 1 else ConcatImages(parts)


def gather_inputs(sources: list[str | os.PathLike]) -> list[Input]:
    """Every training image of several sources (folders with any .tar shards inside, .tar
    shards, brace patterns of shards, file lists); a clear error for a source with none."""
    from braceexpand import braceexpand

    items: list[Input] = []
    for pattern in sources:
        paths = list(braceexpand(str(pattern)))
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            more = f" (and {len(missing) - 1} more of the {len(paths)} it names)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"data source {missing[0]} does not exist{more}")
        for path in paths:
            found = list_inputs(path)
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
            items += found
    return items


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
                raise TooSmall(f"{getattr(img, 'filename', '')} {w}x{h} is smaller than crop {size}")
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
                skipped.append(f"{exc}")
        raise RuntimeError(
            f"{self.MAX_REPLACEMENTS} consecutive unusable images starting at {self.files.key(index)}; "
            f"last reasons: {skipped[-3:]}"
        )


class TooSmall(Exception):
    pass


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "paths": [it["path"] for it in items],
        "skipped": [s for it in items for s in it["skipped"]],
    }


class EpochSampler(Sampler):
    """This process's share of the training stream, as ``(index, epoch)`` keys.

    The permutation of an epoch depends only on ``(seed, epoch)``, so every process builds the
    same one and takes every ``world``-th item from ``rank``; each epoch keeps a whole number of
    batches per process (the rest is dropped) so all processes do the same number of steps.
    ``set_position(epoch, start, count)`` yields ``count`` items from item ``start`` of
    ``epoch`` on, running into later epochs: one DataLoader (and one set of workers) serves a
    whole run, and a resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world: int = 1, batch_size: int = 1):
        self.length, self.seed, self.rank, self.world = length, seed, rank, world
        self.per_epoch = (length // world) // batch_size * batch_size
        self.epoch, self.start, self.count = 0, 0, None

    def set_position(self, epoch: int, start: int = 0, count: int | None = None) -> None:
        self.epoch, self.start, self.count = epoch, start, count

    def epoch_items(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        return order[: self.length // self.world * self.world][self.rank :: self.world][: self.per_epoch]

    def __len__(self) -> int:
        return self.count if self.count is not None else self.per_epoch - self.start

    def __iter__(self):
        epoch, start, left = self.epoch, self.start, len(self)
        while left > 0 and self.per_epoch > 0:
            items = self.epoch_items(epoch)[start : start + left]
            yield from ((i, epoch) for i in items)
            left -= len(items)
            epoch, start = epoch + 1, 0


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
