"""Make ``accelerate launch --cpu --num_processes N -m MODULE`` start N processes.

accelerate's CPU launcher starts a single process unless given an MPI hostfile, silently
dropping ``--num_processes``. Entry points (``python -m train``, ``python -m codec.compress``)
call :func:`relaunch_if_needed`: it reads N back from the launcher's command line (our parent
process, Linux ``/proc``) and starts N gloo workers with torch's elastic launcher instead.
No accelerate import here: the codec stays free of training dependencies.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def requested_cpu_processes() -> int:
    """N of ``accelerate launch --cpu --num_processes N`` when that launcher started us alone."""
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


def relaunch_if_needed(module: str, argv: list[str]) -> int | None:
    """Run ``python -m module argv`` in N CPU workers and return its exit code, or None when
    this process should simply do the work itself."""
    processes = requested_cpu_processes()
    if processes <= 1:
        return None
    print(f"starting {processes} CPU processes (torch.distributed.run, gloo backend)", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={processes}", "-m", module, *argv]
    return subprocess.call(cmd)
