"""``vae-codec eval`` for the vanilla VAE baseline (``MLPVAE`` codecs).

What the VAE literature reports, on the test split of an array dataset (MNIST .npz, idx folder)
or on fixed crops of an image folder:

* test ELBO (one posterior sample per image) with its reconstruction and KL terms, in nats;
* log p(x) by importance weighting with k samples (Burda et al. 2015), in nats and bits/dim;
* active units (Var_x E_q[z_u] > 0.01), the posterior-collapse diagnostic;
* pictures: samples from the prior, an interpolation grid, reconstructions.

Bernoulli models trained on stochastically binarised data are evaluated on a binarisation of
the test set drawn once with ``--seed`` (Burda et al.'s protocol); ``metrics.json`` records it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from codec.baseline import elbo
from codec.baseline.arrays import binarize, is_array_source, load_split, to_tensor
from codec.baseline.mlp_vae import MLPVAE
from codec.images import ImageLoadError, list_images, load_image, make_grid_image, pil_to_tensor
from codec.io import is_mlp_vae, read_metadata
from codec.models import count_parameters, load_autoencoder


def load_eval_set(data: str, model: MLPVAE, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """(N, C, S, S) in [-1, 1], labels or None, notes. Image folders give every non-overlapping
    S x S tile of each image (S = the model's image size), in file order."""
    notes: list[str] = []
    s, c = model.config.image_size, model.config.in_channels
    if is_array_source(data):
        x, y = load_split(data, "test")
        x, y = to_tensor(x), torch.from_numpy(y)
        if tuple(x.shape[-2:]) != (s, s) or c != 1:
            raise ValueError(f"{data}: {x.shape[-2]}x{x.shape[-1]} greyscale images; this model takes {c}x{s}x{s}")
        if limit:
            x, y = x[:limit], y[:limit]
        return x, y, notes
    tiles = []
    for path in list_images(data)[: limit or None]:
        try:
            img = pil_to_tensor(load_image(path))
        except ImageLoadError as exc:
            notes.append(f"skipped: {exc}")
            continue
        h, w = img.shape[-2:]
        for top in range(0, h - s + 1, s):
            for left in range(0, w - s + 1, s):
                tiles.append(img[:, top : top + s, left : left + s])
    if not tiles:
        raise ValueError(f"{data}: no usable {s}x{s} tiles")
    x = torch.stack(tiles)
    return (x.mean(1, keepdim=True) if c == 1 else x), None, notes


def evaluate_vae(codec: str, data: str, out: str, nll_samples: int = 5000, limit: int = 0,
                 batch_size: int = 100, chunk: int = 500, binarize_mode: str = "auto", seed: int = 0,
                 device: str | None = None) -> dict:
    model = load_autoencoder(codec)
    if not is_mlp_vae(model):
        raise ValueError(f"{codec}: --nll-samples and array data need an MLPVAE codec (the vanilla VAE baseline)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev).eval().requires_grad_(False)
    meta = read_metadata(codec)
    trained_binarized = bool(meta.get("train_config", {}).get("mlp", {}).get("binarize", False))
    x, labels, notes = load_eval_set(data, model, limit)
    if model.config.num_classes and labels is None:
        raise ValueError(f"{codec} is a conditional VAE; evaluate it on labelled data (.npz, idx folder)")
    cond = labels if model.config.num_classes else None
    bernoulli = model.config.likelihood == "bernoulli"
    do_binarize = {"auto": bernoulli and trained_binarized, "yes": True, "no": False}[binarize_mode]
    gen = torch.Generator().manual_seed(seed)
    if do_binarize:
        x = binarize(x, gen)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    dims = model.num_pixels
    rec = kl = 0.0
    start = time.monotonic()
    per_image_ll = []
    # Every sampled figure comes from the seed: the ELBO's one posterior sample per image too
    # (its own generator, so the importance samples are those of earlier releases).
    elbo_gen = torch.Generator().manual_seed(seed)
    for s in tqdm(range(0, x.shape[0], batch_size), desc=f"eval (k={nll_samples})", unit="batch"):
        xb = x[s : s + batch_size].to(dev)
        lb = None if cond is None else cond[s : s + batch_size].to(dev)
        terms = elbo.elbo_terms(model, xb, lb, generator=elbo_gen)
        rec += terms["rec"].sum().item()
        kl += terms["kl"].sum().item()
        if nll_samples:
            lp = elbo.importance_weighted_log_likelihood(model, xb, lb, k=nll_samples, chunk=chunk, generator=gen)
            per_image_ll.append(lp.cpu())
    n = x.shape[0]
    seconds = time.monotonic() - start
    means = elbo.posterior_means(model, x.to(dev), None if cond is None else cond.to(dev))
    active, variances = elbo.active_units(means.cpu())
    continuous = not bernoulli  # a Gaussian density of 8-bit data: bits/dim add log 256 per dim
    report = {
        "codec": str(codec), "data": str(data), "images": n, "pixels_per_image": dims,
        "likelihood": model.config.likelihood, "binarized_test_set": do_binarize, "binarize_seed": seed,
        "conditional": bool(model.config.num_classes), "parameters": count_parameters(model),
        "latent_size": model.config.latent_size,
        "elbo_nats": -(rec + kl) / n, "reconstruction_nats": rec / n, "kl_nats": kl / n,
        "active_units": active, "latent_variance": [round(v, 5) for v in variances.tolist()],
        "seconds": seconds, "notes": notes,
    }
    report["elbo_bits_per_dim"] = elbo.bits_per_dim(-report["elbo_nats"], dims, continuous)
    if nll_samples:
        lp = torch.cat(per_image_ll).double()
        report.update({
            "nll_samples": nll_samples, "log_likelihood_nats": lp.mean().item(),
            "log_likelihood_stderr": (lp.std() / math.sqrt(n)).item() if n > 1 else 0.0,
            "bits_per_dim": elbo.bits_per_dim(-lp.mean().item(), dims, continuous),
        })
    if bernoulli and not do_binarize:
        notes.append("Bernoulli likelihood of grey levels: not a normalised density; compare with care")
    report["pictures"] = write_pictures(model, x, cond, out_dir, seed)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    return report


@torch.no_grad()
def write_pictures(model: MLPVAE, x: torch.Tensor, labels, out_dir: Path, seed: int) -> dict:
    """samples.png (prior; one row per class for a conditional VAE), interpolation.png (rows of
    posterior-mean interpolations between test images), reconstructions.png (top: input)."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    d = model.config.latent_size
    k = model.config.num_classes
    if k:
        z = torch.randn(k * 8, d, generator=gen)
        cls = torch.arange(k).repeat_interleave(8)
        rows = model.decode(z.to(dev), cls.to(dev)).sample.cpu().split(8)
    else:
        rows = model.decode(torch.randn(64, d, generator=gen).to(dev)).sample.cpu().split(8)
    paths = {"samples": str(make_grid_image(list(rows), out_dir / "samples.png"))}
    pairs = min(len(x) // 2, 4)  # up to 4 rows, each between two images (an odd set leaves one out)
    if pairs:
        a, b = x[0 : 2 * pairs : 2].to(dev), x[1 : 2 * pairs : 2].to(dev)
        la = lb = None
        if labels is not None:
            la, lb = labels[0 : 2 * pairs : 2].to(dev), labels[1 : 2 * pairs : 2].to(dev)
        za, zb = model.encode(a, la).latent_dist.mean, model.encode(b, lb).latent_dist.mean
        grid = []
        for i in range(pairs):
            t = torch.linspace(0, 1, 10, device=dev)[:, None]
            z = (1 - t) * za[i] + t * zb[i]
            lab = None if la is None else la[i].expand(10)
            grid.append(model.decode(z, lab).sample.cpu())
        paths["interpolation"] = str(make_grid_image(grid, out_dir / "interpolation.png"))
    xs = x[:16].to(dev)
    ls = None if labels is None else labels[:16].to(dev)
    recon = model.decode(model.encode(xs, ls).latent_dist.mean, ls).sample.cpu()
    paths["reconstructions"] = str(make_grid_image([xs.cpu(), recon], out_dir / "reconstructions.png"))
    return paths


def summary(report: dict) -> str:
    lines = [
        f"{report['images']} test images, {report['pixels_per_image']} dims, {report['likelihood']} decoder"
        + (" (binarised test set)" if report["binarized_test_set"] else ""),
        f"test ELBO            {report['elbo_nats']:.2f} nats  ({report['elbo_bits_per_dim']:.4f} bits/dim)"
        f"  = -rec {report['reconstruction_nats']:.2f} - KL {report['kl_nats']:.2f}",
    ]
    if "log_likelihood_nats" in report:
        lines.append(
            f"log p(x), k={report['nll_samples']:<6} {report['log_likelihood_nats']:.2f} ± "
            f"{report['log_likelihood_stderr']:.2f} nats  ({report['bits_per_dim']:.4f} bits/dim)"
        )
    lines.append(f"active units         {report['active_units']} / {report['latent_size']}")
    return "\n".join(lines)
