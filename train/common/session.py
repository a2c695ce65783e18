"""What every training run shares, ``python -m train`` and ``python -m train.ldm`` alike: the
Accelerator, seeding, where to resume, the output folder and its logs, the weights an export
takes (EMA where on), and handing the final export over.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

from codec.host_memory import keeping_freed_memory as _keeping
from train.common import checkpoints as ckpt
from train.common.config import save_config, to_dict


class TrainState:
    """Counters saved with every checkpoint (see ``checkpoints.save_objects``)."""

    def __init__(self):
        self.step = 0
        self.skipped: dict[str, str] = {}  # file -> reason, across the whole run

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped = int(state["step"]), dict(state["skipped"])


def resolve_mixed_precision(choice: str) -> str:
    """ "auto": bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX512-BF16
    or AMX, where it is ~1.8x faster for the tiny preset), fp16 on older GPUs, else fp32."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        # Native bf16 only (Ampere and later): older GPUs would emulate it, far slower than fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def keeping_freed_memory(cfg):
    """``with keeping_freed_memory(cfg):`` the run; on CPU runs with ``keep_freed_memory`` the
    process keeps what a step frees for the next one (:mod:`codec.host_memory`)."""
    return _keeping(cfg.keep_freed_memory and not torch.cuda.is_available())


def start(cfg, grad_accum: int = 1, deterministic: bool = False) -> tuple[Accelerator, Path | None]:
    """The run's Accelerator, seeded, and the checkpoint to resume from (None: a fresh run).

    A fresh run refuses an output folder that already holds checkpoints (resume=true continues).
    """
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        # Without a GPU, processes started by torchrun / `accelerate launch` must be told they are
        # CPU workers, or each one believes it trains alone (and they overwrite each other).
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
    )
    if deterministic:
        # cuBLAS needs this workspace setting for reproducible matmuls (read at CUDA init).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(cfg.seed, deterministic=deterministic)
    ckpt_dir = out / "checkpoints"
    if not cfg.resume and ckpt.list_checkpoints(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints; pass --set resume=true to continue that run "
            "or choose another output_dir"
        )
    return accelerator, ckpt.latest_checkpoint(ckpt_dir) if cfg.resume else None


def seed_per_process(accelerator: Accelerator, seed: int, deterministic: bool = False) -> None:
    """Call once the models are built and prepared. Every process was seeded alike so that they
    start from the same weights; from here each draws its own noise (posterior samples, diffusion
    noise), or rank r would sample the very noise rank 0 samples for its j-th item. One process
    keeps ``seed``."""
    set_seed(seed + accelerator.process_index, deterministic=deterministic)


def resume(accelerator: Accelerator, checkpoint: Path | None, own_state: dict, state: TrainState) -> None:
    """Restore accelerate's state (models, optimisers, RNGs) and ours from ``checkpoint``."""
    if checkpoint is None:
        return
    ckpt.load_accelerate_state(accelerator, checkpoint)
    ckpt.load_objects(checkpoint, own_state)
    place_on(own_state, accelerator.device)
    accelerator.step = 0  # checkpoints are written at optimiser-step boundaries only
    if accelerator.is_main_process:
        print(f"resumed from {checkpoint} at step {state.step}")


def place_on(own_state: dict, device: torch.device) -> None:
    """Move restored state to the training device: checkpoints load onto the CPU, and an EMA whose
    shadow stayed there would mix CPU and GPU tensors at its first step after a resume."""
    for obj in own_state.values():
        if isinstance(obj, EMAModel):
            obj.to(device=device)


def open_output(accelerator: Accelerator, cfg) -> None:
    """Main process: the output folder, its config.yaml and the tensorboard tracker."""
    if not accelerator.is_main_process:
        return
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    accelerator.init_trackers("tensorboard", config=flat_scalars(to_dict(cfg)))


class ema_weights:
    """``with ema_weights(ema, params):`` the parameters hold the EMA shadow (what exports and
    validation use), restored afterwards; a no-op without EMA."""

    def __init__(self, ema, parameters):
        self.ema, self.parameters = ema, list(parameters)

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.parameters)


def final_checkpoint(ckpt_dir: Path, step: int, save) -> Path:
    """The checkpoint of the last step, saved now unless the loop just saved it."""
    final = ckpt_dir / ckpt.checkpoint_name(step)
    return final if (final / ckpt.COMPLETE).exists() else save()


def publish(source: Path, target: Path) -> None:
    """Copy the final checkpoint's export to where users find it (``output_dir/codec`` ...)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


def reset_accelerate() -> None:
    """accelerate keeps its state in a process-wide singleton that refuses a second Accelerator
    with other settings (e.g. another mixed_precision); clear it so a run can follow another in
    the same process (tests, notebooks, benchmarks)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def flat_scalars(tree: dict, prefix: str = "") -> dict:
    """tensorboard hparams take scalars only: flatten sections, stringify lists."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flat_scalars(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def stop_reason(cfg, stopped_by: str | None) -> str:
    """What the last line of a run says about why it stopped (both trainers)."""
    if stopped_by == "max_steps":
        return f"max_steps {cfg.max_steps} reached"
    if stopped_by == "max_minutes":
        return f"max_minutes {cfg.max_minutes:g} reached; rerun with --set resume=true to go on"
    return f"nothing left to do: the run is at max_steps {cfg.max_steps}"
