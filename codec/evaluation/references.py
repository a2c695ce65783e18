"""Codecs evaluated side by side: ours, any diffusers autoencoder folder, JPEG and WebP.

Every subject turns one image batch (1, 3, H, W) in [-1, 1] into a :class:`Reconstruction`:
the decoded image, its size in bits per pixel, the time spent encoding and decoding, and for
learned codecs the scaled latents (and the posterior, for KL autoencoders).

* :class:`LearnedCodec` wraps, through :class:`Codec`, a diffusers ``AutoencoderKL`` folder or
  an ``AutoencoderTiny`` folder (TAESD-style, deterministic, no posterior). Its rate is the
  latents stored as fp16: ``channels * 16 / 8**2`` bits per pixel, 1.0 for kl-f8.
* :class:`ClassicalCodec` is JPEG or WebP through Pillow, at the quality whose file is closest
  in size to a target rate (the learned codec's), searched per image.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codec.codec import Codec
from codec.evaluation.activations import ActivationPeaks
from codec.factors import scale_latents
from codec.images import tensor_to_uint8, uint8_to_tensor
from codec.io import read_config
from codec.models import count_parameters, looks_like_hub_id

LATENT_STORAGE_BITS = 16  # latents stored as fp16, the way latent datasets are usually kept
CLASSICAL_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}  # our name -> Pillow format


@dataclass
class Reconstruction:
    image: torch.Tensor  # (1, 3, H, W) float in about [-1, 1]
    bpp: float
    encode_s: float
    decode_s: float
    latents: torch.Tensor | None = None  # scaled, (1, C, H/8, W/8)
    mean: torch.Tensor | None = None  # unscaled posterior, KL autoencoders only
    logvar: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # e.g. the JPEG quality chosen


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock stops before the work does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autoencoder_class(path: str | os.PathLike) -> str:
    """The diffusers class named in a folder's config.json (a pipeline folder: its vae/), or in a
    Hugging Face Hub repository's (``stabilityai/sd-vae-ft-mse``; the Hub's cache serves it offline)."""
    config = read_config(path)
    if config is None and looks_like_hub_id(str(path)):
        config = hub_config(str(path))
    if config is None:
        raise FileNotFoundError(
            f"{path}: no config.json; pass a diffusers AutoencoderKL or AutoencoderTiny folder "
            "(or a pipeline folder with vae/)"
        )
    return config.get("_class_name", "AutoencoderKL")


def hub_config(repo: str) -> dict | None:
    """A Hub repository's VAE config.json (at its top or in vae/), None where it cannot be had."""
    import json

    from huggingface_hub import hf_hub_download

    for subfolder in (None, "vae"):
        try:
            return json.loads(Path(hf_hub_download(repo, "config.json", subfolder=subfolder)).read_text())
        except Exception:  # noqa: BLE001  (not there, offline without a cache, not a repo: try the next)
            continue
    return None


class LearnedCodec:
    """A diffusers AutoencoderKL or AutoencoderTiny folder, timed and measured per image."""

    learned = True

    def __init__(self, path: str | os.PathLike, device=None, dtype: str = "fp32", max_memory=None):
        self.path = str(path)
        self.kind = autoencoder_class(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.kind not in ("AutoencoderKL", "AutoencoderTiny"):
            raise ValueError(
                f"{path}: {self.kind} is not supported; choose an AutoencoderKL or AutoencoderTiny folder"
            )
        self.codec = Codec.from_pretrained(path, device=self.device, dtype=dtype, batch_size=1, max_memory=max_memory)
        self.vae = self.codec.vae
        self.parameters = count_parameters(self.vae)
        # reported only: the latents are scaled by codec.factors, which also applies any
        # per-channel latents_mean/latents_std
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.activations = ActivationPeaks(self.vae)  # the largest |activation| per half, while evaluated

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> scaled latents (the posterior mean for KL autoencoders), on the CPU."""
        return self.codec.encode(x)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Reconstruction:
        h, w = x.shape[-2:]
        _sync(self.device)
        t0 = time.perf_counter()
        mean, logvar = self.codec.posterior(x)
        latents = scale_latents(mean, self.vae.config)  # what Codec.decode expects back
        _sync(self.device)
        t1 = time.perf_counter()
        y = self.codec.decode(latents, size=(h, w))
        if self.kind != "AutoencoderKL":  # a deterministic encoder: no posterior for the KL statistics
            mean = logvar = None
        _sync(self.device)
        t2 = time.perf_counter()
        bpp = latents.numel() / x.shape[0] * LATENT_STORAGE_BITS / (h * w)
        return Reconstruction(y, bpp, t1 - t0, t2 - t1, latents, mean, logvar)


def compress(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    """(H, W, 3) uint8 -> the bytes of a JPEG or WebP file at a Pillow quality (1..100)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=CLASSICAL_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def closest_quality(arr: np.ndarray, fmt: str, target_bytes: float) -> tuple[int, bytes]:
    """The quality (1..100) whose file size is closest to ``target_bytes``, and that file.

    File size grows with quality almost monotonically, so a binary search finds the crossing
    in ~7 encodes; the neighbours of the crossing are then compared exactly.
    """
    lo, hi = 1, 100
    while lo < hi:  # smallest quality whose file is >= target
        mid = (lo + hi) // 2
        if len(compress(arr, fmt, mid)) < target_bytes:
            lo = mid + 1
        else:
            hi = mid
    candidates = {q: compress(arr, fmt, q) for q in (lo - 1, lo, lo + 1) if 1 <= q <= 100}
    best = min(candidates, key=lambda q: (abs(len(candidates[q]) - target_bytes), q))
    return best, candidates[best]


class ClassicalCodec:
    """JPEG or WebP (Pillow) at the file size closest to ``target_bpp`` bits per pixel."""

    learned = False
    parameters = None

    def __init__(self, fmt: str, target_bpp: float):
        if fmt not in CLASSICAL_FORMATS:
            raise ValueError(f"unknown classical codec {fmt!r}; choose from {sorted(CLASSICAL_FORMATS)}")
        self.kind, self.path, self.target_bpp = fmt, f"Pillow {CLASSICAL_FORMATS[fmt]}", target_bpp
        self.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> Reconstruction:
        if x.shape[0] != 1:
            raise ValueError(f"classical codecs take one image at a time, got a batch of {x.shape[0]}")
        arr = tensor_to_uint8(x)[0]
        h, w = arr.shape[:2]
        quality, data = closest_quality(arr, self.kind, self.target_bpp * h * w / 8)
        # Time the chosen setting alone: the quality search is the evaluation's cost, not the codec's.
        t0 = time.perf_counter()
        data = compress(arr, self.kind, quality)
        t1 = time.perf_counter()
        with Image.open(io.BytesIO(data)) as img:
            decoded = np.asarray(img.convert("RGB"))
        t2 = time.perf_counter()
        y = uint8_to_tensor(decoded)[None]
        return Reconstruction(y, len(data) * 8 / (h * w), t1 - t0, t2 - t1,
                              extra={"quality": quality})
