"""Peak memory of a piece of work, on the device it runs on.

* CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus what was allocated
  before (tensors the caching allocator handed out; the cache itself is not counted).
* CPU on Linux: the process's resident-set high-water mark (``VmHWM``), reset before the work by
  writing ``5`` to ``/proc/self/clear_refs``, minus the resident size before (``VmRSS``).
  torch's CPU allocator bypasses Python's, so ``tracemalloc`` would miss tensors entirely.
* Elsewhere: the growth of ``resource.getrusage().ru_maxrss``, a lower bound (the mark cannot
  be reset, so work that stays under an earlier peak reads as 0).
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} missing from {_STATUS}")
    return int(match.group(1))


def _can_reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


class PeakMemory:
    """Tracks the largest extra memory any ``with tracker:`` block needed; see the module doc."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated (tensors on the GPU)"
        elif _can_reset_hwm():
            self.method = "process resident memory high-water mark (Linux VmHWM, reset per call)"
        else:
            self.method = "growth of ru_maxrss (lower bound: the mark cannot be reset)"
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("process"):
            self._base = _status_kib("VmRSS") * 1024
            _CLEAR_REFS.write_text("5")  # VmHWM := current RSS
        else:
            self._base = _maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("process"):
            peak = _status_kib("VmHWM") * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(self.peak_bytes, peak - self._base)
