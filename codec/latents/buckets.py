"""Aspect-ratio buckets (as SDXL and kohya's sd-scripts train): instead of one square crop,
every image is resized to the bucket of about the same pixel count whose aspect ratio is
closest to its own, then centre-cropped, so wide and tall images keep most of their content.

``make_buckets(budget, step)``: every (h, w), multiples of ``step``, with h·w ≤ budget² and an
aspect ratio within 1:4..4:1, keeping for each width the tallest height that fits. Shards group
by latent shape, so one bucket is one shape; :class:`BucketBatchSampler` batches one bucket at a
time, shuffled per epoch and split across processes.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch.utils.data import Sampler

MAX_RATIO = 4.0


def make_buckets(budget: int, step: int = 64) -> list[tuple[int, int]]:
    """The (h, w) buckets of a ``budget``² pixel budget on a ``step`` grid."""
    if step <= 0 or step % 8:
        raise ValueError(f"--bucket-step must be a positive multiple of 8, got {step}")
    if budget < step:
        raise ValueError(f"--buckets {budget}: a budget of {budget}² pixels is smaller than one "
                         f"{step}x{step} bucket; raise it or lower --bucket-step")
    area, found = budget * budget, set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h >= step and max(h / w, w / h) <= MAX_RATIO:
            found.add((h, w))
    return sorted(found)


def nearest_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to h:w (on a log scale; ties: the larger)."""
    return min(buckets, key=lambda b: (abs(math.log((b[0] / b[1]) / (h / w))), -b[0] * b[1]))


def fit_bucket(img: Image.Image, buckets: list[tuple[int, int]]) -> tuple[Image.Image, list[int]]:
    """``img`` resized to cover its bucket (bicubic) and centre-cropped to it; returns the
    crop and its top-left corner in the resized image."""
    w, h = img.size
    bh, bw = nearest_bucket(h, w, buckets)
    scale = max(bh / h, bw / w)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else img
    top, left = (nh - bh) // 2, (nw - bw) // 2
    return img.crop((left, top, left + bw, top + bh)), [top, left]


class BucketBatchSampler(Sampler):
    """Batches of ``LatentDataset`` indices, each from one latent shape (bucket), in which every
    item of every bucket is trained in every epoch.

    Per epoch: each bucket's indices are shuffled with ``(seed, epoch)`` and cut into batches; a
    last, partial batch is completed with the first items of the same shuffled order (taken
    again round the bucket when it is smaller than a batch), so a bucket of n items gives
    ceil(n / batch_size) batches and repeats fewer than ``batch_size`` items, none left out.
    The batches of all buckets are shuffled together; the list is then extended by repeating its
    first batches to a multiple of ``world``, and process ``rank`` takes every ``world``-th, so
    processes take the same number of steps and no batch is dropped. ``set_epoch(e)`` before each
    epoch, as with ``DistributedSampler``.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.groups = [g for _, g in sorted(dataset.indices_by_shape().items()) if g]
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch = 0
        if not self.groups:
            raise ValueError("no latents to batch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        size, batches = self.batch_size, []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            cycled = order * -(-size // len(order))  # enough to complete a small bucket's batch
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                batches.append(batch + cycled[: size - len(batch)])
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        extra = -len(batches) % self.world  # more ranks than batches: round the list again
        batches += (batches * (extra // len(batches) + 1))[:extra]
        return batches[self.rank :: self.world]

    def __len__(self) -> int:
        total = sum(-(-len(group) // self.batch_size) for group in self.groups)
        return -(-total // self.world)

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch))
