"""Loop overhead: images/s of our training loop against a plain hand-written PyTorch loop.

Both train the same preset on the same 64 crops with the same loss (L1 + 1e-6 KL, no LPIPS, no
GAN), optimiser and precision. Ours is the real ``train.autoencoder.loop.train`` (accelerate, data loader with
workers, accumulation bookkeeping, EMA, logging); its start-up and final export are removed by
differencing two runs of N1 and N2 steps. The plain loop runs over tensors already in memory.
Runs alternate in one process; we report min and median over repeats.

    python -m scripts.bench_loop_overhead --data ../shared/data/bsds500/train
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def speedup(slower: list[float], faster: list[float], digits: int = 2) -> str:
    """How much faster ``faster`` is: median over median, min over min, and per repeat."""
    per_repeat = ", ".join(f"{a / b:.{digits}f}" for a, b in zip(slower, faster))
    return (f"median {statistics.median(slower) / statistics.median(faster):.{digits}f}x, "
            f"min vs min {min(slower) / min(faster):.{digits}f}x, per repeat {per_repeat}")


def plain_loop(preset: str, crops: torch.Tensor, steps: int, batch: int, lr: float, precision: str) -> float:
    """Seconds for ``steps`` optimiser steps of a hand-written loop (keeping freed memory as ours
    does on CPUs, so that the difference is the loop's)."""
    from codec.host_memory import keeping_freed_memory
    from codec.models import build_autoencoder

    with keeping_freed_memory(True):
        torch.manual_seed(0)
        vae = build_autoencoder(preset).train()
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        for step in range(steps + 1):  # the first, untimed: one-time costs, as ours' differencing drops them
            if step == 1:
                start = time.perf_counter()
            i = (step * batch) % (len(crops) - batch + 1)
            x = crops[i : i + batch]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample()).sample
            recon = recon.float()
            loss = (x - recon).abs().sum() / batch + 1e-6 * posterior.kl().sum() / batch
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def our_overrides(preset: str, data: Path, steps: int, batch: int, crop: int, lr: float, ema: float,
                  precision: str, out: Path, recipe: tuple[str, ...] = ()) -> list[str]:
    """``key=value`` settings over ``configs/tiny.yaml`` for a benchmark run of ``python -m train``."""
    return [
        f"model.preset={preset}", f"data.train={data}", f"output_dir={out}", f"max_steps={steps}",
        f"batch_size={batch}", f"data.crop_size={crop}", f"optim.lr={lr}", "optim.warmup_steps=0",
        "optim.schedule=constant", "loss.perceptual_weight=0", f"ema_decay={ema}",
        "loss.reconstruction=l1", f"mixed_precision={precision}",
        "checkpoint_every=100000", "image_every=0", "log_every=10", "data.num_workers=1", *recipe,
    ]  # fmt: skip


def our_loop(preset: str, data: Path, steps: int, batch: int, crop: int, lr: float, ema: float,
             precision: str, out: Path, recipe: tuple[str, ...] = ()) -> float:
    """Seconds for a whole ``train.autoencoder.loop.train`` run; ``recipe``: further ``key=value`` overrides
    (the loss above by default)."""
    from train.autoencoder.config import load_config
    from train.autoencoder.loop import train

    cfg = load_config(TINY, our_overrides(preset, data, steps, batch, crop, lr, ema, precision, out, recipe))
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bsds500" / "train"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n1", type=int, default=10)
    parser.add_argument("--n2", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="no", choices=["no", "bf16"], help="same for both loops")
    args = parser.parse_args(argv)

    from codec.images import list_images, load_image, pil_to_tensor, tensor_to_pil

    files = list_images(args.data)[:64]
    crops = torch.stack([pil_to_tensor(load_image(f))[:, : args.crop, : args.crop] for f in files])
    steps = args.n2 - args.n1
    rows = {"plain": [], "ours (EMA off)": [], "ours (EMA on)": []}
    with tempfile.TemporaryDirectory() as tmp:
        # Ours reads the same crops, saved losslessly at crop size: the comparison is about the
        # training step, not about decoding large JPEGs (which workers hide on a bigger machine).
        crop_dir = Path(tmp) / "crops"
        crop_dir.mkdir()
        for i, pil in enumerate(tensor_to_pil(crops)):
            pil.save(crop_dir / f"{i:03d}.png")
        for r in range(args.repeats):
            rows["plain"].append(plain_loop(args.preset, crops, steps, args.batch, 5e-4, args.precision))
            for name, ema in (("ours (EMA off)", 0.0), ("ours (EMA on)", 0.999)):
                common = (args.preset, crop_dir)
                rest = (args.batch, args.crop, 5e-4, ema, args.precision)
                t1 = our_loop(*common, args.n1, *rest, Path(tmp) / f"a{r}{ema}")
                t2 = our_loop(*common, args.n2, *rest, Path(tmp) / f"b{r}{ema}")
                rows[name].append(t2 - t1)
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in rows.items()), flush=True)
    ips = {k: [steps * args.batch / t for t in v] for k, v in rows.items()}
    base = statistics.median(ips["plain"])
    print(f"\n{args.preset}, crop {args.crop}, batch {args.batch}, precision {args.precision}, "
          f"{steps} steps per timing, {args.repeats} repeats")
    print("| loop | images/s min | images/s median | overhead vs plain (median) |")
    print("|---|---|---|---|")
    for k, v in ips.items():
        print(f"| {k} | {min(v):.2f} | {statistics.median(v):.2f} | {100 * (1 - statistics.median(v) / base):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
