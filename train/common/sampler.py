"""Which items each process trains on, epoch after epoch, resumable at any step: both trainers'
sampler over a map-style dataset (crops of images, or latents)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


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
