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
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from train.common import session as runs
from train.common.guards import NonFiniteGuard, StopSignals
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
    from diffusers import DDPMPipeline
    from diffusers.training_utils import EMAModel

    from codec.images import make_grid_image
    from codec.latents.compress import codec_of_latents
    from train.common import checkpoints as ckpt
    from train.common.config import save_config
    from train.common.sampler import EpochSampler

    validate_ldm(cfg)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    accelerator, resume_from = runs.start(cfg)
    is_main = accelerator.is_main_process

    data = LatentStream(cfg.data.latents, cfg.seed, cfg.data.fresh_samples)
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(data.shapes) > 1:  # buckets: one shape per batch (every size must pass the UNet's downsamplings)
        factor = 2 ** (len(cfg.model.block_out_channels) - 1)
        odd = [s for s in data.shapes if s[1] % factor or s[2] % factor]
        if odd:
            raise ValueError(f"{cfg.data.latents}: latent shapes {odd} are not multiples of {factor} (the UNet's "
                             f"downsampling); compress with a --bucket-step that is a multiple of {8 * factor}")
        sampler = BucketKeys(data.data.bucket_batches(cfg.batch_size, cfg.seed, rank, world))
        batches_per_epoch = len(sampler.batches)
    else:
        sampler = EpochSampler(len(data), cfg.seed, rank, world, cfg.batch_size)
        batches_per_epoch = sampler.per_epoch // cfg.batch_size
    if batches_per_epoch < 1:
        raise ValueError(
            f"{len(data)} latents are too few for batch_size {cfg.batch_size} on "
            f"{accelerator.num_processes} process(es)"
        )
    conditional = cfg.class_conditional == "yes" or (cfg.class_conditional == "auto" and data.num_classes > 0)
    if conditional and data.num_classes == 0:
        raise ValueError(f"class_conditional=yes but {cfg.data.latents} holds no labels "
                         "(compress with --labels folders, or with .cls side files)")
    if conditional and cfg.class_dropout == 0 and cfg.guidance_scale != 1:
        raise ValueError(f"class_dropout 0 never trains the null class, so guidance_scale {cfg.guidance_scale} "
                         "would extrapolate from an untrained embedding: set class_dropout > 0 (0.1 is usual) "
                         "or guidance_scale=1 (sampling without guidance)")
    data.with_labels = conditional
    num_classes = data.num_classes if conditional else 0
    unet = build_unet(cfg, data.shape, num_classes)
    if resume_from:
        ckpt.check_compatible(resume_from, unet.config, "unet_config.json")
    noise_scheduler = build_scheduler(cfg)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw = accelerator.unwrap_model(unet)
    ema = EMAModel(raw.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    runs.seed_per_process(accelerator, cfg.seed)
    state = runs.TrainState()
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    params = list(raw.parameters())
    own_state = {"train": state, "nonfinite": guard, **({"ema": ema} if ema is not None else {})}  # no pickle
    restored = dict(own_state)
    if resume_from and "nonfinite" not in json.loads((resume_from / ckpt.STATE_JSON).read_text()):
        del restored["nonfinite"]  # a checkpoint from before the guard: its counts start at 0
    runs.resume(accelerator, resume_from, restored, state)
    runs.open_output(accelerator, cfg)
    ema_weights = runs.ema_weights(ema, raw.parameters())

    codec = None
    if is_main:
        # The codec that made the latents (checked by weight hash and factors) decodes samples.
        codec = codec_of_latents(data.data.job, cfg.data.codec, option="data.codec", device=accelerator.device)
        items = [data[(i, 0)] for i in range(min(len(data), 64))]
        probe = torch.cat([(x[0] if isinstance(x, tuple) else x).flatten() for x in items])  # buckets differ
        print(
            f"training UNet2DModel ({sum(p.numel() for p in raw.parameters()) / 1e6:.2f} M "
            f"parameters) on {len(data)} latents {tuple(data.shape)} "
            f"({'fresh posterior samples' if data.has_std and data.fresh else 'stored latents'}; "
            f"mean {probe.mean():.3f}, std {probe.std():.3f}: a diffusion model expects about 0 "
            f"and 1), {f'class-conditional on {num_classes} classes, ' if num_classes else ''}"
            f"{accelerator.num_processes} process(es), output {out}"
        )

    def export(folder: Path) -> None:
        """A DDPMPipeline folder (EMA weights where on): unet/ + scheduler/ + the codec used."""
        with ema_weights:
            DDPMPipeline(unet=raw, scheduler=noise_scheduler).save_pretrained(str(folder))
        info = {"codec": cfg.data.codec or data.data.job["codec"]["path"],
                "latents": str(Path(cfg.data.latents).resolve()), "step": state.step,
                # class-conditional: label i is classes[i] (when named); num_classes is the null class
                "num_classes": num_classes, "classes": data.classes if num_classes else None}
        (folder / "vae_codec_ldm.json").write_text(json.dumps(info, indent=2))

    def samples() -> Path:
        labels = None
        cols = math.ceil(math.sqrt(cfg.num_samples))
        if num_classes:  # one row per class (the first 8), as many columns as fit num_samples
            rows = min(num_classes, 8)
            cols = max(1, cfg.num_samples // rows)
            labels = torch.arange(rows).repeat_interleave(cols)
        with ema_weights:
            raw.eval()
            latents = sample_latents(raw, noise_scheduler, len(labels) if labels is not None else cfg.num_samples,
                                     cfg.sample_steps, torch.Generator().manual_seed(cfg.seed), labels,
                                     cfg.guidance_scale)
            raw.train()
        images = codec.decode(latents)
        path = out / "samples" / f"{ckpt.checkpoint_name(state.step)}.png"
        return make_grid_image(images.split(cols), path)

    def save_checkpoint() -> Path:
        def write_extras(folder: Path) -> None:
            save_config(cfg, folder / "config.yaml")
            (folder / "unet_config.json").write_text(json.dumps(ckpt.architecture(raw.config), indent=2))
            export(folder / "pipeline")

        return ckpt.save_checkpoint(accelerator, ckpt_dir, state.step, own_state, cfg.keep_checkpoints,
                                    write_extras)

    # ---------------------------------------------------------------- the loop
    epoch, skip = divmod(state.step, batches_per_epoch)
    options = dict(num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda",
                   generator=torch.Generator().manual_seed(cfg.seed + state.step))  # see train.autoencoder.loop
    if isinstance(sampler, BucketKeys):
        sampler.set_position(epoch, skip, max(cfg.max_steps - state.step, 0))
        loader = DataLoader(data, batch_sampler=sampler, **options)
    else:
        sampler.set_position(epoch, skip * cfg.batch_size, max(cfg.max_steps - state.step, 0) * cfg.batch_size)
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **options)
    unet.train()
    progress = tqdm(total=cfg.max_steps, initial=state.step, disable=not is_main, desc="train.ldm")
    started, interrupted, stopped_by = time.monotonic(), None, None
    with StopSignals() as signals:
        for batch in loader:
            loss = diffusion_loss(cfg, unet, noise_scheduler, accelerator, batch, conditional, num_classes)
            accelerator.backward(loss)
            over_time = cfg.max_minutes > 0 and time.monotonic() - started > cfg.max_minutes * 60
            # One collective per step: every rank skips, stops or is interrupted together (as train.autoencoder.loop).
            nonfinite, over_time, signalled = agree(accelerator, not math.isfinite(loss.item()), over_time,
                                                    signals.requested is not None)
            value = accelerator.reduce(loss.detach(), "mean").item()
            lr = cfg.lr * min(1.0, (state.step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            latest = ckpt.latest_checkpoint(ckpt_dir) if nonfinite else None  # for the message only
            if not guard.update(not nonfinite, state.step, {"loss": value}, latest and str(latest)):
                _, stepped = step_optimisers(accelerator, [(optimizer, params, lr)], cfg.max_grad_norm)
                if ema is not None and stepped:  # fp16: no EMA step where the scaler skipped the weights' step
                    ema.step(raw.parameters())
            elif is_main:
                tqdm.write(f"step {state.step}: non-finite loss, step skipped "
                           f"({guard.in_a_row} in a row, {guard.total} in this run)")
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == 1:
                accelerator.log({"train/loss": value, "train/lr": lr, "train/nonfinite_steps": guard.total},
                                step=state.step)
                progress.set_postfix(loss=f"{value:.4f}")
            done = state.step >= cfg.max_steps or over_time
            stopped_by = "max_steps" if state.step >= cfg.max_steps else "max_minutes" if over_time else None
            interrupted = (signals.requested or "a signal to another process") if signalled and not done else None
            if is_main and cfg.sample_every and state.step % cfg.sample_every == 0 and not done:
                samples()
            if interrupted or (state.step % cfg.checkpoint_every == 0 and not done):
                save_checkpoint()
            if done or interrupted:
                break
    progress.close()
    if interrupted:
        accelerator.end_training()
        last = ckpt_dir / ckpt.checkpoint_name(state.step)
        message = (f"interrupted ({interrupted}) at step {state.step}: checkpoint {last} saved; "
                   "continue with --set resume=true")
        if is_main:
            print(message)
        raise TrainingInterrupted(message, last)

    final = runs.final_checkpoint(ckpt_dir, state.step, save_checkpoint)
    pipeline_dir = out / "pipeline"
    if is_main:
        grid = samples()
        runs.publish(final / "pipeline", pipeline_dir)
        why = {"max_steps": f"max_steps {cfg.max_steps} reached",
               "max_minutes": f"max_minutes {cfg.max_minutes:g} reached; rerun with --set resume=true to go on"
               }.get(stopped_by, f"nothing left to do: the run is at max_steps {cfg.max_steps}")
        print(f"step {state.step} ({why}): checkpoint {final}, pipeline {pipeline_dir}, samples {grid}")
    accelerator.end_training()
    return pipeline_dir
