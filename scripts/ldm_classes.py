"""A class-conditional tiny latent diffusion run: MNIST digits as class folders, compressed with
``--labels folders``, ``python -m train.ldm`` on the latents, one sample row per digit.

    .venv/bin/python -m scripts.ldm_classes --codec /work/exp/test300/codec --work /tmp/ldm-classes

Everything is written under --work (never into the repository).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from codec.cli import main as vae_codec
from train.ldm import main as train_ldm

REPO = Path(__file__).resolve().parents[1]


def write_digits(npz: Path, folder: Path, per_class: int, size: int) -> None:
    """``per_class`` training digits of each class as RGB PNGs in ``folder/<digit>/``."""
    data = np.load(npz)
    x, y = data["x_train"], data["y_train"]
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(y == digit)[:per_class]):
            image = Image.fromarray(x[i]).convert("RGB").resize((size, size), Image.BICUBIC)
            image.save(folder / str(digit) / f"{n}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", default=None, help="the codec to compress with (required unless --only-digits)")
    parser.add_argument("--only-digits", action="store_true",
                        help="write the digit folders and stop (to train a codec on them)")
    parser.add_argument("--mnist", default=str(REPO.parent / "shared" / "data" / "mnist" / "mnist.npz"))
    parser.add_argument("--work", default="/tmp/ldm-classes")
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    work = Path(args.work)
    write_digits(Path(args.mnist), work / "digits", args.per_class, args.size)
    if args.only_digits:
        print(f"digits written to {work / 'digits'}")
        return
    if args.codec is None:
        parser.error("--codec is required (or --only-digits)")
    t0 = time.perf_counter()
    assert vae_codec(["compress", "--codec", args.codec, "--input", str(work / "digits"), "--output",
                      str(work / "latents"), "--resolution", str(args.size), "--store", "mean_std",
                      "--labels", "folders", "--num-workers", "1"]) == 0
    t1 = time.perf_counter()
    run = work / "run"
    sets = ["data.latents=" + str(work / "latents"), f"output_dir={run}", "num_samples=40", *args.overrides]
    assert train_ldm([str(REPO / "configs" / "ldm-tiny.yaml"), *[x for s in sets for x in ("--set", s)]]) == 0
    t2 = time.perf_counter()
    print(f"compress: {10 * args.per_class} digits in {t1 - t0:.1f} s; train.ldm: {t2 - t1:.1f} s")
    print(f"per-class samples (rows: digits 0-7): {sorted((run / 'samples').glob('*.png'))[-1]}")


if __name__ == "__main__":
    main()
