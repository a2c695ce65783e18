"""``LatentDataset``: random access to latents written by ``vae-codec compress``.

Shards are opened with safetensors' ``safe_open`` (memory-mapped; a row read copies only that
row), lazily and once per process, so the dataset works in a DataLoader with workers.

Items::

    {"latents": (C, h, w) float32,   # what a diffusion model trains on (see below)
     "key": "relative/path.jpg",     # the input it came from
     "original_size": (2,) int64,    # (h, w) of the source image
     "crop_top_left": (2,) int64}    # (top, left) of the crop, in the resized image
    # plus "mean" and "std" (C, h, w) when the job stored --store mean_std,
    # and "flipped" (bool) when it stored --flip; "label" (int), "caption" (str) and "meta"
    # (dict) where the inputs had them (None for a row without; see codec.latents.conditioning)

With ``--store mean`` / ``sample`` ``latents`` is the stored tensor. With ``mean_std`` it is a
*fresh posterior sample* ``mean + std * N(0, I)`` drawn at every access (with torch's global
RNG, which DataLoader seeds per worker and per epoch), so every epoch sees new samples; pass
``sample=False`` to get the mean instead. All latents are already scaled
(``(z - shift_factor) * scaling_factor``); ``dataset.scaling_factor`` / ``shift_factor`` are
the codec's, for decoding.

With ``--flip`` every row also holds the latents of the mirrored image, and each access takes
one of the two views at random (torch's global RNG again, like the posterior sample); pass
``flip=False`` for the original view only, or call :meth:`LatentDataset.get` to choose.

Native-size jobs mix latent shapes; batch them with :meth:`LatentDataset.indices_by_shape`.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from codec.latents import shards as sh


class LatentItem(dict):
    """One row: reading ``label``, ``caption`` or ``meta`` of a dataset without them gives None
    (``item["caption"]`` works on any dataset), while the keys stay absent so that torch's default
    collate, which cannot batch None, still batches such items."""

    CONDITIONING = ("label", "caption", "meta")

    def __missing__(self, key):
        if key in self.CONDITIONING:
            return None
        raise KeyError(key)


class LatentDataset(Dataset):
    def __init__(self, path: str | os.PathLike, sample: bool = True, flip: bool = True):
        """``path``: a folder written by ``vae-codec compress``, or one shard file on its own."""
        path = Path(path)
        if path.is_file():
            job, entry = sh.read_shard_entry(path)
            self.root, self.shards = path.parent, [entry]
        else:
            manifest = sh.load_manifest(path)
            job, self.root, self.shards = manifest, path, manifest["shards"]
        self.job, self.sample, self.flip = job, sample, flip
        self.has_flip = bool(job["settings"].get("flip"))
        self.scaling_factor = job["codec"]["scaling_factor"]
        self.classes = job.get("classes")  # --labels folders: label i is classes[i]
        self.shift_factor = job["codec"]["shift_factor"]
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + s["rows"])
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self):
        # Open file handles cannot cross into worker processes; each worker opens its own.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open(self, s: int):
        if self._pid != os.getpid():  # forked into a worker: do not share the parent's handles
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.root / self.shards[s]["file"]), "pt")
        return self._handles[s]

    def locate(self, index: int) -> tuple[int, int]:
        """Dataset index -> (shard number, row in that shard)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        s = bisect.bisect_right(self._starts, index) - 1
        return s, index - self._starts[s]

    def __getitem__(self, index: int) -> dict:
        flipped = self.has_flip and self.flip and bool(torch.rand(()) < 0.5)
        return self.get(index, flipped)

    def get(self, index: int, flipped: bool = False) -> dict:
        """Row ``index``, from the mirrored image's latents when ``flipped`` (``--flip`` jobs)."""
        if flipped and not self.has_flip:
            raise ValueError("these latents hold no mirrored view; compress with --flip")
        s, row = self.locate(index)
        shard, f = self.shards[s], self._open(s)
        item = LatentItem({
            "key": shard["keys"][row],
            "original_size": torch.tensor(shard["original_sizes"][row]),
            "crop_top_left": torch.tensor(shard["crops_top_left"][row]),
        })
        if self.has_flip:
            item["flipped"] = flipped
        for field, name in (("labels", "label"), ("captions", "caption"), ("metas", "meta")):
            if field in shard:  # conditioning, where the job found some (None for rows without)
                item[name] = shard[field][row]
        suffix = "_flip" if flipped else ""
        if "latents" in shard["tensors"]:
            item["latents"] = f.get_slice(f"latents{suffix}")[row : row + 1][0].float()
            return item
        mean = f.get_slice(f"mean{suffix}")[row : row + 1][0].float()
        std = f.get_slice(f"std{suffix}")[row : row + 1][0].float()
        item.update(mean=mean, std=std)
        item["latents"] = mean + std * torch.randn_like(mean) if self.sample else mean
        return item

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """``DataLoader(ds, collate_fn=LatentDataset.collate)``: tensors stacked (one latent shape
        per batch: see :meth:`bucket_batches`), everything else as lists, ``label``, ``caption``
        and ``meta`` always, None where a row has none (torch's default collate cannot batch None)."""
        keys = list(items[0]) + [k for k in LatentItem.CONDITIONING if k not in items[0]]
        return {key: torch.stack([it[key] for it in items]) if isinstance(items[0][key], torch.Tensor)
                else [it[key] for it in items] for key in keys}

    def bucket_batches(self, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        """A batch sampler of one latent shape (bucket) per batch, shuffled per epoch
        (``.set_epoch(e)``) and split across ``world`` processes: ``DataLoader(ds,
        batch_sampler=ds.bucket_batches(32, rank=r, world=w))``."""
        from codec.latents.buckets import BucketBatchSampler

        return BucketBatchSampler(self, batch_size, seed, rank, world)

    def indices_by_shape(self) -> dict[tuple[int, ...], list[int]]:
        """Latent shape -> dataset indices, for batches of one shape (native-size jobs)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for s, shard in enumerate(self.shards):
            groups.setdefault(tuple(shard["latent_shape"]), []).extend(
                range(self._starts[s], self._starts[s + 1])
            )
        return groups
