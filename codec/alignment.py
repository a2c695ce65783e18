"""How well latents align with a vision foundation model: VA-VAE's two terms (Yao et al. 2025,
hustvl/LightningDiT ``vavae/ldm/modules/losses/contperceptual.py``, ``combined_v3``), for
projected latents z' (B, C, h, w) and features f (B, C, h, w) on the same grid:

    cosine term   = mean over positions of  relu(1 - m1 - cos(z'ᵢ, fᵢ))                 (m1 = 0.5)
    distance term = mean over position pairs (per image) of
                    relu(|cos(z'ᵢ, z'ⱼ) - cos(fᵢ, fⱼ)| - m2)                             (m2 = 0.25)

Training adds them (``loss.vf_weight``, :mod:`train.autoencoder.vf_loss`) with a trained 1×1
projector. An exported codec has no projector, so :class:`AlignmentMeasures` (``vae-codec eval
--vf-model``) fits one per image: the least-squares linear map (1×1, no bias, like the trained
one) from the latents to the features; it reports both terms and their margin-free means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COS_MARGIN, DISTANCE_MARGIN = 0.5, 0.25  # the reference's cos_margin and distmat_margin


def cosine_term(projected: torch.Tensor, features: torch.Tensor, margin: float = COS_MARGIN) -> torch.Tensor:
    """Marginal cosine similarity: mean relu(1 - margin - cos) over batch and positions."""
    cos = F.cosine_similarity(projected, features, dim=1)  # (B, h, w)
    return F.relu(1 - margin - cos).mean()


def similarity_matrices(projected: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity between every two positions of each image: two (B, N, N), N = h·w."""
    p = F.normalize(projected.flatten(2), dim=1)  # (B, C, N)
    f = F.normalize(features.flatten(2), dim=1)
    return p.transpose(1, 2) @ p, f.transpose(1, 2) @ f


def distance_term(projected: torch.Tensor, features: torch.Tensor, margin: float = DISTANCE_MARGIN) -> torch.Tensor:
    """Marginal distance-matrix similarity: mean relu(|Δ cos| - margin) over all position pairs."""
    sim_p, sim_f = similarity_matrices(projected, features)
    return F.relu((sim_p - sim_f).abs() - margin).mean()


def fit_projection(latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Least-squares 1×1 map (no bias) of one image's latents (1, c, h, w) to its features
    (1, C, h, w): the latents projected, (1, C, h, w)."""
    z = latents[0].flatten(1).T.double()  # (N, c)
    f = features[0].flatten(1).T.double()  # (N, C)
    weights = torch.linalg.lstsq(z, f, driver="gelsd").solution  # (c, C); gelsd: rank-deficient z too
    return (z @ weights).T.reshape(features.shape).float()


class AlignmentMeasures:
    """Running means of both terms (and of the plain cosine and |Δ cos|) over images, with a
    projection fitted per image (:func:`fit_projection`); ``merge`` joins other processes'."""

    def __init__(self, model, cos_margin: float = COS_MARGIN, distance_margin: float = DISTANCE_MARGIN):
        self.model, self.name, self.margins = model, model.name, (cos_margin, distance_margin)
        self.sums = {"cosine_term": 0.0, "distance_term": 0.0, "mean_cosine": 0.0, "mean_distance_error": 0.0}
        self.images, self.left_out = 0, 0

    def update(self, x: torch.Tensor, latents: torch.Tensor) -> None:
        """One image (1, 3, H, W) in [-1, 1] and its latents (1, c, H/8, W/8); images whose sides
        are not multiples of 16 have no token grid and are counted as left out."""
        from codec.foundation import TOKEN_SIDE, match_grid

        if x.shape[-2] % TOKEN_SIDE or x.shape[-1] % TOKEN_SIDE:
            self.left_out += 1
            return
        device = next(self.model.buffers()).device
        features = self.model(x.to(device)).float().cpu()
        projected = fit_projection(match_grid(latents.float().cpu(), features.shape[-2:], self.model.name), features)
        sim_p, sim_f = similarity_matrices(projected, features)
        values = {"cosine_term": cosine_term(projected, features, self.margins[0]),
                  "distance_term": distance_term(projected, features, self.margins[1]),
                  "mean_cosine": F.cosine_similarity(projected, features, dim=1).mean(),
                  "mean_distance_error": (sim_p - sim_f).abs().mean()}
        for key, value in values.items():
            self.sums[key] += float(value)
        self.images += 1

    def merge(self, other: "AlignmentMeasures") -> None:
        for key in self.sums:
            self.sums[key] += other.sums[key]
        self.images += other.images
        self.left_out += other.left_out

    def __getstate__(self) -> dict:  # sent between processes: the model stays behind
        return {**self.__dict__, "model": None}

    def result(self) -> dict:
        means = {k: (v / self.images if self.images else None) for k, v in self.sums.items()}
        return {"model": self.name, **means, "images": self.images,
                "left_out": self.left_out, "cos_margin": self.margins[0], "distance_margin": self.margins[1],
                "projection": "least squares per image (1x1, no bias)"}
