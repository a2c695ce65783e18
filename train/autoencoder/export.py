"""A checkpoint's exportable codec: the EMA weights in a :class:`codec.Codec`, its latent factors
measured on training crops (the recipe decides how), written with the run's state."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset

from codec.codec import Codec
from codec.io import is_autoencoder_tiny
from codec.latents.scale import measure_dataset
from train.autoencoder.config import save_config, to_dict
from train.autoencoder.state import Run
from train.common import checkpoints as ckpt
from train.common import session as runs

# Crops for measuring the scaling factor use an "epoch" training never reaches, so they are
# fixed for the whole run and independent of the training order.
SCALE_EPOCH = 10**9


def eval_codec(run: Run) -> Codec:
    """A detached fp32 copy of the current weights (EMA where on) wrapped as a Codec."""
    # The copy's random initialisation must not advance the training RNG: a run that exports
    # at step N would otherwise diverge from one resumed at step N.
    with torch.random.fork_rng(devices=[]):
        # (AutoencoderTiny registers a block_out_channels its __init__ does not take: left out, no warning)
        copy = type(run.raw_vae).from_config({k: v for k, v in run.raw_vae.config.items()
                                              if not (k == "block_out_channels" and is_autoencoder_tiny(run.raw_vae))})
    with runs.ema_weights(run.ema, run.raw_vae.parameters()):
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in run.raw_vae.state_dict().items()})
    return Codec(copy, device=run.accelerator.device, batch_size=run.cfg.batch_size)


def export_codec(run: Run, dataset: Dataset, folder: Path) -> None:
    codec = eval_codec(run)
    stats = run.recipe.export_factors(codec, lambda: measure_training_latents(run, codec, dataset))
    codec.save_pretrained(folder, meta={"step": run.state.step, "ema": run.ema is not None,
                                        "latent_stats": stats, "train_config": to_dict(run.cfg)})


def measure_training_latents(run: Run, codec: Codec, dataset: Dataset) -> dict:
    """Latent statistics as `vae-codec scale` measures them: a seeded sample of the whole set."""
    images = (Listed(dataset.head(run.cfg.scale_samples)) if isinstance(dataset, IterableDataset)
              else ScaleCrops(dataset))
    stats = measure_dataset(codec, images, run.cfg.scale_samples, seed=run.cfg.seed)
    stats.pop("skipped")  # training crops never fail (bad files are replaced and recorded)
    return stats


def save_checkpoint(run: Run, dataset: Dataset) -> Path:
    gather_skipped(run)  # every rank's records into the checkpoint (each rank saves its state)

    def write_extras(folder: Path) -> None:
        save_config(run.cfg, folder / "config.yaml")
        (folder / "vae_config.json").write_text(json.dumps(ckpt.architecture(run.raw_vae.config), indent=2))
        export_codec(run, dataset, folder / "codec")

    return ckpt.save_checkpoint(run.accelerator, run.ckpt_dir, run.state.step, run.own_state(),
                                run.cfg.keep_checkpoints, write_extras)


class ScaleCrops(Dataset):
    """The training set as :func:`codec.latents.scale.measure_dataset` reads it: item ``i``'s crop
    of an epoch training never reaches (fixed for the run, independent of the training order);
    greyscale items (MNIST for the MLP VAE) as the RGB images Codec takes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        image = self.dataset[(i, SCALE_EPOCH)]["pixels"]
        return {"image": image.expand(3, -1, -1) if image.shape[0] == 1 else image, "error": None}


class Listed(Dataset):
    """Crops already read (a stream's head) as :func:`measure_dataset` reads them."""

    def __init__(self, images: list[torch.Tensor]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "error": None}


def gather_skipped(run: Run) -> None:
    """Merge the skip records of every process (each sees only its own batches); a collective:
    every rank calls it at the same point."""
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        for records in gather_object([run.state.skipped]):
            for key, reason in records.items():
                run.state.skipped.setdefault(key, reason)
