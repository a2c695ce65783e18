"""What ``compress`` reads from a stream: one chunk per input shard (a tar by URL or ``pipe:``, or
a shard of a streamed Hugging Face dataset), decoded and fitted in DataLoader workers.

Worker ``w`` of ``W`` reads the chunks ``chunks[w::W]`` whole, in order, yielding each image as
an item like :class:`codec.latents.inputs.ImageInputs` does (plus its ``key``), then one
``{"end": chunk, ...}`` item that closes the chunk: its image count and, for a shard that could
not be read to its end, the problem (recorded under the shard's name; what came before the
damage is kept). A killed job therefore redoes at most the shards that were in flight.
"""

from __future__ import annotations

import tarfile

from torch.utils.data import IterableDataset, get_worker_info

from codec.images import ImageLoadError
from codec.latents.conditioning import conditioning
from codec.latents.inputs import fit
from codec.sources import skip
from codec.sources.stream import Shard, shard_problem, side_data


class ShardInputs(IterableDataset):
    def __init__(self, shards: list[Shard], chunks: list[int], resolution: int | None, buckets: list | None = None,
                 classes: list[str] | None = None):
        self.shards, self.chunks, self.resolution, self.buckets, self.classes = (
            shards, chunks, resolution, buckets, classes)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for chunk in self.chunks[worker::workers]:
            yield from self.read(chunk)

    def read(self, chunk: int):
        shard, count, problem = self.shards[chunk], 0, None
        try:
            for key, image, sides, _ in shard.samples():
                yield self.item(chunk, count, key, image, sides)
                count += 1
        except (OSError, tarfile.TarError, EOFError) as exc:
            problem = skip(shard.where, shard_problem(exc))
        yield {"end": chunk, "count": count, "problem": problem}

    def item(self, chunk: int, n: int, key: str, image, sides: dict) -> dict:
        item = {"index": n, "chunk": chunk, "key": key, "image": None, "error": None}
        try:
            pixels, size, crop = fit(image(), self.resolution, self.buckets)
            extra = conditioning(key, side_data(sides), None, self.classes)
        except ImageLoadError as exc:
            item["error"] = str(exc)
            return item
        item.update(image=pixels, original_size=size, crop_top_left=crop, **extra)
        return item
