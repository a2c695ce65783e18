"""Checkpoint folders of a training run: naming, atomic completion, pruning, compatibility.

Layout::

    OUTPUT_DIR/checkpoints/step_00000500/
        model.safetensors, optimizer.bin, random_states_*.pkl, custom_checkpoint_*.pkl   (accelerate)
        config.yaml        the resolved training config
        vae_config.json    the architecture, to refuse resuming into a different model
        codec/             a diffusers folder (EMA weights where EMA is on) ready to export
        COMPLETE           written last: a folder without it is an interrupted save and ignored

A checkpoint is first written as ``step_XXXXXXXX.tmp`` and renamed when complete, so a job
killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^step_(\d{8})$")

# AutoencoderKL config keys that do not change the weights' shapes or meaning.
_IGNORED_KEYS = {"scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                 "sample_size", "_name_or_path", "_diffusers_version", "_class_name"}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def step_of(checkpoint: Path) -> int:
    m = _NAME.match(checkpoint.name)
    if not m:
        raise ValueError(f"{checkpoint} is not a checkpoint folder (expected step_XXXXXXXX)")
    return int(m.group(1))


def finish(tmp_dir: Path, final_dir: Path) -> None:
    """Mark ``tmp_dir`` complete and move it into place (replacing a stale folder of that name)."""
    (tmp_dir / COMPLETE).write_text("ok\n")
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale ``.tmp`` folders."""
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_dir.glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def architecture(vae_config) -> dict:
    return {k: v for k, v in dict(vae_config).items() if k not in _IGNORED_KEYS}


def check_compatible(checkpoint: Path, vae_config, filename: str = "vae_config.json") -> None:
    """Refuse to resume a checkpoint into a model of another architecture, naming the keys
    (``filename``: where the checkpoint keeps its model config)."""
    saved = json.loads((checkpoint / filename).read_text())
    now = architecture(vae_config)
    saved = {k: v for k, v in saved.items() if k not in _IGNORED_KEYS}
    # JSON turns tuples into lists; compare in that form.
    now = json.loads(json.dumps(now))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise ValueError(
            f"cannot resume from {checkpoint}: the model configuration changed ({details}). "
            "Resume with the model settings of that run, or start a new output_dir."
        )
