"""The tiny latent-diffusion run of BENCHMARKS.md / README: compress BSDS500 (train + val) with
a trained codec, train ``configs/ldm-tiny.yaml`` on the latents on the CPU, report timings,
the loss at the start and the end, and where the decoded sample grid is.

    .venv/bin/python -m scripts.ldm_tiny --codec runs/bench-q2/codec --work /tmp/ldm-tiny --threads 1

Everything is written under --work (never into the repository).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from codec.cli import main as vae_codec
from train.ldm import main as train_ldm

REPO = Path(__file__).resolve().parents[1]


def losses(run: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codec", required=True)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bsds500"))
    parser.add_argument("--work", default="/tmp/ldm-tiny")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 avoids thrashing on a shared CPU")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = sorted(p for split in ("train", "val") for p in (Path(args.data) / split).glob("*.jpg"))
    listing = work / "bsds500_trainval.txt"
    listing.write_text("".join(f"{p}\n" for p in files))

    t0 = time.perf_counter()
    assert vae_codec(["compress", "--codec", args.codec, "--input", str(listing),
                      "--output", str(work / "latents"), "--resolution", str(args.resolution),
                      "--store", "mean_std", "--num-workers", "1"]) == 0
    t1 = time.perf_counter()
    run = work / "run"
    argv = [str(REPO / "configs" / "ldm-tiny.yaml"), "--set", f"data.latents={work / 'latents'}",
            "--set", f"output_dir={run}", *[x for s in args.overrides for x in ("--set", s)]]
    assert train_ldm(argv) == 0
    t2 = time.perf_counter()
    curve = losses(run)
    head = sum(v for _, v in curve[:3]) / len(curve[:3])
    tail = sum(v for _, v in curve[-3:]) / len(curve[-3:])
    print(f"compress: {len(files)} images in {t1 - t0:.1f} s; train.ldm: {t2 - t1:.1f} s")
    print(f"loss (mean of 3 logged points): start {head:.4f} (steps {[s for s, _ in curve[:3]]}), "
          f"end {tail:.4f} (steps {[s for s, _ in curve[-3:]]})")
    print(f"samples: {sorted((run / 'samples').glob('*.png'))[-1]}")


if __name__ == "__main__":
    main()
