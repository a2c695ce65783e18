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
its recipe (:mod:`train.recipes`); what ``train.ldm`` shares is :mod:`train.run`.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from codec.codec import Codec
from codec.evaluation.metrics import LPIPSMetric, evaluate_pairs, summarize
from codec.images import make_grid_image
from codec.latents.scale import measure_dataset
from codec.models import count_parameters
from train import checkpoints as ckpt
from train import run as runs
from train.config import TrainConfig, save_config, to_dict, validate
from train.data import EpochSampler, gather_files, load_validation_images
from train.discriminator import PatchDiscriminator
from train.guards import NonFiniteGuard, StopSignals
from train.losses import GeneratorLoss, disc_factor, discriminator_loss
from train.recipes import Autoencoder, recipe_for
from train.run import TrainState, resolve_mixed_precision
from train.steps import TrainingInterrupted, agree, clip_gradients, set_lr, step_optimisers  # noqa: F401

__all__ = ["Autoencoder", "TrainState", "TrainingInterrupted", "build_vae", "learning_rate",
           "resolve_mixed_precision", "train"]

# Crops for measuring the scaling factor use an "epoch" training never reaches, so they are
# fixed for the whole run and independent of the training order.
SCALE_EPOCH = 10**9
TRAIN_LOG = "train_log.jsonl"  # one JSON line per logged step: loss terms, lr, grad norm


def build_vae(cfg: TrainConfig):
    return recipe_for(cfg).build_vae()


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


# ------------------------------------------------------------------------- the run's parts
@dataclass
class Run:
    """Everything the step functions share, built once by :func:`build_run`."""

    cfg: TrainConfig
    accelerator: Accelerator
    recipe: object
    model: nn.Module  # prepared (DDP where several processes)
    raw_vae: nn.Module  # the plain model: EMA, export and the last layer
    gen_loss: GeneratorLoss
    opt_g: torch.optim.Optimizer
    trainable: list
    base_lr: float
    disc: nn.Module | None = None
    raw_disc: nn.Module | None = None
    opt_d: torch.optim.Optimizer | None = None
    base_disc_lr: float = 0.0
    last_layer: torch.Tensor | None = None
    ema: EMAModel | None = None
    state: TrainState = field(default_factory=TrainState)
    guard: NonFiniteGuard | None = None
    out: Path = Path(".")

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def own_state(self) -> dict:
        """Our objects saved in checkpoints beside accelerate's (never pickled)."""
        return {"train": self.state, "nonfinite": self.guard, "logvar": self.gen_loss.logvar_state,
                **({"ema": self.ema} if self.ema is not None else {})}


def build_run(cfg: TrainConfig, accelerator: Accelerator, resume_from: Path | None) -> tuple[Run, Dataset, object]:
    """Model, losses, optimisers and data, prepared by accelerate; returns (run, dataset, collate)."""
    recipe = recipe_for(cfg)
    vae = recipe.build_vae()
    if resume_from:
        ckpt.check_compatible(resume_from, vae.config)
    if cfg.model.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if cfg.model.train_decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    model = recipe.wrap(vae)
    gen_loss = GeneratorLoss(cfg.loss, recipe.perceptual_net())
    disc = (PatchDiscriminator(channels=cfg.loss.disc_channels, layers=cfg.loss.disc_layers)
            if cfg.loss.disc_weight > 0 else None)

    scale = accelerator.num_processes * cfg.batch_size * cfg.grad_accum if cfg.optim.scale_lr else 1
    base_lr, base_disc_lr = cfg.optim.lr * scale, (cfg.optim.disc_lr or cfg.optim.lr) * scale
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt_g = torch.optim.AdamW(trainable + ([gen_loss.logvar] if cfg.loss.learn_logvar else []),
                              lr=base_lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    # weight_decay given explicitly: AdamW's own default (0.01) is not the recipe's.
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=base_disc_lr, betas=tuple(cfg.optim.betas),
                               weight_decay=cfg.optim.weight_decay) if disc is not None else None)
    dataset, collate_fn = recipe.dataset()

    if disc is not None:
        model, disc, opt_g, opt_d = accelerator.prepare(model, disc, opt_g, opt_d)
    else:
        model, opt_g = accelerator.prepare(model, opt_g)
    gen_loss.to(accelerator.device)
    raw_vae = accelerator.unwrap_model(model).vae
    ema = EMAModel(raw_vae.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        ema.to(accelerator.device)
    runs.seed_per_process(accelerator, cfg.seed, cfg.deterministic)
    run = Run(
        cfg=cfg, accelerator=accelerator, recipe=recipe, model=model, raw_vae=raw_vae, gen_loss=gen_loss,
        opt_g=opt_g, trainable=trainable, base_lr=base_lr, disc=disc,
        raw_disc=accelerator.unwrap_model(disc) if disc is not None else None, opt_d=opt_d,
        base_disc_lr=base_disc_lr, last_layer=recipe.last_layer(raw_vae) if disc is not None else None,
        ema=ema, guard=NonFiniteGuard(cfg.max_nonfinite_steps), out=Path(cfg.output_dir),
    )
    return run, dataset, collate_fn


# ------------------------------------------------------------------------- one optimiser step
def generator_step(run: Run, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict, bool]:
    """The recipe's loss and its backward; returns (reconstruction, logs, non-finite?)."""
    with run.accelerator.autocast():
        recon, loss, logs = run.recipe.loss(run, x, batch)
    run.accelerator.backward(loss)
    return recon, logs, not math.isfinite(logs["loss"])


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
        tqdm.write(f"step {run.state.step}: non-finite loss, step skipped "
                   f"({run.guard.in_a_row} in a row, {run.guard.total} in this run)")
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
    shown = run.recipe.shown(run.raw_vae, recon, x)
    grid = make_grid_image([x[:4].detach(), shown.detach().float()],
                           run.out / "samples" / f"train_{run.state.step:08d}.png")
    _log_image(run.accelerator, "train/reconstruction", grid, run.state.step)


# ------------------------------------------------------------------------- export and validation
def eval_codec(run: Run) -> Codec:
    """A detached fp32 copy of the current weights (EMA where on) wrapped as a Codec."""
    # The copy's random initialisation must not advance the training RNG: a run that exports
    # at step N would otherwise diverge from one resumed at step N.
    with torch.random.fork_rng(devices=[]):
        copy = type(run.raw_vae).from_config(run.raw_vae.config)
    with runs.ema_weights(run.ema, run.raw_vae.parameters()):
        copy.load_state_dict({k: v.detach().float().cpu() for k, v in run.raw_vae.state_dict().items()})
    return Codec(copy, device=run.accelerator.device, batch_size=run.cfg.batch_size)


def export_codec(run: Run, dataset: Dataset, folder: Path) -> None:
    codec = eval_codec(run)
    stats = run.recipe.export_factors(codec, lambda: measure_training_latents(run, codec, dataset))
    codec.save_pretrained(folder, meta={"step": run.state.step, "ema": run.ema is not None,
                                        "latent_stats": stats, "train_config": to_dict(run.cfg)})


def measure_training_latents(run: Run, codec: Codec, dataset: Dataset) -> dict:
    """Latent statistics as `vae-codec scale` measures them: a seeded sample of the whole set."""
    images = (Listed(dataset.head(run.cfg.scale_samples)) if isinstance(dataset, IterableDataset)
              else ScaleCrops(dataset))
    stats = measure_dataset(codec, images, run.cfg.scale_samples, seed=run.cfg.seed)
    stats.pop("skipped")  # training crops never fail (bad files are replaced and recorded)
    return stats


def save_checkpoint(run: Run, dataset: Dataset) -> Path:
    gather_skipped(run)  # every rank's records into the checkpoint (each rank saves its state)

    def write_extras(folder: Path) -> None:
        save_config(run.cfg, folder / "config.yaml")
        (folder / "vae_config.json").write_text(json.dumps(ckpt.architecture(run.raw_vae.config), indent=2))
        export_codec(run, dataset, folder / "codec")

    return ckpt.save_checkpoint(run.accelerator, run.ckpt_dir, run.state.step, run.own_state(),
                                run.cfg.keep_checkpoints, write_extras)


class Validation:
    """Reconstruction metrics and a picture of fixed validation images (main process only)."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.run = run
        self.images, used = (load_validation_images(gather_files(cfg.data.val), cfg.data.val_images,
                                                    cfg.data.val_crop)
                             if cfg.data.val and run.is_main else ([], []))
        for entry in used:
            if entry.startswith("skipped: "):  # unusable validation file: say so, never drop it silently
                print(f"validation {entry}")
        self.lpips = LPIPSMetric("alex", run.accelerator.device) if len(self.images) else None

    def __bool__(self) -> bool:
        return bool(len(self.images))

    def __call__(self) -> dict:
        run = self.run
        codec = eval_codec(run)
        batches = [self.images] if isinstance(self.images, torch.Tensor) else list(self.images)
        pairs = [(b, codec.reconstruct(b)) for b in batches]
        per_image = evaluate_pairs(pairs, self.lpips)
        stats = {f"val/{k}": summarize(v)["mean"] for k, v in per_image.items()}
        run.accelerator.log(stats, step=run.state.step)
        x, y = pairs[0]
        grid = make_grid_image([x[:8], y[:8]], run.out / "samples" / f"val_{run.state.step:08d}.png")
        _log_image(run.accelerator, "val/reconstruction", grid, run.state.step)
        return stats


# ------------------------------------------------------------------------- the run
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
                recon, logs, bad = generator_step(run, x, batch)
                disc_on, bad_d = discriminator_step(run, run.recipe.real_images(x, batch), recon, logs)
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
            stop, interrupted = after_step(run, dataset, validation, progress, logs, x, recon, over_time, signal_name)
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
    if run.is_main and cfg.image_every and run.state.step % cfg.image_every == 0:
        show_reconstructions(run, x, recon)
    if run.is_main and validation and cfg.val_every and run.state.step % cfg.val_every == 0:
        validation()
    stop = run.state.step >= cfg.max_steps or over_time
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
        print(f"step {run.state.step}: checkpoint {final}, codec {codec_dir}")
    run.accelerator.end_training()
    return codec_dir


# ------------------------------------------------------------------------- small helpers
class ScaleCrops(Dataset):
    """The training set as :func:`codec.latents.scale.measure_dataset` reads it: item ``i``'s crop
    of an epoch training never reaches (fixed for the run, independent of the training order);
    greyscale items (MNIST for the MLP VAE) as the RGB images Codec takes."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        image = self.dataset[(i, SCALE_EPOCH)]["pixels"]
        return {"image": image.expand(3, -1, -1) if image.shape[0] == 1 else image, "error": None}


class Listed(Dataset):
    """Crops already read (a stream's head) as :func:`measure_dataset` reads them."""

    def __init__(self, images: list[torch.Tensor]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "error": None}


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


def gather_skipped(run: Run) -> None:
    """Merge the skip records of every process (each sees only its own batches); a collective:
    every rank calls it at the same point."""
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        for records in gather_object([run.state.skipped]):
            for key, reason in records.items():
                run.state.skipped.setdefault(key, reason)


def _record_skipped(state: TrainState, skipped: list[dict], is_main: bool) -> None:
    """Keep each skip record (:func:`codec.sources.skip`) under its input's full name."""
    for record in skipped:
        if record["key"] not in state.skipped:
            state.skipped[record["key"]] = record["reason"]
            if is_main:
                tqdm.write(f"skipped unusable input ({len(state.skipped)} so far): {record['reason']}")


def _log_image(accelerator: Accelerator, tag: str, path: Path, step: int) -> None:
    import numpy as np
    from PIL import Image

    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image(tag, np.asarray(Image.open(path)), step, dataformats="HWC")
