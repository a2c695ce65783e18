"""Tiled decoding: peak memory vs output size, and seam quality vs untiled (ours and diffusers).

    python -m scripts.bench_tiling memory --method exact  # small preset, random weights
    python -m scripts.bench_tiling seams --codec runs/bench-q2/codec --images ../shared/data/kodak

``memory``: each output size is decoded in a fresh subprocess (so peak RSS is that decode's
alone); reported are the peak RSS (``ru_maxrss``), the RSS after loading the model and
allocating the latents, and the output buffer (3 x H x W float32) that must grow with the
image. ``seams``: PSNR of tiled against untiled decoding of the same latents (images that fit
untiled), for each of our methods and for diffusers' ``enable_tiling()`` at the same tile
size, with the seconds of each beside the untiled decode's, measured in the same process one
after the other (one torch thread unless ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one_decode(preset: str, size: int, tile: int, method: str, untiled: bool) -> dict:
    from codec import Codec
    from codec.models import build_autoencoder

    torch.manual_seed(0)
    codec = Codec(build_autoencoder(preset), device="cpu", batch_size=1,
                  tile_size=None if untiled else tile, tile_method=method)
    z = torch.randn(1, 4, size // 8, size // 8)
    base = rss_mb()
    t = time.perf_counter()
    out = codec.decode(z)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"preset": preset, "size": size, "tiled": "no" if untiled else method,
            "base_rss_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
            "output_buffer_mb": round(out.numel() * 4 / 2**20, 1), "seconds": round(seconds, 1),
            "finite": bool(torch.isfinite(out).all())}


def memory(args) -> None:
    rows = []
    runs = [(s, False) for s in args.sizes] + [(s, True) for s in args.untiled_sizes]
    for size, untiled in runs:
        cmd = [sys.executable, "-m", "scripts.bench_tiling", "_one", args.preset, str(size), str(args.tile),
               args.method] + (["--untiled"] if untiled else [])
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        row["peak_minus_base_mb"] = round(row["peak_rss_mb"] - row["base_rss_mb"], 1)
        row["peak_minus_base_minus_output_mb"] = round(row["peak_minus_base_mb"] - row["output_buffer_mb"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| preset | output | tiled | peak RSS MB | RSS before decode MB | output buffer MB "
          "| peak - before - output MB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['size']}² | {r['tiled']} | {r['peak_rss_mb']} | {r['base_rss_mb']} | "
              f"{r['output_buffer_mb']} | {r['peak_minus_base_minus_output_mb']} | {r['seconds']} |")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


@torch.no_grad()
def seams(args) -> None:
    from codec import Codec
    from codec.images import list_images, load_image, pil_to_tensor
    from codec.tiling import tiled_decode

    torch.set_num_threads(args.threads)
    codec = Codec.from_pretrained(args.codec, device="cpu")
    vae = codec.vae
    files = list_images(args.images)[: args.num_images]
    results: dict[str, list[float]] = {}

    def record(key, value, seconds=None):
        results.setdefault(key, []).append(value)
        if seconds is not None:
            results.setdefault(key + " seconds", []).append(seconds)

    for f in files:
        x = pil_to_tensor(load_image(f))[None]
        z, _ = codec.posterior(x)
        start = time.perf_counter()
        ref = vae.decode(z).sample
        record("untiled", float("inf"), time.perf_counter() - start)
        for t in args.tiles:
            for method in args.methods:
                start = time.perf_counter()
                y = tiled_decode(vae, z, t, method=method)
                record(f"ours {method}, tile {t}", psnr(y, ref), time.perf_counter() - start)
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = t, t // 8
            start = time.perf_counter()
            y = vae.decode(z).sample
            record(f"diffusers enable_tiling(), tile {t}", psnr(y, ref), time.perf_counter() - start)
            vae.disable_tiling()
        print(f.name, {k: round(v[-1], 2) for k, v in results.items()}, flush=True)
    print(f"\n{len(files)} images ({files[0].name} ... {files[-1].name}), PSNR tiled vs untiled (dB), "
          "seconds per image and their ratio to the untiled decode's (median over images):")
    print("| method | mean dB | min dB | s per image | × untiled |")
    print("|---|---|---|---|---|")
    base = results["untiled seconds"]
    for k, v in results.items():
        if k.endswith("seconds") or k == "untiled":
            continue
        sec = results[k + " seconds"]
        ratio = sorted(s / b for s, b in zip(sec, base))[len(sec) // 2]
        print(f"| {k} | {sum(v) / len(v):.2f} | {min(v):.2f} | {sum(sec) / len(sec):.2f} | {ratio:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--preset", default="small")
    m.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    m.add_argument("--untiled-sizes", type=int, nargs="*", default=[1024])
    m.add_argument("--tile", type=int, default=512)
    m.add_argument("--method", default="exact", choices=("exact", "stats", "blend"))
    o = sub.add_parser("_one")
    o.add_argument("preset")
    o.add_argument("size", type=int)
    o.add_argument("tile", type=int)
    o.add_argument("method")
    o.add_argument("--untiled", action="store_true")
    s = sub.add_parser("seams")
    s.add_argument("--codec", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--num-images", type=int, default=3)
    s.add_argument("--tiles", type=int, nargs="+", default=[256, 512])
    s.add_argument("--methods", nargs="+", default=["exact", "stats", "blend"])
    s.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "_one":
        print(json.dumps(one_decode(args.preset, args.size, args.tile, args.method, args.untiled)))
    elif args.cmd == "memory":
        memory(args)
    else:
        seams(args)


if __name__ == "__main__":
    main()
