"""``python -m train.ldm CONFIG [--set a.b=c ...]``: a latent diffusion model on our latents.

Trains a diffusers ``UNet2DModel`` with a ``DDPMScheduler`` (epsilon or v prediction) or
flow matching (``objective: flow``, ``FlowMatchEulerDiscreteScheduler``) on a
:class:`codec.LatentDataset` written by ``vae-codec compress``, under accelerate (also
``accelerate launch -m train.ldm``), then samples latents with DDIM and decodes them with the
codec that made the latents into an image grid.

Latents are used as stored: already scaled by the codec's factors, so a good codec export
gives them about unit variance (the start of the run prints what the data has). Shards with
``--store mean_std`` give a fresh posterior sample ``mean + std * N(0, I)`` per item per epoch,
seeded by (seed, item, epoch) so a resumed run sees the same samples.

Output::

    OUTPUT_DIR/checkpoints/step_XXXXXXXX/  accelerate state + pipeline/ (atomic, train.common.checkpoints)
    OUTPUT_DIR/pipeline/                   DDPMPipeline folder: unet/ (EMA weights) + scheduler/
    OUTPUT_DIR/samples/step_XXXXXXXX.png   decoded samples
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from codec.codec import Codec
from codec.images import make_grid_image
from codec.io import readable_by_all
from train.common import checkpoints as ckpt
from train.common import session as runs
from train.common.config import save_config
from train.common.guards import NonFiniteGuard, StopSignals
from train.common.sampler import EpochSampler
from train.common.session import TrainState
from train.common.steps import TrainingInterrupted, agree, step_optimisers
from train.diffusion.config import LDMConfig, validate_ldm
from train.diffusion.data import BucketKeys, LatentStream
from train.diffusion.model import build_scheduler, build_unet, sample_latents
from train.diffusion.objective import diffusion_loss


def train_ldm(cfg: LDMConfig) -> Path:
    """Train according to ``cfg``; returns the exported pipeline folder."""
    try:
        with runs.keeping_freed_memory(cfg):
            return _train(cfg)
    finally:
        runs.reset_accelerate()


def _train(cfg: LDMConfig) -> Path:
    validate_ldm(cfg)
    accelerator, resume_from = runs.start(cfg)
    run = build_run(cfg, accelerator, resume_from)
    interrupted, stopped_by = run_steps(run, training_loader(run))
    if interrupted:
        run.accelerator.end_training()
        last = run.ckpt_dir / ckpt.checkpoint_name(run.state.step)
        message = (f"interrupted ({interrupted}) at step {run.state.step}: checkpoint {last} saved; "
                   "continue with --set resume=true")
        if run.is_main:
            print(message)
        raise TrainingInterrupted(message, last)
    return finish(run, stopped_by)


# ------------------------------------------------------------------------- the run's parts
@dataclass
class DiffusionRun:
    """Everything the step functions share, built once by :func:`build_run`."""

    cfg: LDMConfig
    accelerator: Accelerator
    data: LatentStream
    sampler: EpochSampler | BucketKeys
    batches_per_epoch: int
    num_classes: int  # 0: unconditional
    unet: torch.nn.Module  # prepared (DDP where several processes)
    raw: torch.nn.Module  # the plain UNet: EMA, export, sampling
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    ema: object | None
    state: TrainState
    guard: NonFiniteGuard
    codec: Codec | None = None  # decodes samples (main process)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def own_state(self) -> dict:
        """Our objects saved in checkpoints beside accelerate's (never pickled)."""
        return {"train": self.state, "nonfinite": self.guard, **({"ema": self.ema} if self.ema is not None else {})}


def plan_batches(cfg: LDMConfig, data: LatentStream, rank: int, world: int) -> tuple[EpochSampler | BucketKeys, int]:
    """The sampler of this process and the batches in an epoch: one shape per batch where the
    latents come in several (buckets), each shape passing the UNet's downsamplings."""
    if len(data.shapes) > 1:
        factor = 2 ** (len(cfg.model.block_out_channels) - 1)
        odd = [s for s in data.shapes if s[1] % factor or s[2] % factor]
        if odd:
            raise ValueError(f"{cfg.data.latents}: latent shapes {odd} are not multiples of {factor} (the UNet's "
                             f"downsampling); compress with a --bucket-step that is a multiple of {8 * factor}")
        sampler = BucketKeys(data.data.bucket_batches(cfg.batch_size, cfg.seed, rank, world))
        per_epoch = len(sampler.batches)
    else:
        sampler = EpochSampler(len(data), cfg.seed, rank, world, cfg.batch_size)
        per_epoch = sampler.per_epoch // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"{len(data)} latents are too few for batch_size {cfg.batch_size} on {world} process(es)")
    return sampler, per_epoch


def class_count(cfg: LDMConfig, data: LatentStream) -> int:
    """How many classes the UNet is conditioned on (0: unconditional), checked against the data."""
    conditional = cfg.class_conditional == "yes" or (cfg.class_conditional == "auto" and data.num_classes > 0)
    if conditional and data.num_classes == 0:
        raise ValueError(f"class_conditional=yes but {cfg.data.latents} holds no labels "
                         "(compress with --labels folders, or with .cls side files)")
    if conditional and cfg.class_dropout == 0 and cfg.guidance_scale != 1:
        raise ValueError(f"class_dropout 0 never trains the null class, so guidance_scale {cfg.guidance_scale} "
                         "would extrapolate from an untrained embedding: set class_dropout > 0 (0.1 is usual) "
                         "or guidance_scale=1 (sampling without guidance)")
    return data.num_classes if conditional else 0


def build_run(cfg: LDMConfig, accelerator: Accelerator, resume_from: Path | None) -> DiffusionRun:
    """Data, UNet, scheduler, optimiser and EMA, prepared by accelerate and resumed."""
    from diffusers.training_utils import EMAModel

    data = LatentStream(cfg.data.latents, cfg.seed, cfg.data.fresh_samples)
    sampler, per_epoch = plan_batches(cfg, data, accelerator.process_index, accelerator.num_processes)
    num_classes = class_count(cfg, data)
    data.with_labels = num_classes > 0
    unet = build_unet(cfg, data.shape, num_classes)
    if resume_from:
        ckpt.check_compatible(resume_from, unet.config, "unet_config.json")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw = accelerator.unwrap_model(unet)
    ema = EMAModel(raw.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    runs.seed_per_process(accelerator, cfg.seed)
    run = DiffusionRun(cfg=cfg, accelerator=accelerator, data=data, sampler=sampler, batches_per_epoch=per_epoch,
                       num_classes=num_classes, unet=unet, raw=raw, noise_scheduler=build_scheduler(cfg),
                       optimizer=optimizer, ema=ema, state=TrainState(), guard=NonFiniteGuard(cfg.max_nonfinite_steps))
    restored = run.own_state()
    if resume_from and "nonfinite" not in json.loads((resume_from / ckpt.STATE_JSON).read_text()):
        del restored["nonfinite"]  # a checkpoint from before the guard: its counts start at 0
    runs.resume(accelerator, resume_from, restored, run.state)
    runs.open_output(accelerator, cfg)
    if run.is_main:
        announce(run)
    return run


def announce(run: DiffusionRun) -> None:
    """Load the codec that made the latents (checked: decoding with another would be wrong) and
    say what is trained on what, with the latents' spread (a diffusion model expects about 1)."""
    from codec.latents.compress import codec_of_latents

    cfg, data = run.cfg, run.data
    run.codec = codec_of_latents(data.data.job, cfg.data.codec, option="data.codec", device=run.accelerator.device)
    items = [data[(i, 0)] for i in range(min(len(data), 64))]
    probe = torch.cat([(x[0] if isinstance(x, tuple) else x).flatten() for x in items])  # buckets differ
    print(
        f"training UNet2DModel ({sum(p.numel() for p in run.raw.parameters()) / 1e6:.2f} M "
        f"parameters) on {len(data)} latents {tuple(data.shape)} "
        f"({'fresh posterior samples' if data.has_std and data.fresh else 'stored latents'}; "
        f"mean {probe.mean():.3f}, std {probe.std():.3f}: a diffusion model expects about 0 "
        f"and 1), {f'class-conditional on {run.num_classes} classes, ' if run.num_classes else ''}"
        f"{run.accelerator.num_processes} process(es), output {run.out}"
    )


# ------------------------------------------------------------------------- outputs
def export_pipeline(run: DiffusionRun, folder: Path) -> None:
    """A DDPMPipeline folder (EMA weights where on): unet/ + scheduler/ + the codec used."""
    from diffusers import DDPMPipeline

    with runs.ema_weights(run.ema, run.raw.parameters()):
        DDPMPipeline(unet=run.raw, scheduler=run.noise_scheduler).save_pretrained(str(folder))
    cfg = run.cfg
    info = {"codec": cfg.data.codec or run.data.data.job["codec"]["path"],
            "latents": str(Path(cfg.data.latents).resolve()), "step": run.state.step,
            # class-conditional: label i is classes[i] (when named); num_classes is the null class
            "num_classes": run.num_classes, "classes": run.data.classes if run.num_classes else None}
    (folder / "vae_codec_ldm.json").write_text(json.dumps(info, indent=2))
    readable_by_all(folder)


def sample_grid(run: DiffusionRun) -> Path:
    """Decoded samples (EMA weights): one row per class (the first 8) for a conditional model."""
    cfg, labels = run.cfg, None
    cols = math.ceil(math.sqrt(cfg.num_samples))
    if run.num_classes:
        rows = min(run.num_classes, 8)
        cols = max(1, cfg.num_samples // rows)
        labels = torch.arange(rows).repeat_interleave(cols)
    with runs.ema_weights(run.ema, run.raw.parameters()):
        run.raw.eval()
        latents = sample_latents(run.raw, run.noise_scheduler, len(labels) if labels is not None else cfg.num_samples,
                                 cfg.sample_steps, torch.Generator().manual_seed(cfg.seed), labels,
                                 cfg.guidance_scale)
        run.raw.train()
    images = run.codec.decode(latents)
    names = None  # a conditional model's rows are classes: each row says which
    if labels is not None:
        classes = run.data.classes or []
        names = [[classes[i] if i < len(classes) else f"class {i}"] for i in range(len(labels) // cols)]
    return make_grid_image(images.split(cols), run.out / "samples" / f"{ckpt.checkpoint_name(run.state.step)}.png",
                           names)


def save_checkpoint(run: DiffusionRun) -> Path:
    def write_extras(folder: Path) -> None:
        save_config(run.cfg, folder / "config.yaml")
        (folder / "unet_config.json").write_text(json.dumps(ckpt.architecture(run.raw.config), indent=2))
        export_pipeline(run, folder / "pipeline")

    return ckpt.save_checkpoint(run.accelerator, run.ckpt_dir, run.state.step, run.own_state(),
                                run.cfg.keep_checkpoints, write_extras)


# ------------------------------------------------------------------------- the steps
def training_loader(run: DiffusionRun) -> DataLoader:
    """One loader for the rest of the run, positioned at the resumed step (exact resume)."""
    cfg, step, sampler = run.cfg, run.state.step, run.sampler
    epoch, skip = divmod(step, run.batches_per_epoch)
    options = dict(num_workers=cfg.data.num_workers, pin_memory=run.accelerator.device.type == "cuda",
                   generator=torch.Generator().manual_seed(cfg.seed + step))  # see train.autoencoder.loop
    if isinstance(sampler, BucketKeys):
        sampler.set_position(epoch, skip, max(cfg.max_steps - step, 0))
        return DataLoader(run.data, batch_sampler=sampler, **options)
    sampler.set_position(epoch, skip * cfg.batch_size, max(cfg.max_steps - step, 0) * cfg.batch_size)
    return DataLoader(run.data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **options)


def run_steps(run: DiffusionRun, loader: DataLoader) -> tuple[str | None, str | None]:
    """Train until max_steps, max_minutes or a stop signal; returns (interrupted by, stopped by)."""
    cfg = run.cfg
    run.unet.train()
    progress = tqdm(total=cfg.max_steps, initial=run.state.step, disable=not run.is_main, desc="train.ldm")
    started, interrupted, stopped_by = time.monotonic(), None, None
    with StopSignals() as signals:
        for batch in loader:
            over_time, signalled = train_step(run, batch, progress, signals, started)
            done = run.state.step >= cfg.max_steps or over_time
            stopped_by = "max_steps" if run.state.step >= cfg.max_steps else "max_minutes" if over_time else None
            interrupted = (signals.requested or "a signal to another process") if signalled and not done else None
            if run.is_main and cfg.sample_every and run.state.step % cfg.sample_every == 0 and not done:
                sample_grid(run)
            if interrupted or (run.state.step % cfg.checkpoint_every == 0 and not done):
                save_checkpoint(run)
            if done or interrupted:
                break
    progress.close()
    return interrupted, stopped_by


def train_step(run: DiffusionRun, batch, progress, signals: StopSignals, started: float) -> tuple[bool, bool]:
    """One optimiser step on the shared path (train.common.steps): skipped and counted where the
    loss is non-finite on any process; returns (over max_minutes?, stop signal on any process?)."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    loss = diffusion_loss(cfg, run.unet, run.noise_scheduler, acc, batch, run.conditional, run.num_classes)
    acc.backward(loss)
    over_time = cfg.max_minutes > 0 and time.monotonic() - started > cfg.max_minutes * 60
    # One collective per step: every rank skips, stops or is interrupted together (as train.autoencoder.loop).
    nonfinite, over_time, signalled = agree(acc, not math.isfinite(loss.item()), over_time,
                                            signals.requested is not None)
    value = acc.reduce(loss.detach(), "mean").item()
    lr = cfg.lr * min(1.0, (state.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    latest = ckpt.latest_checkpoint(run.ckpt_dir) if nonfinite else None  # for the message only
    if not run.guard.update(not nonfinite, state.step, {"loss": value}, latest and str(latest)):
        _, stepped = step_optimisers(acc, [(run.optimizer, list(run.raw.parameters()), lr)], cfg.max_grad_norm)
        if run.ema is not None and stepped:  # fp16: no EMA step where the scaler skipped the weights' step
            run.ema.step(run.raw.parameters())
    elif run.is_main:
        tqdm.write(run.guard.skipped_message(state.step))
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    progress.update(1)
    if state.step % cfg.log_every == 0 or state.step == 1:
        acc.log({"train/loss": value, "train/lr": lr, "train/nonfinite_steps": run.guard.total}, step=state.step)
        progress.set_postfix(loss=f"{value:.4f}")
    return over_time, signalled


def finish(run: DiffusionRun, stopped_by: str | None) -> Path:
    """The final checkpoint, the published pipeline and a last sample grid; says why it stopped."""
    cfg = run.cfg
    final = runs.final_checkpoint(run.ckpt_dir, run.state.step, lambda: save_checkpoint(run))
    pipeline_dir = run.out / "pipeline"
    if run.is_main:
        grid = sample_grid(run)
        runs.publish(final / "pipeline", pipeline_dir)
        why = runs.stop_reason(cfg, stopped_by)
        print(f"step {run.state.step} ({why}): checkpoint {final}, pipeline {pipeline_dir}, samples {grid}")
    run.accelerator.end_training()
    return pipeline_dir
