"""Measuring latent factors on a dataset: the one routine behind ``vae-codec scale``,
``vae-codec export --data`` and the codec a training run exports.

The images are a seeded random sample spread over the *whole* dataset (not its first files,
which in a class-structured folder are one class), encoded to posterior samples; the factors
follow from their statistics (:meth:`codec.Codec.measure_factors`, :mod:`codec.factors`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from codec.codec import Codec
from codec.factors import factors_from_stats
from codec.latents.inputs import ImageInputs, as_list
from codec.sources import is_stream, list_source


def spread_sample(num_items: int, samples: int, seed: int) -> list[int]:
    """``samples`` indices drawn at random (seeded) from all ``num_items``, in index order."""
    if samples >= num_items:
        return list(range(num_items))
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:samples].tolist())


def measure_dataset(codec: Codec, dataset: Dataset, samples: int, seed: int = 0, num_workers: int = 0) -> dict:
    """Latent statistics of ``samples`` items of ``dataset`` (a :func:`spread_sample`).

    Items are ``{"image": (3, h, w) uint8 or [-1, 1] float tensor, "error": str | None}``, same
    size within a batch; items with an error are listed in ``"skipped"``. ``seed`` fixes both the
    sample and the posterior noise, so a measurement is reproducible.
    """
    if len(dataset) == 0:
        raise ValueError("no images to measure latent factors on")
    indices = spread_sample(len(dataset), samples, seed)
    # Its own generator: an iterator of a loader without one draws a seed from the global RNG,
    # and a training run measuring at a checkpoint must not change what it does next.
    loader = DataLoader(Subset(dataset, indices), batch_size=codec.batch_size, num_workers=num_workers,
                        collate_fn=as_list, generator=torch.Generator().manual_seed(seed))
    skipped = []

    def batches():
        for batch in loader:
            skipped.extend(item["error"] for item in batch if item["error"] is not None)
            good = [item["image"] for item in batch if item["error"] is None]
            if good:
                x = torch.stack(good)
                yield x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()

    stats = codec.measure_factors(batches(), generator=torch.Generator().manual_seed(seed))
    stats.update(skipped=skipped, seed=seed)
    return stats


def measure_images(codec: Codec, source, resolution: int, samples: int, seed: int = 0, num_workers: int = 0,
                   image_column: str = "image", split: str = "train", streaming: bool = False) -> dict:
    """:func:`measure_dataset` on the images of ``source`` (any :mod:`codec.sources` form; a
    stream gives its first ``samples`` images), short side resized to ``resolution`` and
    centre-cropped square."""
    problems: list[dict] = []
    first = samples if is_stream(source, streaming) else None  # a stream: its first images
    inputs = list_source(source, image_column, split, streaming, limit=first, problems=problems)
    stats = measure_dataset(codec, ImageInputs(inputs, list(range(len(inputs))), resolution), samples, seed,
                            num_workers)
    stats["skipped"] = [p["reason"] for p in problems] + stats["skipped"]
    return stats


def apply_factors(codec: Codec, stats: dict, normalisation: str) -> None:
    """Set the codec's factors from ``stats`` and record the statistics in its metadata."""
    codec.set_factors(**factors_from_stats(stats, normalisation))
    codec.meta["latent_stats"] = {k: v for k, v in stats.items() if k != "skipped"}
