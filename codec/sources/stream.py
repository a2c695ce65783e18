"""Streamed sources, read exactly: webdataset shards by URL or ``pipe:`` (and local tars given as
``pipe:cat``), and Hugging Face datasets read with ``streaming``.

A stream has no random access, so it is cut into *shards* (tar files; a dataset's own shards),
and each shard's image count is read once (:func:`count_shards`, cached beside the run). Then an
epoch is one global sequence: the shards in an order drawn from ``(seed, epoch)``, their images
in stream order; ``N`` images in all. :class:`StreamPlan` deals it like an indexed epoch:

* each of ``P`` processes takes ``M = N // (P * B)`` batches of ``B`` per epoch (the last
  ``N - P*M*B < P*B`` images of the sequence are left out, as indexed epochs drop theirs), from
  its own contiguous stretch of the sequence;
* the DataLoader takes batches from its ``W`` workers in turn, so global batch ``g`` of a process
  comes from the worker whose *class* is ``g % W``; the batches of one class in one epoch hold a
  contiguous run of the process's stretch, so each reader reads one stretch of one or two shards
  per epoch, not the whole stream;
* content depends only on ``(seed, epoch, batch)``, never on worker ids: a loader resumed after
  ``done`` batches gives its worker ``w`` the class ``(w + done) % W``, and the run continues
  with exactly the keys (and crops, drawn from ``(seed, epoch, slot)``) of an uninterrupted run.

Every image is used once per epoch. An image that is not usable is recorded and replaced by the
next image of the sequence (as indexed sources replace theirs), so an epoch with ``k`` unusable
images uses ``k`` images twice; a resumed reader decodes the part of its stretch already used to
find those replacements again. A shard that cannot be opened or is cut short is recorded under
its URL and the sequence goes on with the next shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from codec.images import ImageLoadError, load_image
from codec.sources import skip, tars
from codec.sources.kinds import expand, hf_name, is_hf_dataset, is_url, unknown_source
from codec.sources.sides import Side


# ------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shard:
    """One shard of a stream: a tar by URL / ``pipe:``, or shard ``index`` of ``of`` of a dataset."""

    name: str
    index: int = -1
    of: int = 0
    column: str = "image"
    split: str = "train"

    @property
    def where(self) -> str:
        return self.name if self.index < 0 else f"{self.name}[shard {self.index} of {self.of}]"

    def samples(self, start: int = 0):
        """``(key, () -> PIL image, sides, encoded bytes or None)`` of this shard's images from image
        ``start`` on, in stream order. Damage ends it with :class:`OSError` / ``tarfile`` errors
        naming the shard."""
        if self.index >= 0:
            yield from _dataset_samples(self, start)
            return
        with open_url(self.name) as stream:
            for n, (member, data, sides) in enumerate(tars.stream_samples(stream, self.name)):
                if n >= start:
                    key = f"{self.name}/{member}"
                    yield key, (lambda d=data, k=key: load_image(io.BytesIO(d), name=k)), sides, data

    def count(self) -> tuple[int, str | None]:
        """(images readable, the reason it ended early or None)."""
        if self.index >= 0:
            return sum(1 for _ in self.samples()), None
        n = 0
        try:
            with open_url(self.name) as stream:
                for _ in tars.stream_samples(stream, self.name):
                    n += 1
        except (OSError, tarfile.TarError, EOFError) as exc:
            return n, shard_problem(exc)
        return n, None


def open_url(url: str):
    try:
        import webdataset
    except ImportError as exc:
        raise ImportError(f"{url}: streamed shards need `pip install webdataset` (or vae-codec[train])") from exc
    try:
        return webdataset.gopen(url)
    except Exception as exc:  # noqa: BLE001 - any opener's failure, named
        raise OSError(f"{url}: cannot open ({type(exc).__name__}: {exc})") from exc


def shard_problem(exc: BaseException) -> str:
    return f"shard unreadable or cut short ({type(exc).__name__}: {exc})"


def _dataset_samples(shard: Shard, start: int):
    from codec.sources.hf import image_of, open_dataset, row_record

    data = open_dataset(shard.name, shard.column, shard.split, streaming=True).shard(shard.of, shard.index)
    # .iter(): row by row without datasets' own split between DataLoader workers (by worker id,
    # which a resumed loader does not keep; the plan decides who reads what).
    rows = ({k: v[0] for k, v in batch.items()} for batch in (data.skip(start) if start else data).iter(1))
    for row, values in enumerate(rows, start=start):
        key = f"{hf_name(shard.name)}[shard {shard.index}, row {row}]"
        value = values[shard.column]
        record = row_record(values, shard.column)
        sides = {".json": record.encode()} if record else {}
        raw = value.get("bytes") if isinstance(value, dict) else None
        yield key, (lambda v=value, k=key: image_of(v, k, shard.column)), sides, raw


def stream_shards(sources, column: str = "image", split: str = "train") -> list[Shard]:
    """The shards of streamed sources (brace patterns expanded), in the order given."""
    shards: list[Shard] = []
    for source in map(str, sources):
        if is_url(source):
            shards += [Shard(url) for url in expand(source)]
        elif is_hf_dataset(source):
            from codec.sources.hf import open_dataset

            n = open_dataset(source, column, split, streaming=True).num_shards
            shards += [Shard(source, i, n, column, split) for i in range(n)]
        else:
            raise unknown_source(source, "not a stream (a URL, pipe: command or Hugging Face dataset)")
    if not shards:
        raise ValueError(f"no shards in {list(sources)}")
    return shards


def probe(shard: Shard) -> None:
    """Open a tar shard and read its first block: a wrong URL fails at once, not in a worker."""
    if shard.index >= 0:
        return
    try:
        with open_url(shard.name) as stream:
            if not stream.read(512):
                raise OSError("it is empty")
    except OSError as exc:
        raise OSError(f"{shard.name}: cannot read this shard ({exc})") from exc


def count_shards(shards: list[Shard], cache: Path | None = None, progress: bool = True) -> tuple[list[int], list]:
    """Each shard's image count (one pass over the stream; reused from ``cache`` when it holds
    these shards) and the skip records of shards that ended early."""
    names = [s.where for s in shards]
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("shards") == names:
            return stored["counts"], stored["problems"]
    from tqdm.auto import tqdm

    counts, problems = [], []
    for shard in tqdm(shards, desc="counting the images of each shard", unit="shard", disable=not progress):
        n, problem = shard.count()
        counts.append(n)
        if problem:
            problems.append(skip(shard.where, problem))
    if cache is not None:  # written whole and renamed: processes counting at once never see half a file
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"shards": names, "counts": counts, "problems": problems}))
        os.replace(tmp, cache)
    return counts, problems


# ------------------------------------------------------------------------- the plan
class StreamPlan:
    """Which images of the epoch's sequence each process, worker class and batch reads (see the
    module docstring). Pure arithmetic over shard counts; no I/O."""

    def __init__(self, counts: list[int], seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 workers: int = 1):
        self.counts, self.seed, self.batch = list(counts), seed, batch_size
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.total = sum(self.counts)
        self.per_process = self.total // (world * batch_size)  # M: batches of each process per epoch
        if self.per_process == 0:
            raise ValueError(f"the stream holds {self.total} images, fewer than one batch of "
                             f"{batch_size} for each of {world} process(es)")

    def order(self, epoch: int) -> list[int]:
        """The shards of ``epoch`` in reading order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.counts), generator=g).tolist()

    def class_runs(self, epoch: int) -> list[tuple[int, int]]:
        """(first batch j, number of batches) of each worker class within ``epoch``."""
        runs = []
        for c in range(self.workers):
            first = (c - epoch * self.per_process) % self.workers
            runs.append((first, max(0, -(-(self.per_process - first) // self.workers))))
        return runs

    def stretch(self, epoch: int, cls: int) -> tuple[int, int]:
        """(first position, number of batches) of class ``cls`` in ``epoch``'s sequence."""
        runs = self.class_runs(epoch)
        before = sum(n for _, n in runs[:cls])
        return self.rank * self.per_process * self.batch + before * self.batch, runs[cls][1]

    def batch_of(self, g: int) -> tuple[int, int]:
        """(epoch, index of the batch within its class's stretch) of global batch ``g``."""
        epoch, j = divmod(g, self.per_process)
        first, _ = self.class_runs(epoch)[g % self.workers]
        return epoch, (j - first) // self.workers

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(place in the epoch's shard order, image within that shard) of a sequence position."""
        position %= self.total
        for place, shard in enumerate(self.order(epoch)):
            if position < self.counts[shard]:
                return place, position
            position -= self.counts[shard]
        raise AssertionError("position beyond the sequence")


# ------------------------------------------------------------------------- the dataset
class ImageStream(IterableDataset):
    """Items ``{"pixels", "path", "skipped"}`` of streamed sources for one process
    (:meth:`set_rank`) and its DataLoader workers, placed by :meth:`set_position`.

    ``prepare(image, rng)`` turns a PIL image into the item's pixels (a training crop); it may
    raise :class:`ImageLoadError` (or an exception in ``unusable``) to mark an image unusable.
    """

    def __init__(self, sources, prepare, seed: int = 0, column: str = "image", split: str = "train",
                 unusable: tuple = (), cache: Path | None = None, progress: bool = True):
        self.prepare, self.seed = prepare, seed
        self.unusable = (ImageLoadError, *unusable)
        self.shards = stream_shards(sources, column, split)
        probe(self.shards[0])
        self.counts, self.problems = count_shards(self.shards, cache, progress)
        if sum(self.counts) == 0:
            raise ValueError(f"no shard of {[str(s) for s in sources]} holds a readable image: "
                             + "; ".join(p["reason"] for p in self.problems[:3]))
        self.rank, self.world, self.batch_size, self.batches_done = 0, 1, 1, 0

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_position(self, batches_done: int, batch_size: int) -> None:
        """Resume after ``batches_done`` batches of ``batch_size`` of this process."""
        self.batches_done, self.batch_size = batches_done, batch_size

    def plan(self, workers: int) -> StreamPlan:
        return StreamPlan(self.counts, self.seed, self.batch_size, self.rank, self.world, workers)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(workers)
        first = self.batches_done + worker  # this worker's first global batch
        cls = first % workers
        epoch, skip_batches = plan.batch_of(first)
        # The count pass's finds travel with the run's first item (the loop records them once).
        pending: list[dict] = list(self.problems) if first == 0 and self.rank == 0 else []
        while True:
            start, batches = plan.stretch(epoch, cls)
            if batches > skip_batches:
                yield from self._read(plan, epoch, start, batches * plan.batch, skip_batches * plan.batch, pending)
            epoch, skip_batches = epoch + 1, 0

    def _read(self, plan: StreamPlan, epoch: int, start: int, count: int, skip_first: int, pending: list):
        """``count`` usable images from position ``start`` of ``epoch``'s sequence, the first
        ``skip_first`` of them only checked (a resumed reader), unusable ones replaced by the next."""
        used, looked = 0, 0
        for _, key, image, _ in self._sequence(plan, epoch, start, pending):
            looked += 1
            if looked > plan.total + count:
                break
            slot = start + used
            try:
                pixels = self.prepare(image(), np.random.default_rng((self.seed, epoch, slot)))
            except self.unusable as exc:
                if used >= skip_first:
                    pending.append(skip(key, exc))
                continue
            used += 1
            if used <= skip_first:
                continue
            skipped = pending[:]
            pending.clear()
            yield {"pixels": pixels, "path": key, "skipped": skipped}
            if used == count:
                return
        raise RuntimeError(f"no usable image in a whole epoch of the stream ({plan.total} images looked at); "
                           f"last problems: {[p['reason'] for p in pending[-3:]]}")

    def _sequence(self, plan: StreamPlan, epoch: int, start: int, pending: list):
        """(position, key, loader, sides) of ``epoch``'s sequence from ``start`` on, wrapping around."""
        place, inner = plan.locate(epoch, start)
        order = plan.order(epoch)
        position = start
        for step in range(len(order) + 1):
            shard = self.shards[order[(place + step) % len(order)]]
            try:
                for key, image, sides, _ in shard.samples(inner):
                    yield position, key, image, sides
                    position += 1
            except (OSError, tarfile.TarError, EOFError) as exc:  # recorded under the shard's name
                pending.append(skip(shard.where, shard_problem(exc)))
            inner = 0

    def head(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` usable images of one fixed order (for measuring latent factors: a
        stream has no random access for a spread sample)."""
        plan = StreamPlan(self.counts, self.seed, 1)
        out = []
        for position, _, image, _ in self._sequence(plan, 10**9, 0, []):
            if len(out) >= count or position >= plan.total:
                break
            try:
                out.append(self.prepare(image(), np.random.default_rng((self.seed, 10**9, position))))
            except self.unusable:
                continue
        return out


def side_data(sides: dict[str, bytes]) -> tuple[Side, ...]:
    """A streamed sample's side members as :class:`Side` (for :mod:`codec.latents.conditioning`)."""
    return tuple(Side(ext, "", data=data) for ext, data in sorted(sides.items()))


def cache_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "stream_counts.json"
