"""Big images: encode / decode throughput (MP/s), peak RSS and page faults by image size, for the
untiled pass and the tiled paths, each run in a fresh process (so peak RSS is the run's own).

    python -m scripts.bench_big_images --preset tiny --sizes 0.4,2 --ops encode,decode \\
        --paths untiled,exact,stats --repeats 2
    python -m scripts.bench_big_images --preset tiny --sizes 10.6 --ops decode --paths untiled --keep both

``--keep both`` runs each configuration with glibc keeping freed memory (codec.host_memory, what
the CLI does on the CPU) and without. Sizes are megapixels of a 16:9 image (10.6: 4352x2448, the
photo of the report). Also prints the FLOPs of the mid block's attention, 4 n^2 d for n latent
positions: quadratic in the image size, while everything else is linear.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time


def image_size(megapixels: float) -> tuple[int, int]:
    """(H, W), 16:9, multiples of 8."""
    w = round(math.sqrt(megapixels * 1e6 * 16 / 9) / 8) * 8
    return round(megapixels * 1e6 / w / 8) * 8, w


def one(preset: str, op: str, megapixels: float, path: str, keep: bool) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from codec import Codec
    from codec.host_memory import keep_freed_memory
    from codec.models import build_autoencoder

    torch.manual_seed(0)
    h, w = image_size(megapixels)
    tiles = {"untiled": {}, "exact": dict(tile_size=512, tile_method="exact"),
             "stats": dict(tile_size=512, tile_method="stats")}[path]
    codec = Codec(build_autoencoder(preset), device="cpu", max_memory="1T", **tiles)  # the path asked for
    if keep:
        keep_freed_memory(True)
    x = torch.rand(1, 3, h, w) * 2 - 1 if op == "encode" else torch.randn(1, 4, h // 8, w // 8)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    codec.encode(x) if op == "encode" else codec.decode(x)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"preset": preset, "op": op, "mp": h * w / 1e6, "size": f"{w}x{h}", "path": path, "keep": keep,
            "seconds": seconds, "mp_per_s": h * w / 1e6 / seconds, "peak_rss_gib": after.ru_maxrss / 2**20,
            "minor_faults": after.ru_minflt - before.ru_minflt}


def attention_gflop(preset: str, megapixels: float) -> float:
    from codec.models import PRESETS

    h, w = image_size(megapixels)
    n, d = (h // 8) * (w // 8), PRESETS[preset]["block_out_channels"][-1]
    return 4 * n * n * d / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sizes", default="0.4,2,4,10.6", help="megapixels, comma-separated")
    p.add_argument("--ops", default="encode,decode")
    p.add_argument("--paths", default="untiled,exact,stats")
    p.add_argument("--keep", default="on", choices=["on", "off", "both"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="append the raw measurements to this file")
    p.add_argument("--one", nargs=5, metavar=("PRESET", "OP", "MP", "PATH", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        preset, op, mp, path, keep = args.one
        print(json.dumps(one(preset, op, float(mp), path, keep == "on")))
        return 0
    keeps = {"on": [True], "off": [False], "both": [True, False]}[args.keep]
    print("| preset | op | image | MP | path | keep freed | s (min / median) | MP/s (best) | peak RSS GiB "
          "| minor faults | attention GFLOP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mp in map(float, args.sizes.split(",")):
        for op in args.ops.split(","):
            for path in args.paths.split(","):
                for keep in keeps:
                    runs = []
                    for _ in range(args.repeats):  # fresh processes, alternating nothing else meanwhile
                        out = subprocess.run([sys.executable, "-m", "scripts.bench_big_images", "--one", args.preset,
                                              op, str(mp), path, "on" if keep else "off"],
                                             capture_output=True, text=True, check=True)
                        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.writelines(json.dumps(r) + "\n" for r in runs)
                    secs = [r["seconds"] for r in runs]
                    r = runs[0]
                    rss = max(x["peak_rss_gib"] for x in runs)
                    faults = statistics.median(x["minor_faults"] for x in runs)
                    print(f"| {args.preset} | {op} | {r['size']} | {r['mp']:.2f} | {path} | {'on' if keep else 'off'} "
                          f"| {min(secs):.1f} / {statistics.median(secs):.1f} | {r['mp'] / min(secs):.3f} "
                          f"| {rss:.2f} | {faults:.0f} | {attention_gflop(args.preset, mp):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
