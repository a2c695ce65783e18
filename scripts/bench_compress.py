"""Compression benchmark: ``vae-codec compress`` end to end against the bare encoder.

1. Throughput. The same images, the same batch size, the same codec:
   * encoder only: the images already decoded, resized and cropped to uint8 tensors in memory;
     timed is what the encoder side of the job does (uint8 -> [-1, 1], posterior, scaling,
     cast to the storage dtype);
   * end to end: ``codec.latents.compress.compress`` on the image files (listing, decoding and resizing
     in DataLoader workers, encoding, shard and manifest writing). Its fixed start-up (loading
     and hashing the codec, starting workers) is measured on a one-image job and reported apart.
   Runs alternate; min and median over repeats.
2. Peak memory (max RSS of the main process and of the largest worker) compressing N and 10 N
   images, each job in a fresh subprocess.
3. Size on disk per image: latent shards against the source files.

``--flip-compare`` instead times end-to-end jobs with and without ``--flip`` (the mirrored
image's latents stored too) on the same images, alternating, and reports the ratio.

    python -m scripts.bench_compress --preset tiny --resolution 128 --images 100
    python -m scripts.bench_compress --source ../shared/data/bsds500/train   # real JPEGs, repeated
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codec.factors import scale_latents

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, source: Path | None, size: tuple[int, int]) -> None:
    """``count`` JPEGs: generated smooth images, or the files of ``source`` repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    if source is not None:
        from codec.images import list_images

        files = list_images(source)
        for i in range(count):
            src = files[i % len(files)]
            shutil.copy(src, folder / f"{i:06d}{src.suffix.lower()}")
        return
    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(count):
        a, b, f = rng.uniform(-1, 1, (3, 3, 1, 1))
        img = 0.5 + 0.25 * np.sin(6 * f * xx + a) * np.cos(5 * f * yy + b)  # (3, H, W)
        img += rng.normal(0, 0.03, img.shape)  # texture, so JPEG sizes look like photos'
        rgb = (np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(rgb).save(folder / f"{i:06d}.jpg", quality=90)


def encoder_only(codec, tensors: list[torch.Tensor], batch: int, storage: torch.dtype) -> float:
    start = time.perf_counter()
    for i in range(0, len(tensors), batch):
        x = torch.stack(tensors[i : i + batch]).to(codec.device).float().div_(127.5).sub_(1.0)
        mean, _ = codec.posterior(x)
        scale_latents(mean, codec.vae.config).to(storage)
    return time.perf_counter() - start


def end_to_end(codec_dir: Path, images: Path, out: Path, args, flip: bool = False) -> float:
    from codec.latents.compress import compress

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    compress(codec_dir, images, out, resolution=args.resolution, batch_size=args.batch_size,
             num_workers=args.num_workers, device=args.device, progress=False, flip=flip)
    return time.perf_counter() - start


def flip_compare(codec_dir: Path, images: Path, work: Path, args) -> None:
    """End to end with and without --flip on the same images, alternating; min and median."""
    times = {False: [], True: []}
    end_to_end(codec_dir, images, work / "warm", args)
    for _ in range(args.repeats):
        for flip in (False, True):
            times[flip].append(end_to_end(codec_dir, images, work / f"flip{flip}", args, flip=flip))
    rate = {f: {"max": args.images / min(t), "median": args.images / statistics.median(t)} for f, t in times.items()}
    sizes = {f: json.loads((work / f"flip{f}" / "manifest.json").read_text())["summary"]["bytes"] for f in times}
    print(json.dumps({"plain_img_s": rate[False], "flip_img_s": rate[True], "bytes": sizes,
                      "seconds": {str(f): t for f, t in times.items()}}, indent=2))
    print(f"\n--flip: {rate[True]['median']:.1f} img/s (max {rate[True]['max']:.1f}) against "
          f"{rate[False]['median']:.1f} (max {rate[False]['max']:.1f}) without, "
          f"{rate[True]['median'] / rate[False]['median']:.2f}x; shards {sizes[True] / sizes[False]:.2f}x the bytes")


PEAK_SNIPPET = (
    "import resource, sys; from codec.compress import main; rc = main(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def peak_memory_mb(codec_dir: Path, images: Path, out: Path, args) -> tuple[float, float]:
    """(main process, largest worker) max RSS in MB of one compress job in a fresh process."""
    cmd = [
        sys.executable, "-c", PEAK_SNIPPET, "--codec", str(codec_dir), "--input", str(images),
        "--output", str(out), "--resolution", str(args.resolution),
        "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
        "--shard-size", str(args.shard_size), "--no-progress",
    ]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    line = next(row for row in proc.stdout.splitlines() if row.startswith("PEAK"))
    _, main_kb, child_kb = line.split()
    return int(main_kb) / 1024, int(child_kb) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="codec preset (freshly initialised)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--images", type=int, default=100,
                        help="N: throughput on N images, peak memory on N and 10 N")
    parser.add_argument("--source", type=Path, default=None,
                        help="real images to repeat (default: generated)")
    parser.add_argument("--size", type=int, nargs=2, default=[192, 256], metavar=("H", "W"),
                        help="size of the generated images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=100, help="for the memory runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--flip-compare", action="store_true", help="only time jobs with and without --flip")
    args = parser.parse_args(argv)

    from codec import Codec
    from codec.latents.inputs import fit, list_inputs, read_input
    from codec.models import build_autoencoder

    work = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    try:
        torch.manual_seed(0)
        vae = build_autoencoder(args.preset)
        codec = Codec(vae, device=args.device, batch_size=args.batch_size)
        codec_dir = codec.save_pretrained(work / "codec")
        n = args.images
        if args.flip_compare:
            make_images(work / "flipsrc", n, args.source, tuple(args.size))
            flip_compare(codec_dir, work / "flipsrc", work, args)
            return 0
        make_images(work / "big", 10 * n, args.source, tuple(args.size))
        small = work / "small"
        small.mkdir()
        for p in sorted((work / "big").iterdir())[:n]:
            shutil.copy(p, small / p.name)
        one = work / "one"
        one.mkdir()
        shutil.copy(next(iter(sorted(small.iterdir()))), one)
        tensors = [fit(read_input(i), args.resolution)[0] for i in list_inputs(small)]

        enc, e2e, startup = [], [], []
        encoder_only(codec, tensors[: args.batch_size], args.batch_size, torch.float16)  # warm-up
        for _ in range(args.repeats):
            enc.append(encoder_only(codec, tensors, args.batch_size, torch.float16))
            e2e.append(end_to_end(codec_dir, small, work / "out", args))
            startup.append(end_to_end(codec_dir, one, work / "out1", args))
        fixed = min(startup)
        enc_rate = {"max": n / min(enc), "median": n / statistics.median(enc)}
        e2e_rate = {"max": n / min(e2e), "median": n / statistics.median(e2e)}
        steady = {"max": n / (min(e2e) - fixed), "median": n / (statistics.median(e2e) - fixed)}
        results = {
            "preset": args.preset, "resolution": args.resolution, "images": n,
            "batch_size": args.batch_size, "num_workers": args.num_workers,
            "device": str(codec.device), "torch_threads": torch.get_num_threads(),
            "encoder_img_s": enc_rate,
            "end_to_end_img_s": e2e_rate,
            "end_to_end_minus_startup_img_s": steady,
            "startup_s": fixed,
            "ratio_end_to_end": e2e_rate["median"] / enc_rate["median"],
            "ratio_minus_startup": steady["median"] / enc_rate["median"],
        }

        mem = {}
        for count, folder in ((n, small), (10 * n, work / "big")):
            mem[count] = peak_memory_mb(codec_dir, folder, work / f"mem{count}", args)
        results["peak_rss_mb"] = {
            str(k): {"main": main_mb, "largest_worker": worker_mb}
            for k, (main_mb, worker_mb) in mem.items()
        }
        results["peak_ratio_10n_vs_n"] = mem[10 * n][0] / mem[n][0]

        summary = json.loads((work / f"mem{10 * n}" / "manifest.json").read_text())["summary"]
        src_bytes = sum(p.stat().st_size for p in (work / "big").iterdir())
        per_image = {"source": src_bytes / (10 * n), "latents": summary["bytes"] / summary["encoded"]}
        results["bytes_per_image"] = per_image

        print(json.dumps(results, indent=2))
        print(
            f"\nencoder only {enc_rate['median']:.1f} img/s (max {enc_rate['max']:.1f}); "
            f"end to end {e2e_rate['median']:.1f} img/s (max {e2e_rate['max']:.1f}) = "
            f"{100 * results['ratio_end_to_end']:.0f}% "
            f"({100 * results['ratio_minus_startup']:.0f}% without the {fixed:.2f} s start-up); "
            f"peak RSS {mem[n][0]:.0f} MB ({n} images) vs {mem[10 * n][0]:.0f} MB ({10 * n}); "
            f"{per_image['latents'] / 1024:.1f} KiB of fp16 latents per image vs "
            f"{per_image['source'] / 1024:.1f} KiB of source"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
