"""Start-up time of the commands that load no model: `vae-codec --help`, an argument error,
`python -m train --help`, `python -m train.ldm --help`, in two checkouts side by side.

    python -m scripts.bench_startup OLD_CHECKOUT NEW_CHECKOUT [--runs 5]

Each command runs as `python -m MODULE ...` with the checkout as working directory (so its own
packages are imported), alternating old and new, ``--runs`` times; min and median seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "vae-codec --help": ["-m", "codec.cli.parser", "--help"],
    "vae-codec encode (missing arguments)": ["-m", "codec.cli.parser", "encode"],
    "python -m train --help": ["-m", "train", "--help"],
    "python -m train.ldm --help": ["-m", "train.ldm", "--help"],
}


def seconds(checkout: str, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=checkout, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| command | before: min / median s | after: min / median s |\n|---|---|---|")
    for name, command in COMMANDS.items():
        times = {"old": [], "new": []}
        for _ in range(args.runs):
            for which in ("old", "new"):
                times[which].append(seconds(getattr(args, which), command))
        cells = [f"{min(t):.2f} / {statistics.median(t):.2f}" for t in (times["old"], times["new"])]
        print(f"| `{name}` | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
