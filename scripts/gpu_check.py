"""GPU figures in one command: training images/s, encode/decode images/s and peak memory.

    python -m scripts.gpu_check                       # sd-kl-f8 at 256², bf16 (fp16 without native bf16)
    python -m scripts.gpu_check --preset small --size 512 --precision fp16
    python -m scripts.gpu_check --device cpu --preset test --size 32 --steps 2   # a smoke run anywhere

Correctness on the GPU is ``pytest -m gpu`` (tests/test_gpu.py); this script measures.

* **training**: ``python -m train`` (reconstruction + VGG-LPIPS + KL + PatchGAN from step 0,
  EMA, clipping) on ``--size`` crops, run twice, for ``--warmup`` and ``--warmup + --steps``
  steps, after an untimed one-step run that pays what only a process's first run pays (the CUDA
  context, kernel loading, first imports): the difference of the two wall times divided by
  ``--steps`` is the time per step without start-up, loading and export, so images/s = batch /
  that. Training runs where ``python -m train`` does, on accelerate's device: ``--device`` must be
  that one (``cuda`` for GPU 0; ``CUDA_VISIBLE_DEVICES=N`` picks another). LPIPS weights must be
  available offline (docs/evaluation.md, "Offline LPIPS weights"), else ``--no-lpips``.
* **codec**: ``Codec.encode`` and ``Codec.decode`` of ``--batch`` random images at ``--size``
  in ``--precision``, timed with CUDA synchronisation after ``--warmup`` untimed batches;
  peak memory is ``torch.cuda.max_memory_allocated`` of each, reset before it.

Prints one JSON object and a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def write_images(folder: Path, count: int, size: int) -> Path:
    """Random-textured images a little larger than the crop (the data is not what is measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = rng.integers(0, 256, (size + 16, size + 24, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return folder


def training_seconds(args, data: Path, out: Path, steps: int) -> float:
    from train.autoencoder.config import load_config
    from train.autoencoder.loop import train

    sets = [f"model.preset={args.preset}", f"data.train={data}", f"output_dir={out}", f"max_steps={steps}",
            f"batch_size={args.batch}", f"data.crop_size={args.size}", f"mixed_precision={args.precision}",
            "loss.disc_weight=0.5", "loss.disc_start=0", "optim.max_grad_norm=1.0", "ema_decay=0.999",
            f"loss.perceptual_weight={0 if args.no_lpips else 1.0}", "checkpoint_every=1000000",
            "image_every=0", "val_every=0", "log_every=10", "data.num_workers=4", "scale_samples=4"]
    cfg = load_config(None, sets)
    start = time.perf_counter()
    train(cfg)
    return time.perf_counter() - start


def codec_rates(args, device: torch.device) -> dict:
    from codec import Codec
    from codec.models import build_autoencoder

    torch.manual_seed(0)
    dtype = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    codec = Codec(build_autoencoder(args.preset), device=device, dtype=dtype, batch_size=args.batch)
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    rows = {}
    for name, fn, arg in (("encode", codec.encode, x), ("decode", codec.decode, None)):
        arg = arg if arg is not None else codec.encode(x)
        for _ in range(args.warmup):
            fn(arg)
        sync(device)
        reset_peak(device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn(arg)
        sync(device)
        seconds = (time.perf_counter() - start) / args.repeats
        rows[name] = {"images_per_s": round(args.batch / seconds, 2), "peak_mb": peak_mb(device)}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd-kl-f8")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps / codec batches")
    parser.add_argument("--repeats", type=int, default=5, help="timed codec batches")
    parser.add_argument("--no-lpips", action="store_true", help="train without the perceptual term")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; pass --device cpu for a smoke run")
    training_device = "cuda" if torch.cuda.is_available() else "cpu"  # accelerate's, as python -m train's
    if device.type != training_device or (device.index or 0) != 0:
        parser.error(f"training runs on accelerate's device ({training_device}), not {args.device}: "
                     "pass --device cuda, and CUDA_VISIBLE_DEVICES=N for GPU N")
    if args.precision == "auto":
        from train.common.session import resolve_mixed_precision

        args.precision = resolve_mixed_precision("auto") if device.type == "cuda" else "no"
    if device.type == "cpu":
        args.no_lpips = True  # a smoke run needs no downloaded weights

    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "preset": args.preset, "size": args.size, "batch": args.batch, "precision": args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_images(Path(tmp) / "images", max(4 * args.batch, 16), args.size)
        training_seconds(args, data, Path(tmp) / "first", 1)  # untimed: the process's one-time costs
        short = training_seconds(args, data, Path(tmp) / "a", args.warmup)
        long = training_seconds(args, data, Path(tmp) / "b", args.warmup + args.steps)
    if long <= short:
        raise SystemExit(f"the {args.warmup + args.steps}-step run ({long:.1f} s) was not slower than the "
                         f"{args.warmup}-step one ({short:.1f} s): timings too noisy, raise --steps")
    per_step = (long - short) / args.steps
    result["train_images_per_s"] = round(args.batch / per_step, 2)
    result.update(codec_rates(args, device))
    print(json.dumps(result, indent=1))
    print(f"\n| device | preset | size | precision | train images/s | encode images/s (peak MB) | "
          f"decode images/s (peak MB) |\n|---|---|---|---|---|---|---|\n| {result['device']} | {args.preset} | "
          f"{args.size}² | {args.precision} | {result['train_images_per_s']} | "
          f"{result['encode']['images_per_s']} ({result['encode']['peak_mb']}) | "
          f"{result['decode']['images_per_s']} ({result['decode']['peak_mb']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
