"""``Codec``: a diffusers ``AutoencoderKL`` used as an image <-> latent codec.

Latents are returned the way diffusion models consume them, exactly as diffusers pipelines
compute them (:mod:`codec.factors`; with per-channel ``latents_mean``/``latents_std`` unset)::

    latents = (z - shift_factor) * scaling_factor        # after encoding
    z       = latents / scaling_factor + shift_factor     # before decoding

where ``z`` is the posterior mean (default) or a sample of the posterior N(mean, exp(logvar)).
The model itself never applies the factors; they live in the folder's ``config.json``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from codec import single_file
from codec.factors import scale_latents, unscale_latents
from codec.images import tensor_to_pil, to_batch
from codec.io import META_FILE, is_autoencoder_tiny, is_mlp_vae, read_metadata, readable_by_all
from codec.latent_space import check as check_space
from codec.latent_space import encoder_sha256, space_of
from codec.memory import choose_path, parse_memory
from codec.models import load_autoencoder
from codec.precision import run_checked
from codec.tiling import DEFAULT_METHOD, check_method, split_tile_size, tiled_decode, tiled_encode, warn_once

# Extra metadata saved beside diffusers' files (diffusers ignores unknown files in the folder).
DOWNSAMPLE = 8

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class ImageSizeError(ValueError):
    """An image whose sides are not multiples of 8 (``.size`` is (height, width))."""

    def __init__(self, message: str, size: tuple[int, int]):
        super().__init__(message)
        self.size = size


class Codec:
    """Encode images to scaled latents and decode them back.

    ``images`` may be PIL images, uint8 (H, W, 3) arrays or float (B, 3, H, W) tensors in
    [-1, 1]; work is split into batches of ``batch_size`` internally.

    ``tile_size`` (pixels) encodes/decodes images larger than that tile by tile, with device
    memory bounded by the tile. ``tile_method`` "exact" (default) gives the untiled result;
    "stats" and "blend" also bound host memory, overlapping tiles by ``tile_overlap`` pixels
    (default a quarter of the tile) (see :mod:`codec.tiling`). In fp16/bf16 a batch whose
    result overflows (inf/NaN) is redone in float32, with a warning; ``fallbacks`` counts them.

    Without ``tile_size``, each batch whose untiled pass would need more than the memory budget
    (``max_memory``: bytes or "8G"; default half the available host memory, or 80 % of the free
    GPU memory) is encoded/decoded in exact tiles instead (the untiled numbers), with a warning
    the first time; one too large even in tiles is a :class:`codec.memory.MemoryBudgetError`
    before any work (see :mod:`codec.memory`).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        meta: dict | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        tile_method: str = DEFAULT_METHOD,
        max_memory: int | str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype)
        # Hashed before a cast to half precision, so latent_space names the weights as saved.
        self._encoder_hash = None if next(vae.parameters()).dtype == self.dtype else encoder_sha256(vae)
        if next(vae.parameters()).dtype != self.dtype:
            vae = vae.to(dtype=self.dtype)
        self.vae = vae.to(device=self.device).eval().requires_grad_(False)
        if self.device.type == "cuda":
            self.vae.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.meta = dict(meta or {})
        if tile_size:
            split_tile_size(tile_size, tile_overlap)  # a bad tile setting fails here, not mid-job
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.tile_method = check_method(tile_method)
        self.max_memory = parse_memory(max_memory)  # None: the default budget (codec.memory)
        self.name = f"this {type(vae).__name__}"  # what warnings call it; from_pretrained: the path
        self.fallbacks = 0  # batches redone in float32 after a half-precision overflow

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "Codec":
        """Load one of our exports, any diffusers AutoencoderKL folder (or pipeline folder), or a
        single-file ``.safetensors`` in the CompVis/LDM layout (e.g. a downloaded SD VAE)."""
        if single_file.is_single_file(path):
            vae, meta = single_file.load_single_file(path)
        else:
            vae = load_autoencoder(path)
            meta = read_metadata(path)
        codec = cls(vae, meta=meta, **kwargs)
        codec.name = str(path)
        return codec

    def save_pretrained(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (+ our metadata)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # Always saved in fp32: a half-precision export would silently lose training precision.
        if self.dtype != torch.float32:
            self.vae.to(dtype=torch.float32)
        self.vae.save_pretrained(str(path), safe_serialization=True)
        if self.dtype != torch.float32:
            self.vae.to(dtype=self.dtype)
        if is_autoencoder_tiny(self.vae):
            # diffusers' AutoencoderTiny registers a block_out_channels its own __init__ does not take,
            # so loading its saved config warns "config attributes ... are not expected": leave it out.
            config = json.loads((path / "config.json").read_text())
            config.pop("block_out_channels", None)
            (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.meta.update(meta or {})
        (path / META_FILE).write_text(json.dumps(self.meta, indent=2, default=str))
        readable_by_all(path)
        return path

    # ------------------------------------------------------------------ factors
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def native_size(self) -> int | None:
        """The one image side a fixed-size codec takes (the MLP VAE's 28), None for kl-f8 codecs."""
        return int(self.vae.config.image_size) if is_mlp_vae(self.vae) else None

    @property
    def shift_factor(self) -> float:
        # diffusers stores None when a VAE has no shift; pipelines then skip the subtraction.
        return float(self.vae.config.shift_factor or 0.0)

    def set_factors(
        self,
        scaling_factor: float,
        shift_factor: float | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
    ) -> None:
        """Set the factors diffusers pipelines apply (see :mod:`codec.factors`)."""
        self.vae.register_to_config(scaling_factor=float(scaling_factor))
        self.vae.register_to_config(shift_factor=None if shift_factor is None else float(shift_factor))
        for key, value in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if value is None and key not in self.vae.config:
                continue  # a config without the key (AutoencoderTiny) stays one diffusers knows
            self.vae.register_to_config(**{key: None if value is None else [float(v) for v in value]})

    @property
    def latent_space(self) -> dict:
        """The space this codec's latents live in (:mod:`codec.latent_space`): encoder weight hash
        (taken at first use: a codec does not train), today's factors, latent channels, its path."""
        def encoder_hash() -> str:
            if self._encoder_hash is None:
                self._encoder_hash = encoder_sha256(self.vae)
            return self._encoder_hash

        return space_of(self.vae, self.meta, where=self.name, encoder_hash=encoder_hash)

    # ------------------------------------------------------------------ encode / decode
    def _prepare(self, images, pad: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        x = to_batch(images)
        h, w = x.shape[-2:]
        if is_mlp_vae(self.vae):  # a fixed-size model: it checks and converts its input itself
            return self.vae.fit_images(x), (h, w)
        if h % DOWNSAMPLE or w % DOWNSAMPLE:
            if not pad:
                raise ImageSizeError(
                    f"image size {w}x{h} (width x height) is not a multiple of {DOWNSAMPLE}; pass pad=True "
                    f"(pads by reflection, crop back with decode(..., size=({h}, {w}))) or "
                    "crop/resize the images first", (h, w)
                )
            ph, pw = -h % DOWNSAMPLE, -w % DOWNSAMPLE
            # Reflection needs pad < size; replicate covers tiny images.
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return x, (h, w)

    def _batches(self, x: torch.Tensor):
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start : start + self.batch_size].to(self.device, self.dtype)
            if self.device.type == "cuda" and chunk.ndim == 4:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            yield chunk

    def _tiling_for(self, op: str, hw: tuple[int, int], batch: int) -> tuple[int | None, int | None, str]:
        """(tile size, overlap, method) of this batch: the user's tiling, or the path that keeps
        an image inside the memory budget (:mod:`codec.memory`; untiled where it fits)."""
        if self.tile_size or is_mlp_vae(self.vae):
            return self.tile_size, self.tile_overlap, self.tile_method
        side, method, notice = choose_path(self.vae, op, hw, batch, self.dtype, self.device, self.max_memory)
        if notice:
            warn_once(self.vae, f"memory budget: {op} tiles images over the budget (said once): {notice}")
        return side, None, method

    def _encode_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, logvar); logvar None for a deterministic encoder (AutoencoderTiny)."""
        tile, overlap, method = self._tiling_for("encode", tuple(x.shape[-2:]), x.shape[0])
        if tile:
            return tiled_encode(self.vae, x, tile, overlap, method, self.name)
        if is_autoencoder_tiny(self.vae):
            return self.vae.encode(x).latents, None
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.logvar

    def _decode_batch(self, z: torch.Tensor) -> torch.Tensor:
        tile, overlap, method = self._tiling_for("decode", (z.shape[-2] * DOWNSAMPLE, z.shape[-1] * DOWNSAMPLE),
                                                 z.shape[0])
        if tile:
            return tiled_decode(self.vae, z, tile, overlap, method, self.name)
        return self.vae.decode(z).sample

    @torch.no_grad()
    def posterior(self, images, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(mean, logvar)``, each (B, 4, H/8, W/8) float32 ((B, D) for MLPVAE).

        A deterministic encoder (AutoencoderTiny) has a point posterior: ``logvar`` is -inf, so
        its standard deviation is 0 and a "sample" is the latent itself.
        """
        x, _ = self._prepare(images, pad)
        means, logvars = [], []
        for chunk in self._batches(x):
            mean, logvar = run_checked(self, self._encode_batch, chunk, "encode")
            means.append(mean.float().cpu())
            logvars.append(torch.full_like(means[-1], -math.inf) if logvar is None else logvar.float().cpu())
        return torch.cat(means), torch.cat(logvars)

    def encode(
        self,
        images,
        sample: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        pad: bool = False,
    ) -> torch.Tensor:
        """Images -> scaled latents (B, 4, H/8, W/8) ((B, D) for MLPVAE), float32 on the CPU.

        Deterministic (the posterior mean) unless ``sample=True``; pass a ``generator`` to make
        the sample reproducible, or one per image (as diffusers takes them) so that each image's
        sample does not depend on the images batched with it.
        """
        mean, logvar = self.posterior(images, pad=pad)
        z = mean
        if sample:
            if isinstance(generator, (list, tuple)):
                if len(generator) != mean.shape[0]:
                    raise ValueError(f"{len(generator)} generators for {mean.shape[0]} images; pass one per image")
                noise = torch.stack([torch.randn(mean.shape[1:], generator=g, dtype=mean.dtype) for g in generator])
            else:
                noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return scale_latents(z, self.vae.config)

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, size: tuple[int, int] | None = None, output_type: str = "pt",
        check: dict | None = None,
    ):
        """Scaled latents (B, 4, h, w) -> images.

        ``output_type``: "pt" gives (B, 3, 8h, 8w) float32 in about [-1, 1] (not clamped, as
        the decoder outputs it), "pil" a list of PIL images. ``size=(H, W)`` crops the output
        back to an original size after ``encode(..., pad=True)``. ``check``: the latent space the
        latents were recorded in (:func:`codec.latents_file.read_latents`, a manifest's
        ``codec["latent_space"]``); another space than :attr:`latent_space` is a
        :class:`codec.latent_space.LatentSpaceMismatch` naming both, before any decoding.
        """
        if check is not None:
            check_space(check, self.latent_space, "these latents", fix="decode them with the codec that made them")
        self._check_latents_shape(latents)
        if latents.ndim in (1, 3):
            latents = latents[None]
        z = unscale_latents(latents.float(), self.vae.config)
        outs = [run_checked(self, self._decode_batch, c, "decode").float().cpu() for c in self._batches(z)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # no copy of a (big) single batch
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)  # greyscale models (MLPVAE on MNIST) decode to RGB images
        if size is not None:
            h, w = size
            if h > out.shape[-2] or w > out.shape[-1]:
                raise ValueError(f"size {size} is larger than the decoded {tuple(out.shape[-2:])}")
            out = out[..., :h, :w]
        if output_type == "pt":
            return out
        if output_type == "pil":
            return tensor_to_pil(out)
        raise ValueError(f"unknown output_type {output_type!r}; choose from ['pil', 'pt']")

    def _check_latents_shape(self, latents: torch.Tensor) -> None:
        """kl-f8: (B, C, h, w) for any h, w; models with flat latents (MLPVAE): (B, D)."""
        if is_mlp_vae(self.vae):
            shape = tuple(self.vae.latent_shape())
            ok = tuple(latents.shape[-len(shape):]) == shape and latents.ndim in (len(shape), len(shape) + 1)
            expected = f"(B, {', '.join(map(str, shape))})"
        else:
            channels = self.vae.config.latent_channels
            ok = latents.ndim in (3, 4) and latents.shape[-3] == channels
            expected = f"(B, {channels}, h, w)"
        if not ok:
            raise ValueError(f"latents must be {expected}, got {tuple(latents.shape)}")

    def reconstruct(self, images, pad: bool = False) -> torch.Tensor:
        """Encode then decode (posterior mean), cropped back to the input size."""
        x = to_batch(images)
        return self.decode(self.encode(x, pad=pad), size=tuple(x.shape[-2:]))

    def measure_factors(self, batches, generator: torch.Generator | None = None) -> dict:
        """Measure the latent statistics behind ``scaling_factor`` (1 / std, SD's 0.18215 rule).

        ``batches`` is an iterable of image batches (anything :meth:`encode` accepts). The
        statistics are over *posterior samples* of the unscaled latents, since samples are what
        a diffusion model trained on this codec sees. Returns ``{"std", "mean",
        "scaling_factor", "num_images", "channel_mean", "channel_std"}`` (the last two per
        latent channel, for ``latents_mean``/``latents_std``); apply with :meth:`set_factors`.
        """
        total = total_sq = 0.0
        count = images = 0
        ch_sum = ch_sq = 0.0
        for batch in batches:
            mean, logvar = self.posterior(batch)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
            z = z.double()
            total += z.sum().item()
            total_sq += z.pow(2).sum().item()
            per_channel = (0, *range(2, z.ndim))  # (B, C, h, w) or the MLP's flat (B, C)
            ch_sum = ch_sum + z.sum(dim=per_channel)
            ch_sq = ch_sq + z.pow(2).sum(dim=per_channel)
            count += z.numel()
            images += z.shape[0]
        if count == 0:
            raise ValueError("measure_factors needs at least one image")
        mu = total / count
        std = max(total_sq / count - mu * mu, 0.0) ** 0.5
        if std == 0.0:
            raise ValueError("latents have zero variance; cannot derive a scaling factor")
        per = count / z.shape[1]
        ch_mean = ch_sum / per
        ch_std = (ch_sq / per - ch_mean**2).clamp(min=0).sqrt()
        return {"std": std, "mean": mu, "scaling_factor": 1.0 / std, "num_images": images,
                "channel_mean": ch_mean.tolist(), "channel_std": ch_std.tolist()}
