"""Several processes: make ``accelerate launch --cpu --num_processes N -m MODULE`` start N
processes, and the state of a job launched with several (:func:`distributed_state`).

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
    return start_processes(module, argv, processes)


def distributed_state():
    """accelerate's PartialState when launched with several processes (torchrun, accelerate
    launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # Imported only here: work on one process must not need (or pay for) accelerate.
    import torch
    from accelerate import PartialState

    # Without a GPU, torchrun workers must be told they are CPU (gloo) processes.
    return PartialState(cpu=not torch.cuda.is_available())


def start_processes(module: str, argv: list[str], processes: int) -> int:
    """Run ``python -m module argv`` in ``processes`` workers on this machine (one per GPU where
    there are GPUs, gloo CPU workers otherwise) and return the exit code."""
    print(f"starting {processes} processes (torch.distributed.run)", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", module, *argv]
    return subprocess.call(cmd)


class Shares:
    """This process's share of a job over ``n`` items when launched with several processes (every
    ``world``-th item from ``rank``), or all of them alone; ``gather`` brings every process's
    piece to every process, in rank order."""

    def __init__(self):
        self.state = distributed_state()
        self.rank, self.world = (self.state.process_index, self.state.num_processes) if self.state else (0, 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def gather(self, piece) -> list:
        if self.world == 1:
            return [piece]
        import torch.distributed as dist

        pieces = [None] * self.world
        dist.all_gather_object(pieces, piece)
        return pieces
