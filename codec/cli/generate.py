"""``vae-codec sample`` and ``vae-codec interpolate``: what a VAE's latent space looks like.

* ``sample``: z ~ N(0, I), the prior, decoded (``--label`` for a conditional MLP VAE; for a
  kl-f8 codec ``--size`` picks the image size, latents (4, size/8, size/8)). A kl-f8 codec's
  prior is only weakly enforced (KL weight 1e-6), which is why diffusion models are trained on
  its latents; sampling it shows that.
* ``interpolate``: the posterior means of two images, linearly (or ``--slerp``) interpolated in
  ``--steps`` steps, decoded into one row.

Both work for ``MLPVAE`` and ``AutoencoderKL`` codecs alike (the encode/decode interface is
shared); latents are unscaled z here (the prior is on z, before ``scaling_factor``).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _no_grad(fn):
    """``torch.no_grad()`` as a decorator that imports torch only when the command runs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


def _model(args):
    import torch

    from codec.models import load_autoencoder

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return load_autoencoder(args.codec).to(dev).eval().requires_grad_(False), dev


@_no_grad
def sample_prior(model, num: int, generator: torch.Generator, size: int | None = None, labels=None,
                 temperature: float = 1.0) -> torch.Tensor:
    """``num`` decoded prior samples, (num, C, H, W) in [-1, 1]."""
    import torch

    from codec.io import is_mlp_vae

    dev = next(model.parameters()).device
    if is_mlp_vae(model):
        if size is not None:
            raise ValueError("--size applies to kl-f8 codecs; an MLP VAE has a fixed image size")
        shape = tuple(model.latent_shape())
    else:
        side = size or model.config.sample_size
        if side % 8:
            raise ValueError(f"--size must be a multiple of 8, got {side}")
        shape = (model.config.latent_channels, side // 8, side // 8)
    z = torch.randn((num, *shape), generator=generator) * temperature
    kwargs = {}
    if labels is not None:
        kwargs["labels"] = torch.as_tensor(labels).to(dev)
    elif is_mlp_vae(model) and model.config.num_classes:
        raise ValueError("this is a conditional VAE: pass --label (a class in [0, num_classes))")
    return model.decode(z.to(dev), **kwargs).sample.float().cpu()


def _load_for(model, path: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """One image as (1, C, H, W) the model accepts: MLP VAEs get their size (and grey)."""
    import torch.nn.functional as F
    from PIL import Image

    from codec.images import load_image, pil_to_tensor
    from codec.io import is_mlp_vae

    img = load_image(path)
    if is_mlp_vae(model):
        s = model.config.image_size
        img = img.resize((s, s), Image.BICUBIC) if img.size != (s, s) else img
        return model.fit_images(pil_to_tensor(img)[None])
    x = pil_to_tensor(img)[None]
    if like is not None and x.shape[-2:] != like.shape[-2:]:
        x = F.interpolate(x, size=like.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    h, w = x.shape[-2:]
    return x[..., : h - h % 8, : w - w % 8]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation (White 2016): keeps the norm typical of Gaussian samples."""
    import torch


    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@_no_grad
def interpolate(model, a: torch.Tensor, b: torch.Tensor, steps: int, spherical: bool = False,
                labels=None) -> torch.Tensor:
    """Images a, b (1, C, H, W) -> (steps, C, H, W): decoded interpolations of posterior means."""
    import torch


    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}")
    dev = next(model.parameters()).device
    kw = {} if labels is None else {"labels": torch.as_tensor(labels).to(dev)}
    za = model.encode(a.to(dev), **kw).latent_dist.mean
    zb = model.encode(b.to(dev), **kw).latent_dist.mean
    ts = [i / (steps - 1) for i in range(steps)]
    z = torch.cat([slerp(za, zb, t) if spherical else (1 - t) * za + t * zb for t in ts])
    if labels is not None:
        kw = {"labels": torch.as_tensor(labels).to(dev).reshape(-1)[:1].expand(steps)}
    return model.decode(z, **kw).sample.float().cpu()


def cmd_sample(args) -> int:
    import torch

    from codec.images import make_grid_image

    model, _ = _model(args)
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    gen = torch.Generator().manual_seed(args.seed)
    labels = None if args.label is None else [args.label] * args.num
    images = sample_prior(model, args.num, gen, size=args.size, labels=labels, temperature=args.temperature)
    per_row = args.per_row or math.ceil(math.sqrt(args.num))
    make_grid_image(list(images.split(per_row)), args.output)
    print(f"{args.num} prior samples -> {args.output}")
    return 0


def cmd_interpolate(args) -> int:
    from codec.images import make_grid_image

    model, _ = _model(args)
    a = _load_for(model, args.image_a)
    b = _load_for(model, args.image_b, like=a)
    labels = None if args.label is None else [args.label]
    row = interpolate(model, a, b, args.steps, spherical=args.slerp, labels=labels)
    make_grid_image([row], args.output)
    print(f"{args.steps} steps from {args.image_a} to {args.image_b} -> {args.output}")
    return 0


def register(sub) -> None:
    def common(p):
        # --batch-size / --dtype of codec.cli.options.codec_args have no meaning here.
        p.add_argument("--codec", required=True, help="codec folder: an MLP VAE or a kl-f8 AutoencoderKL")
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
        p.add_argument("--label", type=int, default=None, help="class for a conditional MLP VAE")

    p = sub.add_parser("sample", help="decode samples of the prior N(0, I) into a grid image")
    common(p)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--per-row", type=int, default=0, help="images per row (default: a square grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the prior's standard deviation")
    p.add_argument("--size", type=int, default=None, help="kl-f8 codecs: image side (default: config.sample_size)")
    p.add_argument("output")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("interpolate", help="decode the path between two images' latents into a row")
    common(p)
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("output")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.set_defaults(func=cmd_interpolate)
