"""How a trainer's command ends: the exit code and one line for what the user can fix.

``python -m train``, ``python -m train.distill`` and ``python -m train.ldm`` run their work
through :func:`run_command`. Known user errors (a bad path, a run folder that exists, data too
small, a setting the data cannot serve: ``ValueError`` and ``OSError``) print one line naming the
problem and exit 2; an interrupted run (checkpoint saved) exits 130; a run stopped by non-finite
losses or a checkpoint that could not be written exits 1 with its message. Anything else is a
bug and keeps its traceback. ``VAE_CODEC_TRACEBACK=1`` shows the traceback of every error.
"""

from __future__ import annotations

import os
import sys


def run_command(module: str, work) -> int:
    """``work()`` -> the command's exit code (see the module docstring)."""
    from train.common.checkpoints import CheckpointError
    from train.common.guards import NonFiniteLossError
    from train.common.steps import TrainingInterrupted

    try:
        work()
    except TrainingInterrupted:
        return 130  # the shell's code for Ctrl-C; the checkpoint is saved and was announced
    except (NonFiniteLossError, CheckpointError, ValueError, OSError) as exc:
        if os.environ.get("VAE_CODEC_TRACEBACK"):
            raise
        print(f"python -m {module}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, (NonFiniteLossError, CheckpointError)) else 2
    return 0
