"""What the UNet trains on: the latents of a compressed dataset, keyed ``(index, epoch)`` so that
posterior samples, flips and bucketed batches repeat exactly on resume."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class LatentStream(Dataset):
    """``LatentDataset`` items keyed ``(index, epoch)`` (train.common.sampler.EpochSampler's keys)."""

    def __init__(self, path, seed: int, fresh_samples: bool):
        from codec.latents.dataset import LatentDataset

        self.data = LatentDataset(path, sample=False, flip=False)  # we draw samples and flips, reproducibly
        self.seed, self.fresh = seed, fresh_samples
        self.shapes = self.data.indices_by_shape()  # several: aspect-ratio buckets (compress --buckets)
        self.shape = max(self.shapes, key=lambda s: len(self.shapes[s]))  # the commonest: the UNet's sample_size
        self.has_std = "std" in self.data.shards[0]["tensors"]
        # Class labels (compress --labels folders, or .cls side data): label i of num_classes;
        # rows without one, and dropped labels, take the null class num_classes.
        labels = [x for s in self.data.shards for x in s.get("labels", [])]
        self.classes = self.data.classes
        known = [x for x in labels if x is not None]
        self.num_classes = len(self.classes) if self.classes else (max(known) + 1 if known else 0)
        self.with_labels = False  # set by the run when it trains class-conditional

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key) -> torch.Tensor:
        index, epoch = key
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        # --flip latents: one of the two views, drawn like the sample (reproducible on resume)
        flipped = self.data.has_flip and bool(torch.rand((), generator=g) < 0.5)
        item = self.data.get(index, flipped)
        if not (self.has_std and self.fresh):
            latents = item["latents"]
        else:
            latents = item["mean"] + item["std"] * torch.randn(item["mean"].shape, generator=g)
        if not self.with_labels:
            return latents
        return latents, self.num_classes if item.get("label") is None else item["label"]


class BucketKeys(torch.utils.data.Sampler):
    """Bucketed batches (:class:`codec.latents.buckets.BucketBatchSampler`) as ``(index, epoch)``
    keys, run from a position over epochs like :class:`train.common.sampler.EpochSampler` (exact resume)."""

    def __init__(self, batches):
        self.batches = batches
        self.epoch, self.skip, self.count = 0, 0, 0

    def set_position(self, epoch: int, skip_batches: int, count_batches: int) -> None:
        self.epoch, self.skip, self.count = epoch, skip_batches, count_batches

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        epoch, skip, left = self.epoch, self.skip, self.count
        while left > 0:
            for batch in self.batches.epoch_batches(epoch)[skip : skip + left]:
                yield [(i, epoch) for i in batch]
                left -= 1
            epoch, skip = epoch + 1, 0
