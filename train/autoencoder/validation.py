"""Validation: reconstruction metrics and a picture of fixed held-out images (``data.val``),
logged to the trackers (main process only)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from codec.evaluation.metrics import LPIPSMetric, evaluate_pairs, summarize
from codec.images import make_grid_image
from train.autoencoder.data import gather_files, load_validation_images
from train.autoencoder.export import eval_codec
from train.autoencoder.state import Run


class Validation:
    """Reconstruction metrics and a picture of fixed validation images (main process only)."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.run = run
        self.images, used = (load_validation_images(gather_files(cfg.data.val), cfg.data.val_images,
                                                    cfg.data.val_crop)
                             if cfg.data.val and run.is_main else ([], []))
        for entry in used:
            if entry.startswith("skipped: "):  # unusable validation file: say so, never drop it silently
                print(f"validation {entry}")
        self.names = [Path(e).name for e in used if not e.startswith("skipped: ")]  # labels of the grid
        self.lpips = LPIPSMetric("alex", run.accelerator.device) if len(self.images) else None

    def __bool__(self) -> bool:
        return bool(len(self.images))

    def __call__(self) -> dict:
        run = self.run
        codec = eval_codec(run)
        batches = [self.images] if isinstance(self.images, torch.Tensor) else list(self.images)
        pairs = [(b, codec.reconstruct(b)) for b in batches]
        per_image = evaluate_pairs(pairs, self.lpips)
        stats = {f"val/{k}": summarize(v)["mean"] for k, v in per_image.items()}
        run.accelerator.log(stats, step=run.state.step)
        x, y = pairs[0]
        shown = len(x[:8])
        labels = [self.names[:shown], [f"{v:.1f} dB" for v in per_image["psnr"][:shown]]]  # names; PSNR
        grid = make_grid_image([x[:8], y[:8]], run.out / "samples" / f"val_{run.state.step:08d}.png", labels)
        _log_image(run.accelerator, "val/reconstruction", grid, run.state.step)
        return stats


def _log_image(accelerator: Accelerator, tag: str, path: Path, step: int) -> None:
    import numpy as np
    from PIL import Image

    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image(tag, np.asarray(Image.open(path)), step, dataformats="HWC")
