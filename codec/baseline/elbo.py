"""The VAE objective and its estimates of log p(x), for ``MLPVAE``.

* ``elbo_terms``: one-sample reconstruction term -log p(x|z) and the closed-form KL per example
  (Kingma & Welling 2013); the training loss adds the KL with a weight (beta-VAE, Higgins et al.
  2017), annealed linearly (Bowman et al. 2016) or cyclically (Fu et al. 2019), optionally with
  free bits per latent dimension (Kingma et al. 2016).
* ``importance_weighted_log_likelihood``: log p(x) ~= logsumexp_k log w_k - log K with
  w_k = p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2015), in nats.
* ``active_units``: Cov_x(E_q[z_u]) > 0.01 (Burda et al.), the posterior-collapse diagnostic.

Images are in [-1, 1] (as ``codec.images`` loads them); likelihoods are of the [0, 1] targets.
"""

from __future__ import annotations

import math

import torch

from codec.baseline.mlp_vae import MLPVAE

ANNEALING = ("none", "linear", "cyclical")


def targets(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, P) in [0, 1], what p(x|z) models."""
    return ((x.flatten(1) + 1) / 2).clamp(0, 1)


def kl_weight(step: int, beta: float, schedule: str, steps: int, cycles: int = 4, ratio: float = 0.5) -> float:
    """The KL weight at ``step``: ``beta`` scaled by an annealing factor in [0, 1].

    linear: 0 -> 1 over ``steps``; cyclical: ``cycles`` cycles spread over ``steps``, each rising
    0 -> 1 over its first ``ratio`` and then held (Fu et al. 2019); after ``steps``: 1.
    """
    if schedule not in ANNEALING:
        raise ValueError(f"kl annealing: unknown {schedule!r}; choose from {list(ANNEALING)}")
    if schedule == "none" or steps <= 0 or step >= steps:
        return beta
    if schedule == "linear":
        return beta * step / steps
    period = steps / max(cycles, 1)
    phase = (step % period) / period
    return beta * min(phase / ratio, 1.0)


def terms_from(model: MLPVAE, target: torch.Tensor, params: torch.Tensor, posterior) -> dict[str, torch.Tensor]:
    """Per-example ``rec`` (-log p(x|z)), ``kl`` (closed form) and ``kl_per_dim`` (B, D), from
    decoder parameters of a sampled z and the posterior (the trainer gets both from one forward)."""
    rec = -model.log_likelihood(params.float(), target)
    kl_per_dim = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).float()
    return {"rec": rec, "kl": kl_per_dim.sum(1), "kl_per_dim": kl_per_dim}


def elbo_terms(model: MLPVAE, x: torch.Tensor, labels=None, target: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """:func:`terms_from` for images ``x`` (one z sample each), plus ``params`` and ``posterior``."""
    posterior = model.encode(x, labels).latent_dist
    params = model.decoder_params(posterior.sample(generator), labels)
    terms = terms_from(model, targets(x) if target is None else target, params, posterior)
    return {**terms, "params": params, "posterior": posterior}


def training_loss(terms: dict, weight: float, free_bits: float = 0.0) -> tuple[torch.Tensor, dict]:
    """mean(rec) + weight * KL, where with ``free_bits`` > 0 each latent dimension's batch-mean
    KL counts at least ``free_bits`` nats (no gradient pushes it lower)."""
    rec = terms["rec"].mean()
    kl = terms["kl"].mean()
    if free_bits > 0:
        kl_term = terms["kl_per_dim"].mean(0).clamp(min=free_bits).sum()
    else:
        kl_term = kl
    loss = rec + weight * kl_term
    logs = {"loss": loss.item(), "rec": rec.item(), "kl": kl.item(), "elbo": -(rec + kl).item(),
            "kl_weight": weight}
    return loss, logs


@torch.no_grad()
def importance_weighted_log_likelihood(model: MLPVAE, x: torch.Tensor, labels=None, k: int = 5000,
                                       chunk: int = 500, target: torch.Tensor | None = None,
                                       generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(x) per example (nats), the k-sample importance-weighted bound (tight as k grows).

    The k samples are drawn ``chunk`` at a time and combined with a running log-sum-exp, so
    memory stays at chunk x batch x pixels whatever k is.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got {k} and {chunk}")
    posterior = model.encode(x, labels).latent_dist
    t = targets(x) if target is None else target
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        eps = torch.randn((n, *posterior.mean.shape), generator=generator, dtype=posterior.mean.dtype)
        z = posterior.mean + posterior.std * eps.to(x.device)  # (n, B, D)
        log_px_z = model.log_likelihood(model.decoder_params(z, labels), t)
        log_pz = -0.5 * (math.log(2 * math.pi) + z.pow(2)).sum(-1)
        log_w = (log_px_z + log_pz - posterior.log_prob(z)).double()
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += n
    return (total - math.log(k)).float()


@torch.no_grad()
def posterior_means(model: MLPVAE, x: torch.Tensor, labels=None, batch_size: int = 500) -> torch.Tensor:
    out = []
    for start in range(0, x.shape[0], batch_size):
        lab = None if labels is None else labels[start : start + batch_size]
        out.append(model.encode(x[start : start + batch_size], lab).latent_dist.mean)
    return torch.cat(out)


def active_units(means: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Units whose posterior mean varies across the data: Var_x(E_q[z_u]) > ``threshold``."""
    variance = means.var(0, unbiased=True)
    return int((variance > threshold).sum()), variance


def bits_per_dim(nll_nats: float, dims: int, continuous: bool = False) -> float:
    """Nats per image -> bits per dimension. For a density on [0, 1] of 8-bit data
    (``continuous``), add log(256) per dimension: the discrete likelihood of the 256 levels
    under uniform dequantisation (Theis et al. 2016)."""
    return (nll_nats + (dims * math.log(256) if continuous else 0.0)) / (dims * math.log(2))
