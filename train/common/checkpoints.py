"""Checkpoint folders of a training run: naming, atomic completion, pruning, compatibility.

Layout::

    OUTPUT_DIR/checkpoints/step_00000500/
        model.safetensors, optimizer.bin, random_states_*.pkl   (accelerate; its torch.load
                                                     runs with weights_only=True)
        train_state.json, train_state.safetensors   step, skipped files, EMA, logvar (no pickle)
        config.yaml        the resolved training config
        vae_config.json    the architecture, to refuse resuming into a different model
        codec/             a diffusers folder (EMA weights where EMA is on) ready to export
        COMPLETE           written last: a folder without it is an interrupted save and ignored

A checkpoint is first written as ``step_XXXXXXXX.tmp`` and renamed when complete, so a job
killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^step_(\d{8})$")

# AutoencoderKL config keys that do not change the weights' shapes or meaning.
_IGNORED_KEYS = {"scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
                 "sample_size", "_name_or_path", "_diffusers_version", "_class_name",
                 # diffusers' bookkeeping, listed in set order (which differs between processes)
                 "_use_default_values"}


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (its partial folder removed; the message says what is left)."""


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
    try:
        saved = json.loads((checkpoint / filename).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resume from {checkpoint}: {filename} is unreadable ({exc})") from exc
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


# ------------------------------------------------------------------ our own training state
# accelerate's register_for_checkpointing pickles such objects and unpickles them on resume with
# torch.load(weights_only=False), i.e. a checkpoint could run code. Ours are written as JSON
# (numbers, strings) + safetensors (tensors) instead, and read back without any unpickling.
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
_TENSOR, _TENSORS = "__tensor__", "__tensors__"


def save_objects(folder: Path, objects: dict) -> None:
    """Write ``{name: obj}``'s ``obj.state_dict()`` into ``folder`` (tensors, lists of tensors
    and JSON values only)."""
    entries, tensors = {}, {}
    for name, obj in objects.items():
        entry = {}
        for key, value in obj.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {_TENSOR: f"{name}.{key}"}
            elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
                names = [f"{name}.{key}.{i}" for i in range(len(value))]
                tensors.update({n: v.detach().cpu().contiguous() for n, v in zip(names, value)})
                entry[key] = {_TENSORS: names}
            else:
                entry[key] = value
        entries[name] = entry
    (folder / STATE_JSON).write_text(json.dumps(entries, indent=1))
    save_file(tensors, str(folder / STATE_TENSORS))


def load_objects(folder: Path, objects: dict) -> None:
    """Restore what :func:`save_objects` wrote into the same named objects."""
    try:
        entries = json.loads((folder / STATE_JSON).read_text())
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"cannot resume from {folder}: its training state is unreadable ({exc})") from exc
    for name, obj in objects.items():
        if name not in entries:
            raise ValueError(f"cannot resume from {folder}: {STATE_JSON} has no {name!r} state")
        state = {}
        for key, value in entries[name].items():
            if isinstance(value, dict) and _TENSOR in value:
                value = tensors[value[_TENSOR]]
            elif isinstance(value, dict) and _TENSORS in value:
                value = [tensors[n] for n in value[_TENSORS]]
            state[key] = value
        obj.load_state_dict(state)


def load_accelerate_state(accelerator, folder: Path) -> None:
    """``accelerator.load_state`` with each pickle-based file first checked on its own, so a
    failure names the file. accelerate reads them with ``torch.load(weights_only=True)`` (plain
    tensors and numbers only: a file that would run code is refused) but only *logs* a failure
    to read the random states and resumes with other RNG states, i.e. not exactly."""
    from accelerate.utils import load as weights_only_load

    pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    pickled.append(folder / f"random_states_{accelerator.process_index}.pkl")
    for file in pickled:
        try:
            weights_only_load(file, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"cannot resume from {folder}: {file.name} is unreadable or holds more than plain "
                f"tensors and numbers (not unpickled, as that could run code): {first_line}"
            ) from exc
    accelerator.load_state(str(folder))


def save_checkpoint(accelerator, ckpt_dir: Path, step: int, own_state: dict, keep: int,
                    write_extras) -> Path:
    """Write ``step_XXXXXXXX`` atomically: accelerate's state, ``own_state`` (see
    :func:`save_objects`) and whatever ``write_extras(folder)`` adds (config, export), then
    mark it complete and prune. Every process calls this (accelerate writes per-process RNG
    states); the main process writes the rest."""
    name = checkpoint_name(step)
    tmp = ckpt_dir / f"{name}.tmp"
    if accelerator.is_main_process and tmp.exists():  # left by a run killed while saving this step
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        try:
            save_objects(tmp, own_state)
            write_extras(tmp)
            finish(tmp, ckpt_dir / name)
        except Exception as exc:  # never a half checkpoint, and say what is left
            shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(ckpt_dir)
            left = (f"the previous checkpoint {previous} is intact: fix the cause and rerun with resume=true"
                    if previous else "there is no earlier checkpoint to resume from")
            raise CheckpointError(f"the checkpoint of step {step} could not be written "
                                  f"({type(exc).__name__}: {exc}); {left}") from exc
        prune(ckpt_dir, keep)
    accelerator.wait_for_everyone()
    return ckpt_dir / name
