"""One accelerate training function for the kl-f8 autoencoder, readable top to bottom.

Per optimiser step (house rule 7): ``accumulate(vae, disc)`` around both phases, the generator
phase (reconstruction + LPIPS + KL [+ GAN]) then the discriminator phase on detached
reconstructions; clipping, EMA, lr updates and step counting only when ``sync_gradients``.
Checkpoints are accelerate ``save_state`` folders (plus an exportable ``codec/``), written
atomically; ``resume=true`` continues from the exact step with the same data and RNG state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from codec.codec import Codec
from codec.images import make_grid_image
from codec.lpips_weights import load_lpips
from codec.metrics import LPIPSMetric, evaluate_pairs, summarize
from codec.models import build_autoencoder, count_parameters, load_autoencoder

from . import checkpoints as ckpt
from . import mlp_recipe
from .config import TrainConfig, save_config, to_dict, validate
from .data import CropDataset, EpochSampler, collate, gather_files, load_validation_images
from .discriminator import PatchDiscriminator
from .guards import NonFiniteGuard, StopSignals
from .losses import GeneratorLoss, disc_factor, discriminator_loss

# Crops for measuring the scaling factor use an "epoch" training never reaches, so they are
# fixed for the whole run and independent of the training order.
SCALE_EPOCH = 10**9


class Autoencoder(nn.Module):
    """Wraps ``AutoencoderKL`` so one forward call (through DDP) returns the posterior too."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor):
        posterior = self.vae.encode(x).latent_dist  # (B, 2*4, H/8, W/8) -> mean, logvar
        recon = self.vae.decode(posterior.sample()).sample  # sampled z, as in the LDM recipe
        return recon, posterior


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint (``.checkpoint``)."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class TrainState:
    """Counters saved with every checkpoint (see ``checkpoints.save_objects``)."""

    def __init__(self):
        self.step = 0
        self.skipped: dict[str, str] = {}  # file -> reason, across the whole run

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped = int(state["step"]), dict(state["skipped"])


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    if cfg.model.kind == "mlp-vae":
        return mlp_recipe.build_mlp_vae(cfg)
    if cfg.model.init_from:
        return load_autoencoder(cfg.model.init_from)
    return build_autoencoder(cfg.model.preset)


def resolve_mixed_precision(choice: str) -> str:
    """ "auto": bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX512-BF16
    or AMX, where it is ~1.8x faster for the tiny preset), fp16 on older GPUs, else fp32."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def learning_rate(cfg: TrainConfig, step: int, base: float) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio * base``."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return base * (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(cfg.max_steps - o.warmup_steps, 1)
        progress = min((step - o.warmup_steps) / span, 1.0)
        return base * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return base


def train(cfg: TrainConfig) -> Path:
    """Train according to ``cfg``; returns the exported codec folder (``output_dir/codec``)."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        # accelerate keeps its state in a process-wide singleton that refuses a second
        # Accelerator with other settings (e.g. another mixed_precision); clear it so train()
        # can run again in the same process (tests, notebooks, benchmarks).
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def _train(cfg: TrainConfig) -> Path:
    validate(cfg)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    accelerator = Accelerator(
        # Without a GPU, processes started by torchrun / `accelerate launch` must be told they are
        # CPU workers, or each one believes it trains alone (and they overwrite each other).
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
    )
    if cfg.deterministic:
        # cuBLAS needs this workspace setting for reproducible matmuls (read at CUDA init).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    is_main = accelerator.is_main_process

    resume_from = ckpt.latest_checkpoint(ckpt_dir) if cfg.resume else None
    if not cfg.resume and ckpt.list_checkpoints(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints; pass --set resume=true to continue that run "
            "or choose another output_dir"
        )

    # ---------------------------------------------------------------- model, loss, optimisers
    vae = build_vae(cfg)
    if resume_from:
        ckpt.check_compatible(resume_from, vae.config)
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.model.train_decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    # model.kind picks the network and its loss; everything else below is shared.
    mlp = cfg.model.kind == "mlp-vae"
    model = mlp_recipe.ELBOWrapper(vae) if mlp else Autoencoder(vae)
    lpips_model = load_lpips(cfg.loss.perceptual_net) if cfg.loss.perceptual_weight > 0 and not mlp else None
    gen_loss = GeneratorLoss(cfg.loss, lpips_model)
    elbo_loss = mlp_recipe.ELBOLoss(cfg) if mlp else None
    disc = (
        PatchDiscriminator(channels=cfg.loss.disc_channels, layers=cfg.loss.disc_layers)
        if cfg.loss.disc_weight > 0
        else None
    )

    scale = accelerator.num_processes * cfg.batch_size * cfg.grad_accum if cfg.optim.scale_lr else 1
    base_lr = cfg.optim.lr * scale
    base_disc_lr = (cfg.optim.disc_lr or cfg.optim.lr) * scale
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(
        trainable + ([gen_loss.logvar] if cfg.loss.learn_logvar else []),
        lr=base_lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
    )
    opt_d = (
        torch.optim.AdamW(disc.parameters(), lr=base_disc_lr, betas=tuple(cfg.optim.betas))
        if disc is not None
        else None
    )

    # ---------------------------------------------------------------- data
    if mlp:
        dataset, collate_fn = mlp_recipe.build_dataset(cfg), mlp_recipe.collate
    else:
        files = gather_files(cfg.data.train)
        dataset = CropDataset(files, cfg.data.crop_size, cfg.data.small_images, cfg.data.random_flip, cfg.seed)
        collate_fn = collate
    per_rank = len(dataset) // accelerator.num_processes
    batches_per_epoch = per_rank // cfg.batch_size
    if batches_per_epoch < 1:
        raise ValueError(
            f"{len(dataset)} training images are too few for batch_size {cfg.batch_size} on "
            f"{accelerator.num_processes} process(es)"
        )
    sampler = EpochSampler(
        len(dataset), cfg.seed, accelerator.process_index, accelerator.num_processes, cfg.batch_size
    )

    # ---------------------------------------------------------------- accelerate
    if disc is not None:
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    else:
        model, opt_g = accelerator.prepare(model, opt_g)
    gen_loss.to(accelerator.device)
    raw_vae = accelerator.unwrap_model(model).vae  # for EMA, export and the last layer only
    raw_disc = accelerator.unwrap_model(disc) if disc is not None else None
    last_layer = raw_vae.decoder.conv_out.weight if disc is not None else None
    ema = EMAModel(raw_vae.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    state = TrainState()
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    own_state = {"train": state, "nonfinite": guard, "logvar": gen_loss.logvar_state,
                 **({"ema": ema} if ema is not None else {})}
    if resume_from:
        ckpt.load_accelerate_state(accelerator, resume_from)
        ckpt.load_objects(resume_from, own_state)
        accelerator.step = 0  # we always resume at an optimiser-step boundary
        if is_main:
            print(f"resumed from {resume_from} at step {state.step}")

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        accelerator.init_trackers("tensorboard", config=_flat_scalars(to_dict(cfg)))
        _truncate_log(out / TRAIN_LOG, state.step)  # drop steps a killed run logged after its checkpoint
        print(
            f"training {cfg.model.init_from or (cfg.model.kind if mlp else cfg.model.preset)}: "
            f"{count_parameters(raw_vae) / 1e6:.2f} M "
            f"parameters ({sum(p.numel() for p in trainable) / 1e6:.2f} M trained), "
            f"{len(dataset)} images, {accelerator.num_processes} process(es), output {out}"
        )
    val_images, val_used = (
        load_validation_images(gather_files(cfg.data.val), cfg.data.val_images, cfg.data.val_crop)
        if cfg.data.val and is_main
        else ([], [])
    )
    for entry in val_used:
        if entry.startswith("skipped: "):  # unusable validation file: say so, never drop it silently
            print(f"validation {entry}")
    lpips_metric = LPIPSMetric("alex", accelerator.device) if len(val_images) else None
    scale_images: list[torch.Tensor] = []  # filled on first export: fixed crops, main process only

    def save_checkpoint() -> Path:
        def write_extras(folder: Path) -> None:
            save_config(cfg, folder / "config.yaml")
            (folder / "vae_config.json").write_text(json.dumps(ckpt.architecture(raw_vae.config), indent=2))
            export_codec(folder / "codec")

        return ckpt.save_checkpoint(accelerator, ckpt_dir, state.step, own_state, cfg.keep_checkpoints,
                                    write_extras)

    def eval_codec() -> Codec:
        """A detached fp32 copy of the current weights (EMA where on) wrapped as a Codec."""
        # The copy's random initialisation must not advance the training RNG: a run that
        # exports at step N would otherwise diverge from one resumed at step N.
        with torch.random.fork_rng(devices=[]):
            copy = type(raw_vae).from_config(raw_vae.config)
        if ema is not None:
            ema.store(raw_vae.parameters())
            ema.copy_to(raw_vae.parameters())
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in raw_vae.state_dict().items()})
        if ema is not None:
            ema.restore(raw_vae.parameters())
        return Codec(copy, device=accelerator.device, batch_size=cfg.batch_size)

    def export_codec(folder: Path) -> None:
        if not scale_images:
            count = min(cfg.scale_samples, len(dataset))
            scale_images.extend(_rgb(dataset[(i, SCALE_EPOCH)]["pixels"]) for i in range(count))
        codec = eval_codec()
        gen = torch.Generator().manual_seed(cfg.seed)
        if mlp and cfg.mlp.conditional:
            # Codec encodes without labels; a conditional VAE's latents are N(0, I) by its KL.
            factors = {"scaling_factor": 1.0, "note": "not measured: conditional VAE"}
        else:
            factors = codec.measure_factors(torch.stack(scale_images).split(cfg.batch_size), generator=gen)
        codec.set_factors(factors["scaling_factor"])
        codec.save_pretrained(
            folder,
            meta={"step": state.step, "ema": ema is not None, "latent_stats": factors,
                  "train_config": to_dict(cfg)},
        )

    def validate_now() -> dict:
        codec = eval_codec()
        batches = [val_images] if isinstance(val_images, torch.Tensor) else [v for v in val_images]
        pairs = [(b, codec.reconstruct(b)) for b in batches]
        per_image = evaluate_pairs(pairs, lpips_metric)
        stats = {f"val/{k}": summarize(v)["mean"] for k, v in per_image.items()}
        accelerator.log(stats, step=state.step)
        x, y = pairs[0]
        grid = make_grid_image([x[:8], y[:8]], out / "samples" / f"val_{state.step:08d}.png")
        _log_image(accelerator, "val/reconstruction", grid, state.step)
        return stats

    # ---------------------------------------------------------------- the loop
    model.train()
    if disc is not None:
        disc.train()
    start = time.monotonic()
    progress = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, desc="train")
    # One loader for the whole run, positioned where this run stands (0 or the resumed step).
    epoch, skip = divmod(state.step * cfg.grad_accum, batches_per_epoch)
    remaining = (cfg.max_steps - state.step) * cfg.grad_accum * cfg.batch_size
    sampler.set_position(epoch, skip * cfg.batch_size, max(remaining, 0))
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_fn,
        num_workers=cfg.data.num_workers, drop_last=True,
        pin_memory=accelerator.device.type == "cuda",
        # Its own generator: creating an iterator draws a worker seed, which must not come
        # from the global RNG (a resumed run creates its iterator at a different moment).
        generator=torch.Generator().manual_seed(cfg.seed + state.step),
        worker_init_fn=_ignore_stop_signals,
    )
    stop = interrupted = None
    nonfinite = False  # any micro-batch of the current optimiser step
    signals = StopSignals().__enter__()
    try:
        for batch in loader:
            _record_skipped(state, batch["skipped"], is_main)
            x = batch["pixels"].to(accelerator.device, non_blocking=True)
            if mlp:
                x = mlp_recipe.fit_channels(x, cfg.mlp.in_channels)
            elif accelerator.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model, *([disc] if disc is not None else [])):
                # -- generator phase
                with accelerator.autocast():
                    if mlp:
                        labels = batch["labels"].to(accelerator.device) if cfg.mlp.conditional else None
                        recon, posterior = model(x, labels)  # recon: the decoder's parameters
                        loss, logs = elbo_loss(raw_vae, x, recon, posterior, state.step)
                    else:
                        recon, posterior = model(x)
                        # The discriminator judges x̂ here with its own weights frozen: its plain
                        # module is used because no discriminator gradient may be produced now.
                        with _frozen(raw_disc):
                            loss, logs = gen_loss(x, recon, posterior, state.step, raw_disc, last_layer)
                accelerator.backward(loss)
                nonfinite |= not math.isfinite(logs["loss"])

                # -- discriminator phase (only once it is switched on)
                factor = disc_factor(cfg.loss, state.step)
                disc_on = disc is not None and factor > 0
                if disc_on:
                    with accelerator.autocast():
                        d_loss, d_logs = discriminator_loss(disc, x, recon, factor)
                    accelerator.backward(d_loss)
                    nonfinite |= not math.isfinite(d_logs["d_loss"])
                    logs.update(d_logs)

                if accelerator.sync_gradients:
                    over_time = cfg.max_minutes > 0 and time.monotonic() - start > cfg.max_minutes * 60
                    # One collective per step: every rank skips, stops or is interrupted together.
                    nonfinite, over_time, signalled = _agree(
                        accelerator, nonfinite, over_time, signals.requested is not None)
                    latest = ckpt.latest_checkpoint(ckpt_dir) if nonfinite else None  # for the message only
                    if not guard.update(not nonfinite, state.step, logs, latest and str(latest)):
                        if cfg.loss.learn_logvar and accelerator.num_processes > 1:
                            gen_loss.logvar.grad = accelerator.reduce(gen_loss.logvar.grad, "mean")
                        if cfg.optim.max_grad_norm > 0 or (state.step + 1) % cfg.log_every == 0:
                            logs["grad_norm"] = _clip(accelerator, trainable, cfg.optim.max_grad_norm)
                        _set_lr(opt_g, learning_rate(cfg, state.step, base_lr))
                        opt_g.step()
                        if disc_on:
                            if cfg.optim.max_grad_norm > 0:
                                _clip(accelerator, list(disc.parameters()), cfg.optim.max_grad_norm)
                            _set_lr(opt_d, learning_rate(cfg, state.step, base_disc_lr))
                            opt_d.step()
                        if ema is not None:
                            ema.step(raw_vae.parameters())
                    elif is_main:
                        tqdm.write(f"step {state.step}: non-finite loss, step skipped "
                                   f"({guard.in_a_row} in a row, {guard.total} in this run)")
                    opt_g.zero_grad(set_to_none=True)
                    if opt_d is not None:
                        opt_d.zero_grad(set_to_none=True)
                    nonfinite = False

            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == 1:
                logs["lr"] = opt_g.param_groups[0]["lr"]
                logs["nonfinite_steps"] = guard.total
                accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=state.step)
                progress.set_postfix(loss=f"{logs['loss']:.4g}", rec=f"{logs['rec']:.4f}")
                if is_main:
                    with open(out / TRAIN_LOG, "a") as log:
                        log.write(json.dumps({"step": state.step, **logs}) + "\n")
            if is_main and cfg.image_every and state.step % cfg.image_every == 0:
                shown = (raw_vae.mean_image(recon[:4].detach().float()).mul(2).sub(1).view_as(x[:4])
                         if mlp else recon[:4])
                grid = make_grid_image([x[:4].detach(), shown.detach().float()],
                                       out / "samples" / f"train_{state.step:08d}.png")
                _log_image(accelerator, "train/reconstruction", grid, state.step)
            if is_main and len(val_images) and state.step % cfg.val_every == 0:
                validate_now()
            stop = state.step >= cfg.max_steps or over_time
            if signalled and not stop:  # a run that just finished simply finishes
                interrupted = signals.requested or "a signal to another process"
            if interrupted or (state.step % cfg.checkpoint_every == 0 and not stop):
                save_checkpoint()
            if stop or interrupted:
                break
    finally:
        signals.__exit__(None, None, None)

    progress.close()
    if interrupted:
        accelerator.end_training()
        last = ckpt_dir / ckpt.checkpoint_name(state.step)
        message = (f"interrupted ({interrupted}) at step {state.step}: checkpoint {last} saved; "
                   f"continue with --set resume=true")
        if is_main:
            print(message)
        raise TrainingInterrupted(message, last)
    progress.close()
    final = ckpt_dir / ckpt.checkpoint_name(state.step)
    if not (final / ckpt.COMPLETE).exists():
        final = save_checkpoint()
    codec_dir = out / "codec"
    if is_main:
        if len(val_images):
            stats = validate_now()
            print("validation: " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in stats.items()))
        if codec_dir.exists():
            shutil.rmtree(codec_dir)
        shutil.copytree(final / "codec", codec_dir)
        if state.skipped:
            listing = "".join(f"{f}\t{r}\n" for f, r in sorted(state.skipped.items()))
            (out / "skipped_files.tsv").write_text(listing)
            print(f"skipped {len(state.skipped)} unusable file(s); listed in {out / 'skipped_files.tsv'}")
        print(f"step {state.step}: checkpoint {final}, codec {codec_dir}")
    accelerator.end_training()
    return codec_dir


# ------------------------------------------------------------------------- small helpers
TRAIN_LOG = "train_log.jsonl"  # one JSON line per logged step: loss terms, lr, grad norm


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the loader's workers leave the
    signal to the main process, which finishes the step and saves, instead of dying under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _agree(accelerator: Accelerator, *flags: bool) -> list[bool]:
    """Each flag true on any process -> true on all (one all-reduce; free on one process)."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v) for v in accelerator.reduce(t, "max").tolist()]


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(kept))


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """Greyscale items (MNIST for the MLP VAE) as the RGB images Codec takes (equal channels)."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _clip(accelerator: Accelerator, params: list, max_norm: float) -> float:
    """Clip when ``max_norm`` > 0; returns the gradient norm before clipping (for the logs)."""
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class _frozen:
    """Temporarily set ``requires_grad=False`` on a module's parameters (None is a no-op)."""

    def __init__(self, module: nn.Module | None):
        self.module = module

    def __enter__(self):
        if self.module is not None:
            self.module.requires_grad_(False)

    def __exit__(self, *exc):
        if self.module is not None:
            self.module.requires_grad_(True)


def _record_skipped(state: TrainState, skipped: list[str], is_main: bool) -> None:
    for reason in skipped:
        path = reason.split(":", 1)[0]
        if path not in state.skipped:
            state.skipped[path] = reason
            if is_main:
                tqdm.write(f"skipped unusable file ({len(state.skipped)} so far): {reason}")


def _log_image(accelerator: Accelerator, tag: str, path: Path, step: int) -> None:
    import numpy as np
    from PIL import Image

    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image(tag, np.asarray(Image.open(path)), step, dataformats="HWC")


def _flat_scalars(tree: dict, prefix: str = "") -> dict:
    """tensorboard hparams take scalars only: flatten sections, stringify lists."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flat_scalars(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
