"""CPU training with and without ``keep_freed_memory`` (:mod:`codec.host_memory`), side by side.

glibc's malloc settings are process-wide and cannot be put back exactly once changed, so each
run is a fresh ``python -m train`` process: the recipe of ``scripts.bench_vs_diffusers`` (tiny
preset, L1 + VGG-LPIPS + KL + PatchGAN from step 0, batch 4, 128² crops, fp32, EMA) on the same
64 crops, with ``keep_freed_memory`` off and on, alternating. Start-up and export are removed by
differencing runs of ``--n1`` and ``--n2`` steps; page faults are the children's minor faults
(``getrusage``), differenced the same way. Min and median over ``--repeats``.

    python -m scripts.bench_host_memory --data ../shared/data/bsds500/train --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench_loop_overhead import TINY, our_overrides, speedup
from scripts.bench_vs_diffusers import OUR_RECIPE, write_crops

REPO = Path(__file__).resolve().parents[1]


def run(crops: Path, steps: int, keep: bool, out: Path, threads: int) -> tuple[float, int]:
    """(seconds, minor page faults) of one ``python -m train`` process and its data workers."""
    settings = our_overrides("tiny", crops, steps, 4, 128, 1e-4, 0.999, "no", out, OUR_RECIPE)
    cmd = [sys.executable, "-m", "train", str(TINY), *(a for s in settings for a in ("--set", s)),
           "--set", f"keep_freed_memory={str(keep).lower()}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"python -m train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bsds500" / "train"))
    parser.add_argument("--n1", type=int, default=2)
    parser.add_argument("--n2", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    args = parser.parse_args(argv)

    steps = args.n2 - args.n1
    seconds = {False: [], True: []}
    faults = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        crops = Path(tmp) / "crops"
        write_crops(args.data, 64, 128, crops)
        for r in range(args.repeats):
            for keep in (False, True):
                t1, f1 = run(crops, args.n1, keep, Path(tmp) / f"a{r}{keep}", args.threads)
                t2, f2 = run(crops, args.n2, keep, Path(tmp) / f"b{r}{keep}", args.threads)
                seconds[keep].append((t2 - t1) / steps)
                faults[keep].append((f2 - f1) / steps)
            print(f"repeat {r}: " + ", ".join(f"keep={k}: {seconds[k][-1]:.3f} s/step, {faults[k][-1]:.0f} faults/step"
                                              for k in (False, True)), flush=True)

    print(f"\ntiny, 128² crops, batch 4, fp32, VGG-LPIPS + PatchGAN; {steps} steps per timing (runs of {args.n1} "
          f"and {args.n2}), {args.repeats} repeats, torch threads {args.threads}")
    print("| keep_freed_memory | s / step min | median | page faults / step (median) |")
    print("|---|---|---|---|")
    for keep in (False, True):
        v, f = seconds[keep], statistics.median(faults[keep])
        print(f"| {str(keep).lower()} | {min(v):.3f} | {statistics.median(v):.3f} | {f:.0f} |")
    print(f"\nspeed-up of keeping: {speedup(seconds[False], seconds[True], 3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
