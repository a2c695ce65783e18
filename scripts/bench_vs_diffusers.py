"""Training speed against diffusers' example trainer (issue 13), side by side in one script.

Three contenders train the ``tiny`` preset with L1 + VGG-LPIPS + KL + PatchGAN from step 0,
batch 4, 128² crops, fp32, AdamW, gradient clipping at 1.0, on the same 64 crops of
``--data`` saved losslessly at 128² (the comparison is about the training step, not JPEG decoding):

* theirs: diffusers' ``examples/research_projects/autoencoderkl/train_autoencoderkl.py``, run
  unmodified in a subprocess (``--diffusers-script``). It updates the VAE on every other batch and
  the discriminator on the others, and runs LPIPS under ``no_grad``; per VAE update it reads 8 images.
* ours: the real ``train.autoencoder.loop.train`` (accelerate, data loader, EMA 0.999, logging), 4 images per
  VAE update, every step also updating the discriminator.
* plain: the same step as ours, hand-written over tensors in memory: the loop overhead's baseline.

Start-up and the final export/validation are removed by differencing runs of ``--n1`` and
``--n2`` VAE updates (theirs: 2·n1 and 2·n2 batches); the plain loop times updates n1..n2 after
n1 untimed ones. Contenders alternate within each repeat; the table gives min and median.

What their script needs offline, and how it gets it without being edited:
* the VGG16 backbone for ``lpips.LPIPS(net="vgg")``: torchvision loads it from the torch hub cache.
  A cache (``TORCH_HOME`` of the subprocess) is written with the ImageNet conv weights that
  :mod:`codec.evaluation.lpips_weights` provides and zero classifier weights (LPIPS never uses
  the classifier; stored as stride-0 tensors, so the file holds only the conv weights);
* taming-transformers for ``NLayerDiscriminator``/``hinge_d_loss``: ``pip install
  taming-transformers-rom1504`` (a benchmark-only dependency);
* ``--report_to wandb`` with wandb not installed, i.e. no tracker: its tensorboard tracker fails on
  the script's own config (``add_hparams`` rejects the list/None values of its arguments);
* ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``: the crops are read as a local ``imagefolder``.

    python -m scripts.bench_vs_diffusers --diffusers-script PATH/train_autoencoderkl.py \\
        --data ../shared/data/bsds500/train --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts.bench_loop_overhead import our_loop, speedup

REPO = Path(__file__).resolve().parents[1]
VGG16_FILE = "vgg16-397923af.pth"  # the file name torchvision's VGG16_Weights.IMAGENET1K_V1 looks for
VGG16_CLASSIFIER = {"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
                    "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
                    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}
# Our recipe, as theirs is configured below: L1 + 1.0 LPIPS-VGG + 1e-6 KL, GAN weight 0.5 from step 0.
OUR_RECIPE = ("loss.perceptual_weight=1.0", "loss.perceptual_net=vgg", "loss.kl_weight=1e-6",
              "loss.disc_weight=0.5", "loss.disc_start=0", "optim.betas=[0.5,0.9]", "optim.max_grad_norm=1.0")


# ------------------------------------------------------------------------- their inputs, offline
def write_torch_hub_vgg16(torch_home: Path) -> None:
    """torchvision's VGG16 checkpoint as its cache holds it, from our offline ImageNet conv weights."""
    from codec.evaluation.lpips_weights import backbone_state_dict

    state, _ = backbone_state_dict("vgg")
    state.update({k: torch.zeros(()).expand(shape) for k, shape in VGG16_CLASSIFIER.items()})
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / VGG16_FILE)


def write_crops(data: str, count: int, crop: int, folder: Path) -> torch.Tensor:
    """The first ``count`` images' top-left crops, saved as PNG; returns them as a batch in [-1, 1]."""
    from codec.images import list_images, load_image, pil_to_tensor, tensor_to_pil

    files = list_images(data)[:count]
    crops = torch.stack([pil_to_tensor(load_image(f))[:, :crop, :crop] for f in files])
    folder.mkdir(parents=True)
    for i, pil in enumerate(tensor_to_pil(crops)):
        pil.save(folder / f"{i:03d}.png")
    return crops


def their_run(script: Path, work: Path, crops: Path, batches: int, batch: int, crop: int, name: str) -> float:
    """Seconds for a whole run of their script over ``batches`` batches (half of them VAE updates)."""
    threads = str(torch.get_num_threads())  # the parent's, set by --threads
    env = dict(os.environ, TORCH_HOME=str(work / "torch_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    out = work / "theirs" / name
    cmd = [sys.executable, str(script), "--model_config_name_or_path", str(work / "tiny_config"),
           "--train_data_dir", str(crops), "--cache_dir", str(work / "hf_cache"), "--output_dir", str(out),
           "--resolution", str(crop), "--train_batch_size", str(batch), "--max_train_steps", str(batches),
           "--rec_loss", "l1", "--perceptual_scale", "1.0", "--kl_scale", "1e-6", "--disc_start", "0",
           "--disc_scale", "0.5", "--learning_rate", "1e-4", "--disc_learning_rate", "1e-4",
           "--lr_warmup_steps", "0", "--adam_beta1", "0.5", "--adam_beta2", "0.9", "--adam_weight_decay", "0",
           "--max_grad_norm", "1.0", "--mixed_precision", "no", "--seed", "0", "--report_to", "wandb",
           "--validation_image", str(crops / "000.png"), "--validation_steps", "1000000",
           "--checkpointing_steps", "1000000"]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"their script failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


# ------------------------------------------------------------------------- the plain loop
def plain_loop(crops: torch.Tensor, first: int, last: int, batch: int, ema_decay: float) -> float:
    """Seconds for updates ``first``..``last`` of our step written out by hand (same losses,
    optimisers, clipping and EMA as ``train.autoencoder.loop``, and freed memory kept as it keeps it
    on CPUs; no accelerate, loader or logging)."""
    from diffusers.training_utils import EMAModel

    from codec.evaluation.lpips_weights import load_lpips
    from codec.host_memory import keeping_freed_memory
    from codec.models import build_autoencoder
    from train.autoencoder.config import LossConfig
    from train.autoencoder.discriminator import PatchDiscriminator
    from train.autoencoder.losses import GeneratorLoss, discriminator_loss, frozen

    with keeping_freed_memory(True):
        torch.manual_seed(0)
        vae, disc = build_autoencoder("tiny").train(), PatchDiscriminator().train()
        gen = GeneratorLoss(LossConfig(perceptual_weight=1.0, kl_weight=1e-6, disc_weight=0.5, disc_start=0),
                            load_lpips("vgg"))
        opt_g = torch.optim.AdamW(vae.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0)
        ema = EMAModel(vae.parameters(), decay=ema_decay)
        for step in range(last):
            if step == first:
                start = time.perf_counter()
            i = (step * batch) % (len(crops) - batch + 1)
            x = crops[i : i + batch]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            with frozen(disc):
                loss, _ = gen(x, recon, posterior, step, disc, vae.decoder.conv_out.weight)
            loss.backward()
            d_loss, _ = discriminator_loss(disc, x, recon, 1.0)
            d_loss.backward()
            for model, opt in ((vae, opt_g), (disc, opt_d)):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            ema.step(vae.parameters())
        return time.perf_counter() - start


# ------------------------------------------------------------------------- the comparison
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--diffusers-script", required=True, type=Path,
                        help="examples/research_projects/autoencoderkl/train_autoencoderkl.py of diffusers")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "bsds500" / "train"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n1", type=int, default=2, help="VAE updates of the short runs")
    parser.add_argument("--n2", type=int, default=8, help="VAE updates of the long runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every contender; 1 by default: on a machine shared with other jobs, "
                             "two threads on one free core spin against each other and timings scatter by 4x")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from codec.models import build_autoencoder

    updates = args.n2 - args.n1
    rows = {"theirs": [], "ours": [], "plain (ours by hand)": []}
    images_per_update = {"theirs": 2 * args.batch, "ours": args.batch, "plain (ours by hand)": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        crops = write_crops(args.data, args.images, args.crop, work / "crops")
        write_torch_hub_vgg16(work / "torch_home")
        build_autoencoder("tiny").save_config(work / "tiny_config")
        # Untimed warm-up: the first run in this process pays imports and first-call costs.
        our_loop("tiny", work / "crops", 1, args.batch, args.crop, 1e-4, 0.999, "no", work / "warm-up", OUR_RECIPE)
        plain_loop(crops, 0, 1, args.batch, 0.999)
        for r in range(args.repeats):
            t1 = their_run(args.diffusers_script, work, work / "crops", 2 * args.n1, args.batch, args.crop, f"a{r}")
            t2 = their_run(args.diffusers_script, work, work / "crops", 2 * args.n2, args.batch, args.crop, f"b{r}")
            rows["theirs"].append((t2 - t1) / updates)
            common = ("tiny", work / "crops")
            rest = (args.batch, args.crop, 1e-4, 0.999, "no")
            t1 = our_loop(*common, args.n1, *rest, work / f"ours_a{r}", OUR_RECIPE)
            t2 = our_loop(*common, args.n2, *rest, work / f"ours_b{r}", OUR_RECIPE)
            rows["ours"].append((t2 - t1) / updates)
            rows["plain (ours by hand)"].append(plain_loop(crops, args.n1, args.n2, args.batch, 0.999) / updates)
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f} s/update" for k, v in rows.items()), flush=True)

    print(f"\ntiny, {args.crop}² crops, batch {args.batch}, fp32, {updates} VAE updates per timing "
          f"(runs of {args.n1} and {args.n2}), {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print("| trainer | s / VAE update min | median | s / image min | median | spread (max/min) |")
    print("|---|---|---|---|---|---|")
    for k, v in rows.items():
        n = images_per_update[k]
        print(f"| {k} | {min(v):.3f} | {statistics.median(v):.3f} | {min(v) / n:.3f} | "
              f"{statistics.median(v) / n:.3f} | {max(v) / min(v):.2f} |")
    theirs, ours, plain = (rows[k] for k in rows)
    print(f"\nours vs theirs per VAE update: {speedup(theirs, ours)}")
    per_image = (statistics.median(theirs) / images_per_update["theirs"]) / (statistics.median(ours) / args.batch)
    print(f"ours vs theirs per image: median {per_image:.2f}x")
    overhead = [o / p - 1 for o, p in zip(ours, plain)]
    median_overhead = statistics.median(ours) / statistics.median(plain) - 1
    print(f"loop overhead (ours vs plain): median {100 * median_overhead:+.1f}%, "
          f"min-vs-min {100 * (min(ours) / min(plain) - 1):+.1f}%, per repeat "
          f"{', '.join(f'{100 * q:+.1f}%' for q in overhead)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
