"""One accelerate training function for the kl-f8 autoencoder (and the MLP VAE baseline),
readable top to bottom: :func:`train` builds a :class:`Run`, then each optimiser step is

* :func:`generator_step`: reconstruction + LPIPS + KL [+ GAN] (the recipe's loss), backward;
* :func:`discriminator_step`: the PatchGAN on detached reconstructions, once it is on;
* :func:`optimiser_step`: only when ``sync_gradients``: skip non-finite steps, clip, set the
  learning rate, step, EMA;
* :func:`after_step`: log, sample images, validate, checkpoint, decide to stop.

``accumulate(vae, disc)`` wraps both phases (house rule 7). Checkpoints are accelerate
``save_state`` folders (plus an exportable ``codec/``), written atomically; ``resume=true``
continues from the exact step with the same data and RNG state. What differs for the MLP VAE is
its recipe (:mod:`train.autoencoder.recipes`); what ``train.ldm`` shares is :mod:`train.common`.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from codec.evaluation.metrics import psnr
from codec.images import make_grid_image
from codec.models import count_parameters
from train.autoencoder.config import TrainConfig, validate
from train.autoencoder.export import gather_skipped, save_checkpoint
from train.autoencoder.losses import disc_factor, discriminator_loss, loss_scale
from train.autoencoder.recipes import StepContext, StepResult
from train.autoencoder.state import Run, build_run
from train.autoencoder.validation import Validation, _log_image
from train.common import checkpoints as ckpt
from train.common import session as runs
from train.common.guards import StopSignals
from train.common.sampler import EpochSampler
from train.common.session import TrainState
from train.common.steps import TrainingInterrupted, agree, step_optimisers

TRAIN_LOG = "train_log.jsonl"  # one JSON line per logged step: loss terms, lr, grad norm


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
        with runs.keeping_freed_memory(cfg):
            return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        runs.reset_accelerate()


def generator_step(run: Run, x: torch.Tensor, batch: dict) -> tuple[StepResult, bool]:
    """The recipe's loss and its backward; returns (the recipe's result, non-finite?)."""
    acc = run.accelerator
    ctx = StepContext(model=run.model, raw_model=run.raw_vae, step=run.state.step, rank=acc.process_index,
                      gen_loss=run.gen_loss, disc=run.raw_disc, last_layer=run.last_layer,
                      grad_scale=loss_scale(acc), encoder_last_layer=run.encoder_last_layer)
    with acc.autocast():
        result = run.recipe.loss(ctx, x, batch)
    acc.backward(result.loss)
    return result, not math.isfinite(result.logs["loss"])


def discriminator_step(run: Run, x: torch.Tensor, recon: torch.Tensor, logs: dict) -> tuple[bool, bool]:
    """The PatchGAN's loss on detached reconstructions and its backward, once it is switched on;
    returns (on?, non-finite?) and adds its terms to ``logs``."""
    factor = disc_factor(run.cfg.loss, run.state.step)
    if run.disc is None or factor <= 0:
        return False, False
    with run.accelerator.autocast():
        d_loss, d_logs = discriminator_loss(run.disc, x, recon, factor)
    run.accelerator.backward(d_loss)
    logs.update(d_logs)
    return True, not math.isfinite(d_logs["d_loss"])


def optimiser_step(run: Run, logs: dict, nonfinite: bool, disc_on: bool) -> None:
    """Update the weights from the accumulated gradients, unless a loss was non-finite on any
    process (then the step is skipped and counted; too many in a row stop the run)."""
    cfg, acc = run.cfg, run.accelerator
    latest = ckpt.latest_checkpoint(run.ckpt_dir) if nonfinite else None  # for the message only
    if not run.guard.update(not nonfinite, run.state.step, logs, latest and str(latest)):
        if cfg.loss.learn_logvar and acc.num_processes > 1:
            run.gen_loss.logvar.grad = acc.reduce(run.gen_loss.logvar.grad, "mean")
        step = run.state.step
        groups = [(run.opt_g, run.trainable, learning_rate(cfg, step, run.base_lr))]
        if disc_on:
            groups.append((run.opt_d, list(run.disc.parameters()), learning_rate(cfg, step, run.base_disc_lr)))
        norm, stepped = step_optimisers(acc, groups, cfg.optim.max_grad_norm, measure=is_logged(cfg, step + 1))
        if norm is not None:
            logs["grad_norm"] = norm
        if run.ema is not None and stepped:  # fp16: no EMA step where the scaler skipped the weights' step
            run.ema.step(run.raw_vae.parameters())
    elif run.is_main:
        tqdm.write(run.guard.skipped_message(run.state.step))
    run.opt_g.zero_grad(set_to_none=True)
    if run.opt_d is not None:
        run.opt_d.zero_grad(set_to_none=True)


def is_logged(cfg: TrainConfig, step: int) -> bool:
    """Whether the step that brings the count to ``step`` is logged: the first, and every log_every-th."""
    return step == 1 or step % cfg.log_every == 0


def log_step(run: Run, logs: dict, progress) -> None:
    cfg, step = run.cfg, run.state.step
    if not is_logged(cfg, step):
        return
    logs["lr"] = run.opt_g.param_groups[0]["lr"]
    logs["nonfinite_steps"] = run.guard.total
    run.accelerator.log({f"train/{k}": v for k, v in logs.items()}, step=step)
    progress.set_postfix(loss=f"{logs['loss']:.4g}", rec=f"{logs['rec']:.4f}")
    if run.is_main:
        with open(run.out / TRAIN_LOG, "a") as log:
            log.write(json.dumps({"step": step, **logs}) + "\n")


def show_reconstructions(run: Run, x: torch.Tensor, recon: torch.Tensor) -> None:
    shown = run.recipe.shown(run.raw_vae, recon, x).detach().float()
    # PSNR of each shown reconstruction (against the input crop: of the teacher's decoding for a student)
    label = ([f"{v:.1f} dB" for v in psnr(x[:4].detach().float().cpu(), shown.cpu()).tolist()]
             if shown.shape == x[:4].shape else None)
    grid = make_grid_image([x[:4].detach(), shown], run.out / "samples" / f"train_{run.state.step:08d}.png",
                           [None, label])
    _log_image(run.accelerator, "train/reconstruction", grid, run.state.step)


def _train(cfg: TrainConfig) -> Path:
    validate(cfg)
    accelerator, resume_from = runs.start(cfg, cfg.grad_accum, cfg.deterministic)
    run, dataset, collate_fn = build_run(cfg, accelerator, resume_from)
    streamed = isinstance(dataset, IterableDataset)
    if not streamed and len(dataset) // accelerator.num_processes // cfg.batch_size < 1:
        raise ValueError(f"{len(dataset)} training images are too few for batch_size {cfg.batch_size} on "
                         f"{accelerator.num_processes} process(es)")
    runs.resume(accelerator, resume_from, run.own_state(), run.state)
    runs.open_output(accelerator, cfg)
    if run.is_main:
        _truncate_log(run.out / TRAIN_LOG, run.state.step)  # drop steps a killed run logged after its checkpoint
        print(f"training {run.recipe.describe()}: {count_parameters(run.raw_vae) / 1e6:.2f} M parameters "
              f"({sum(p.numel() for p in run.trainable) / 1e6:.2f} M trained), "
              f"{'streamed' if streamed else len(dataset)} images, "
              f"{accelerator.num_processes} process(es), output {run.out}")
    validation = Validation(run)

    run.model.train()
    if run.disc is not None:
        run.disc.train()
    start = time.monotonic()
    progress = tqdm(total=cfg.max_steps, initial=run.state.step, disable=not run.is_main, desc="train")
    loader = training_loader(run, dataset, collate_fn)
    interrupted = None
    nonfinite = False  # any micro-batch of the current optimiser step
    with StopSignals() as signals:
        for batch in loader:
            _record_skipped(run.state, batch["skipped"], run.is_main)
            x = run.recipe.inputs(batch, accelerator.device)
            with accelerator.accumulate(run.model, *([run.disc] if run.disc is not None else [])):
                result, bad = generator_step(run, x, batch)
                recon, logs = result.fake, result.logs
                disc_on, bad_d = discriminator_step(run, result.real, recon, logs)
                nonfinite |= bad or bad_d
                if accelerator.sync_gradients:
                    over_time = cfg.max_minutes > 0 and time.monotonic() - start > cfg.max_minutes * 60
                    # One collective per step: every rank skips, stops or is interrupted together.
                    nonfinite, over_time, signalled = agree(accelerator, nonfinite, over_time,
                                                             signals.requested is not None)
                    optimiser_step(run, logs, nonfinite, disc_on)
                    nonfinite = False
            if not accelerator.sync_gradients:
                continue
            signal_name = signalled and (signals.requested or "a signal to another process")
            shown = x if result.shown_against is None else result.shown_against
            stop, interrupted = after_step(run, dataset, validation, progress, logs, shown, recon, over_time,
                                           signal_name)
            if stop or interrupted:
                break
    progress.close()
    if interrupted:
        accelerator.end_training()
        last = run.ckpt_dir / ckpt.checkpoint_name(run.state.step)
        message = (f"interrupted ({interrupted}) at step {run.state.step}: checkpoint {last} saved; "
                   f"continue with --set resume=true")
        if run.is_main:
            print(message)
        raise TrainingInterrupted(message, last)
    return finish(run, dataset, validation)


def training_loader(run: Run, dataset: Dataset, collate_fn) -> DataLoader:
    """One loader for the whole run, positioned where this run stands (0 or the resumed step):
    an :class:`EpochSampler` over a map-style dataset, or a stream told its process and place."""
    cfg, acc = run.cfg, run.accelerator
    done = run.state.step * cfg.grad_accum  # batches this process has used
    options = dict(
        batch_size=cfg.batch_size, collate_fn=collate_fn, num_workers=cfg.data.num_workers, drop_last=True,
        pin_memory=acc.device.type == "cuda", worker_init_fn=_ignore_stop_signals,
        # Its own generator: creating an iterator draws a worker seed, which must not come from
        # the global RNG (a resumed run creates its iterator at a different moment).
        generator=torch.Generator().manual_seed(cfg.seed + run.state.step),
    )
    if isinstance(dataset, IterableDataset):
        dataset.set_rank(acc.process_index, acc.num_processes)
        dataset.set_position(done, cfg.batch_size)
        dataset.plan(max(cfg.data.num_workers, 1))  # too few images for a batch per process: fails here, not later
        return DataLoader(dataset, **options)
    sampler = EpochSampler(len(dataset), cfg.seed, acc.process_index, acc.num_processes, cfg.batch_size)
    epoch, skip = divmod(done, sampler.per_epoch // cfg.batch_size)
    remaining = (cfg.max_steps - run.state.step) * cfg.grad_accum * cfg.batch_size
    sampler.set_position(epoch, skip * cfg.batch_size, max(remaining, 0))
    return DataLoader(dataset, sampler=sampler, **options)


def after_step(run: Run, dataset, validation: Validation, progress, logs: dict, x, recon, over_time: bool,
               signal_name) -> tuple[bool, str | None]:
    """Count the step; log, show, validate and checkpoint when due. Returns (stop?, interrupted
    by) where a signal asked to stop a run that was not finishing anyway."""
    cfg = run.cfg
    run.state.step += 1
    progress.update(1)
    log_step(run, logs, progress)
    stop = run.state.step >= cfg.max_steps or over_time
    run.stopped_by = "max_steps" if run.state.step >= cfg.max_steps else "max_minutes" if over_time else None
    # The last step always shows reconstructions (finish validates): a short run has something to look at.
    if run.is_main and cfg.image_every and (run.state.step % cfg.image_every == 0 or stop):
        show_reconstructions(run, x, recon)
    if run.is_main and validation and cfg.val_every and run.state.step % cfg.val_every == 0 and not stop:
        validation()
    interrupted = signal_name if signal_name and not stop else None  # a run that just finished simply finishes
    if interrupted or (run.state.step % cfg.checkpoint_every == 0 and not stop):
        save_checkpoint(run, dataset)
    return stop, interrupted


def finish(run: Run, dataset: Dataset, validation: Validation) -> Path:
    """The last checkpoint, final validation, ``output_dir/codec`` and the skipped-files list."""
    gather_skipped(run)
    final = runs.final_checkpoint(run.ckpt_dir, run.state.step, lambda: save_checkpoint(run, dataset))
    codec_dir = run.out / "codec"
    if run.is_main:
        if validation:
            stats = validation()
            print("validation: " + ", ".join(f"{k[4:]} {v:.4f}" for k, v in stats.items()))
        runs.publish(final / "codec", codec_dir)
        if run.state.skipped:
            listing = "".join(f"{f}\t{r}\n" for f, r in sorted(run.state.skipped.items()))
            (run.out / "skipped_files.tsv").write_text(listing)
            print(f"skipped {len(run.state.skipped)} unusable input(s); listed in {run.out / 'skipped_files.tsv'}")
        why = runs.stop_reason(run.cfg, run.stopped_by)
        print(f"step {run.state.step} ({why}): checkpoint {final}, codec {codec_dir}")
    run.accelerator.end_training()
    return codec_dir


def _ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the loader's workers leave the
    signal to the main process, which finishes the step and saves, instead of dying under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(kept))


def _record_skipped(state: TrainState, skipped: list[dict], is_main: bool) -> None:
    """Keep each skip record (:func:`codec.sources.skip`) under its input's full name."""
    for record in skipped:
        if record["key"] not in state.skipped:
            state.skipped[record["key"]] = record["reason"]
            if is_main:
                tqdm.write(f"skipped unusable input ({len(state.skipped)} so far): {record['reason']}")
