"""Streamed training data: webdataset shards by URL (``https://…/train-{000000..000999}.tar``,
``pipe:curl …``, ``s3://`` and whatever else ``webdataset.gopen`` opens) and Hugging Face datasets
read with ``data.streaming: true``.

A stream has no random access, so it is split by *shard*: each epoch shuffles the shard list
with ``(seed, epoch)``, and reader ``r`` of ``R`` (``R`` = processes × DataLoader workers) reads
shards ``r, r + R, …`` in full, in order; with fewer shards than readers it reads every shard and
keeps every ``R``-th image instead. Every image is read once per epoch by one reader. Crops and
flips are drawn from ``(seed, epoch, reader, n)``; the image order within a shard is the shard's.

Resuming re-reads, from the start of the run, the images this reader had used (decoding them to
know which were usable, without training on them), then continues exactly where it stopped: an
exact resume that costs reading again what was consumed. Map-style sources (files, local tar
shards, ``save_to_disk`` folders) resume instantly; prefer them where the data is local.

A member that is not a usable image is skipped and recorded like a bad file; a shard that cannot
be opened or is cut short is recorded too (``url: reason``) and the stream goes on; the first
shard is opened when the dataset is built, so a wrong URL fails at once.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from codec.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from train.data import TooSmall, is_hf_dataset

STREAM_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


def is_stream(source: str | os.PathLike, streaming: bool = False) -> bool:
    """A source read as a stream: a URL or ``pipe:``, or a Hugging Face dataset with streaming."""
    return str(source).startswith(STREAM_PREFIXES) or (streaming and is_hf_dataset(source))


class StreamCrops(IterableDataset):
    """Crops from streamed sources, for one process (``set_rank``) and its DataLoader workers.

    ``crop`` is the crop rule (:class:`train.data.Cropper`).
    """

    def __init__(self, sources: list[str], crop, seed: int = 0, image_column: str = "image", split: str = "train"):
        from braceexpand import braceexpand

        self.crop, self.seed, self.column, self.split = crop, seed, image_column, split
        self.shards: list[str] = []
        self.hf: list[str] = []
        for source in map(str, sources):
            if source.startswith(STREAM_PREFIXES):
                self.shards += list(braceexpand(source))
            else:
                self.hf.append(source.removeprefix("hf:"))
        self.rank, self.world = 0, 1
        self.batch_size, self.batches_done = 1, 0
        if self.shards:  # fail at once on a wrong URL, not in a worker an hour later
            _probe(self.shards[0])

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_position(self, batches_done: int, batch_size: int) -> None:
        """Resume after ``batches_done`` batches of ``batch_size`` of this process."""
        self.batches_done, self.batch_size = batches_done, batch_size

    # ------------------------------------------------------------------ reading
    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes whole batches from its workers in turn, starting with worker 0: a
        # loader resumed after `done` batches must have its worker w continue the stream of the
        # worker that would have made the next batch, (w + done) % workers, which had used that
        # many of the batches done.
        role = (worker + self.batches_done) % workers
        reader, readers = self.rank * workers + role, self.world * workers
        to_skip = len(range(role, self.batches_done, workers)) * self.batch_size
        pending: list[str] = []
        epoch = 0
        while True:
            used = 0
            for n, (key, image) in enumerate(self.samples(epoch, reader, readers, pending)):
                try:
                    pixels = self.crop(image(), np.random.default_rng((self.seed, epoch, reader, n)))
                except (ImageLoadError, TooSmall) as exc:  # an unusable member: recorded, the stream goes on
                    if to_skip == 0:
                        pending.append(f"{key}: {exc}" if not str(exc).startswith(key) else str(exc))
                    continue
                used += 1
                if to_skip:
                    to_skip -= 1
                    continue
                yield {"pixels": pixels, "path": key, "skipped": pending}
                pending = []
            if used == 0:
                raise RuntimeError(
                    f"DataLoader worker {role} of process {self.rank} found no usable image in a whole epoch "
                    f"(fewer shards than processes x workers? set data.num_workers lower); {pending[-3:]}")
            epoch += 1

    def samples(self, epoch: int, reader: int, readers: int, problems: list):
        """(key, () -> PIL image) of this reader's share of ``epoch``, in stream order."""
        if self.shards:
            order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch)).tolist()
            shards = [self.shards[i] for i in order]
            by_shard = len(shards) >= readers
            mine = shards[reader::readers] if by_shard else shards
            count = 0
            for url in mine:
                for key, data in _tar_images(url, problems):
                    count += 1
                    if by_shard or (count - 1) % readers == reader:
                        yield key, (lambda d=data, k=key: load_image(io.BytesIO(d), name=k))
        for name in self.hf:  # split by process here; datasets splits between DataLoader workers itself
            yield from _hf_stream(name, self.column, self.split, self.seed, epoch, self.rank, self.world)

    def head(self, count: int) -> list[torch.Tensor]:
        """``count`` crops read from the start of a fixed shuffled order (for measuring latent
        factors: a stream has no random access for a spread sample)."""
        out, problems = [], []
        for n, (_, image) in enumerate(self.samples(10**9, 0, 1, problems)):
            if len(out) >= count:
                break
            try:
                out.append(self.crop(image(), np.random.default_rng((self.seed, 10**9, 0, n))))
            except (ImageLoadError, TooSmall):  # a bad member: the next one serves
                continue
        return out


def _open(url: str):
    import webdataset

    try:
        return webdataset.gopen(url)
    except Exception as exc:  # noqa: BLE001 - any opener's failure, named
        raise OSError(f"{url}: cannot open ({type(exc).__name__}: {exc})") from exc


def _probe(url: str) -> None:
    """Open ``url`` and read its first block, raising an error that names it."""
    try:
        with _open(url) as stream:
            if not stream.read(512):
                raise OSError("it is empty")
    except OSError as exc:
        raise OSError(f"{url}: cannot read this shard ({exc})") from exc


def _tar_images(url: str, problems: list):
    """(key, bytes) of the image members of one streamed tar; an unreadable or truncated shard is
    recorded in ``problems`` and ends early."""
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield f"{url}/{member.name}", tf.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        problems.append(f"{url}: shard unreadable or cut short ({type(exc).__name__}: {exc})")


def _hf_stream(name: str, column: str, split: str, seed: int, epoch: int, rank: int, world: int):
    import datasets
    from datasets.distributed import split_dataset_by_node

    local = Path(name)
    if local.is_dir():
        data = datasets.load_from_disk(str(local))
        data = data[split] if isinstance(data, datasets.DatasetDict) else data
        data = data.to_iterable_dataset(num_shards=min(len(data), 64))  # shards for the workers to share
    else:
        data = datasets.load_dataset(name, split=split, streaming=True)
    if column not in (data.column_names or [column]):
        raise ValueError(f"{name}: no column {column!r} (columns: {data.column_names}); set data.image_column")
    if isinstance((data.features or {}).get(column), datasets.Image):
        data = data.cast_column(column, datasets.Image(decode=False))
    data = split_dataset_by_node(data.shuffle(seed=seed, buffer_size=1000), rank=rank, world_size=world)
    data.set_epoch(epoch)
    for n, row in enumerate(data):
        value, key = row[column], f"{name}[process {rank}, row {n}]"
        if isinstance(value, dict) and value.get("bytes") is not None:
            yield key, (lambda d=value["bytes"], k=key: load_image(io.BytesIO(d), name=k))
        elif isinstance(value, Image.Image):
            yield key, (lambda v=value: v.convert("RGB"))
        else:
            yield key, (lambda k=key, v=value: _not_an_image(k, v))


def _not_an_image(key, value):
    raise ImageLoadError(f"{key}: holds {type(value).__name__}, not an image")
