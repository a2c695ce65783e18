"""Measuring latent factors on a dataset: the one routine behind ``vae-codec scale``,
``vae-codec export --data`` and the codec a training run exports.

The images are a seeded random sample spread over the *whole* dataset (not its first files,
which in a class-structured folder are one class), encoded to posterior samples; the factors
follow from their statistics (:meth:`codec.Codec.measure_factors`, :mod:`codec.factors`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from codec.codec import DOWNSAMPLE, Codec
from codec.factors import factors_from_stats
from codec.io import is_autoencoder_tiny
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


DEFAULT_RESOLUTION = 256


def measuring_resolution(codec: Codec, requested: int | None) -> int:
    """The square side images are measured at: a fixed-size codec's own side (the MLP VAE's 28),
    else ``requested`` (default 256), a positive multiple of 8."""
    native = codec.native_size
    if native is not None:
        if requested not in (None, native):
            raise ValueError(f"{codec.name} takes {native}x{native} images only; leave --resolution out "
                             f"(it measures at {native})")
        return native
    requested = DEFAULT_RESOLUTION if requested is None else requested
    if requested <= 0 or requested % DOWNSAMPLE:
        raise ValueError(f"--resolution must be a positive multiple of {DOWNSAMPLE}, got {requested}")
    return requested


def check_rescalable(codec: Codec, normalisation: str) -> None:
    """Refuse factors a codec cannot carry, before any measuring: a distilled student's latents are
    its teacher's scaled ones (new factors would leave the space its teacher decodes), and
    diffusers' AutoencoderTiny config has no per-channel statistics (it drops them on loading)."""
    teacher = (codec.meta.get("latent_stats") or {}).get("teacher")
    if teacher:
        raise ValueError(f"{codec.name} is a student distilled from {teacher}: its latents are the teacher's "
                         "scaled latents, so its factors stay 1 and 0. Measure the teacher's factors "
                         f"(`vae-codec scale --codec {teacher}`) and distil again")
    if normalisation == "per-channel" and is_autoencoder_tiny(codec.vae):
        raise ValueError(f"{codec.name} is an AutoencoderTiny: its diffusers config has no latents_mean/"
                         "latents_std (diffusers drops them on loading); use the plain scale or --shift")


def apply_factors(codec: Codec, stats: dict, normalisation: str) -> None:
    """Set the codec's factors from ``stats`` and record the statistics in its metadata."""
    codec.set_factors(**factors_from_stats(stats, normalisation))
    codec.meta["latent_stats"] = {k: v for k, v in stats.items() if k != "skipped"}
