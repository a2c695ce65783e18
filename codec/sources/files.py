"""Local images by index: image files, file lists and the members of uncompressed ``.tar``
shards, each an :class:`Input` with a key unique within its source.

Keys: a folder's images are keyed by their path relative to the folder, a tar's members by
``relative/shard.tar/member`` (``member`` for a single ``.tar``), a file list's by the path
relative to the list's folder. :attr:`Input.where` names the input in full (the path, plus the
member of a tar): the key of every skip record.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from codec.images import ImageLoadError, list_images, load_image
from codec.sources import tars
from codec.sources.sides import Side, read_metadata_jsonl, read_range, side_files

COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


@dataclass(frozen=True)
class Input:
    """One input image: a file, or a member of an uncompressed tar (``offset``/``size`` >= 0)."""

    key: str
    path: str
    offset: int = -1
    size: int = -1
    sides: tuple[Side, ...] = ()  # its caption / label / JSON side data (codec.latents.conditioning)
    record: str | None = None  # its metadata.jsonl row (JSON text)
    member: str | None = None  # its name inside the tar
    row: int = -1  # its row in a Hugging Face dataset (``path``), read from ``column`` of ``split``
    column: str = "image"
    split: str = "train"
    data: bytes | None = None  # an image read from a stream, held encoded (eval and scale of a stream)

    def __str__(self) -> str:
        return self.where

    @property
    def where(self) -> str:
        """The full name of this input: its file, its tar and member, or its dataset and row."""
        if self.row >= 0:
            return f"{self.path}[{self.row}]"
        if self.data is not None:
            return self.key
        return self.path if self.member is None else f"{self.path}/{self.member}"


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
        return _sorted_unique(tar_inputs(source, prefix=""))
    if source.is_dir():
        metadata = read_metadata_jsonl(source)
        items = [Input(key, str(p), sides=side_files(p), record=metadata.get(key))
                 for p in list_images(source) for key in [p.relative_to(source).as_posix()]]
        for archive in sorted(source.rglob("*")):
            name = archive.name.lower()
            if name.endswith(COMPRESSED_TARS):
                _refuse_compressed(archive)
            if name.endswith(".tar") and archive.is_file():
                items += tar_inputs(archive, prefix=archive.relative_to(source).as_posix() + "/")
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


def tar_inputs(path: Path, prefix: str) -> list[Input]:
    """Image members of an uncompressed tar with their byte ranges (webdataset layout), each
    with the side members of its sample (same name, .txt / .cls / .json). A tar cut short
    anywhere (inside a member, at a member boundary, or without its end blocks) is an error."""
    images, sides = [], {}
    try:
        with tars.open_checked(str(path)) as tf:
            for m in tars.members(tf, str(path)):
                if m.isfile() and tars.is_image(m.name):
                    images.append(m)
                elif m.isfile() and tars.is_side(m.name):
                    sides.setdefault(tars.sample_name(m.name), []).append(
                        Side(Path(m.name).suffix.lower(), str(path), m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ValueError(f"{path}: cannot list this tar ({exc}); repair or remove it") from exc
    return [Input(prefix + m.name, str(path), m.offset_data, m.size, member=m.name,
                  sides=tuple(sides.get(tars.sample_name(m.name), ()))) for m in images]


def _sorted_unique(items) -> list[Input]:
    items = sorted(items, key=lambda it: it.key)
    for a, b in zip(items, items[1:]):
        if a.key == b.key:
            raise ValueError(f"two inputs share the key {a.key!r} ({a.path}, {b.path}); rename one")
    return items


def read_input(item: Input) -> Image.Image:
    if item.data is not None:
        return load_image(io.BytesIO(item.data), name=item.where)
    if item.row >= 0:
        from codec.sources.hf import image_of, open_dataset

        return image_of(open_dataset(item.path, item.column, item.split)[item.row][item.column], item.where,
                        item.column)
    if item.offset < 0:
        return load_image(item.path)
    try:
        data = read_range(item.path, item.offset, item.size)
    except OSError as exc:
        raise ImageLoadError(f"{item.where}: cannot read {item.path} ({exc})") from exc
    if len(data) != item.size:
        raise ImageLoadError(f"{item.where}: tar member cut short ({len(data)} of {item.size} bytes)")
    return load_image(io.BytesIO(data), name=item.where)


def input_record(item: Input) -> str | None:
    """The side data of an input's ``metadata.jsonl`` row or dataset row (JSON text)."""
    if item.row >= 0:
        from codec.sources.hf import open_dataset, row_record

        data = open_dataset(item.path, item.column, item.split)
        return row_record(data[item.row], item.column)  # (the image column is left out there)
    return item.record
