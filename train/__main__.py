"""``python -m train CONFIG [--set a.b=c ...]`` (also under ``accelerate launch -m train``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .config import load_config, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a kl-f8 autoencoder (KL + reconstruction + LPIPS [+ PatchGAN]) under accelerate.",
    )
    parser.add_argument("config", nargs="?", help="YAML file overriding the defaults (configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set optim.lr=2e-4 --set data.train=/data/images",
    )
    args = parser.parse_args(argv)
    processes = requested_cpu_processes()
    if processes > 1:
        return relaunch_on_cpu(processes, sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    from .loop import train  # imported late: `--help` and config errors stay instant

    train(cfg)
    return 0


def requested_cpu_processes() -> int:
    """N of ``accelerate launch --cpu --num_processes N`` when that launcher started us alone.

    accelerate's CPU launcher starts a single process unless given an MPI hostfile, silently
    dropping ``--num_processes``. We read N back from the launcher's command line (our parent
    process, Linux /proc) so the command does what it says. 1 in every other situation.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "WORLD_SIZE" in os.environ:
        return 1
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 1
    if not any(arg.endswith("launch") for arg in parent):  # accelerate launch, -m accelerate.commands.launch
        return 1
    for i, arg in enumerate(parent):
        if arg == "--num_processes" and i + 1 < len(parent) and parent[i + 1].isdigit():
            return int(parent[i + 1])
        if arg.startswith("--num_processes=") and arg.split("=", 1)[1].isdigit():
            return int(arg.split("=", 1)[1])
    return 1


def relaunch_on_cpu(processes: int, argv: list[str]) -> int:
    """Start ``processes`` CPU workers with torch's elastic launcher (gloo), as accelerate does on GPUs."""
    print(f"starting {processes} CPU processes (torch.distributed.run, gloo backend)", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={processes}", "-m", "train", *argv]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
