"""``vae-codec export | encode | decode``: a trained run to a shareable codec, images to latents
and back."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from codec.cli.options import codec_args, tile_args

if TYPE_CHECKING:
    from codec.codec import Codec


def register(sub) -> None:
    p = sub.add_parser("export", help="training run / checkpoint -> diffusers folder or single file")
    p.add_argument("source", help="a run folder (uses its latest checkpoint), a checkpoint, a codec "
                   "folder or a single-file .safetensors")
    p.add_argument("output")
    p.add_argument("--data", help="images to re-measure the latent factors on, as `vae-codec scale` does, "
                   "keeping the codec's kind of normalisation (default: keep the run's factors)")
    p.add_argument("--samples", type=int, default=64, help="images used with --data (a seeded sample spread over it)")
    p.add_argument("--resolution", type=int, default=None,
                   help="with --data: short side resized to this, centre-cropped square (default 256; a "
                        "fixed-size codec such as the MLP VAE: its own size)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--format", choices=["diffusers", "single-file"], default="diffusers",
        help="a diffusers folder, or one .safetensors in the CompVis/LDM layout (ComfyUI and A1111 load "
             "it for the sd-kl-f8 architecture only; other presets get a note saying so)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("encode", help="image -> latents (.safetensors); a folder or glob -> a folder of them")
    codec_args(p)
    p.add_argument("image", help="an image, a folder (recursive) or a quoted glob pattern ('photos/*.jpg')")
    p.add_argument("output", help="the latents file, or a folder (names kept, .safetensors) for several")
    p.add_argument("--sample", action="store_true", help="sample the posterior instead of its mean")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--pad", action="store_true", help="pad sizes that are not multiples of 8")
    tile_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("reconstruct", help="image -> latents -> image, and how close it came (PSNR, LPIPS)")
    codec_args(p)
    p.add_argument("image")
    p.add_argument("output", help="the reconstruction (.png)")
    p.add_argument("--pad", action="store_true", help="pad sizes that are not multiples of 8 (cropped back)")
    p.add_argument("--lpips", choices=["alex", "vgg"], default=None,
                   help="also LPIPS with this backbone (real ImageNet weights; see docs/evaluation.md)")
    tile_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("decode", help="latents (.safetensors) -> image; a folder or glob of them -> a folder")
    codec_args(p)
    p.add_argument("latents", help="a latents file, a folder of them (recursive) or a quoted glob pattern")
    p.add_argument("output", help="the image (.png), or a folder for several")
    p.add_argument("--force", action="store_true", help="decode latents that another codec made (or that "
                   "do not say which codec made them), with a warning, instead of refusing them")
    tile_args(p)
    p.set_defaults(func=cmd_decode)



# ------------------------------------------------------------------------- export
def find_codec_folder(source: Path) -> Path:
    """A training run, one checkpoint, or a codec folder -> the diffusers folder to export."""
    from codec.single_file import is_single_file

    if (source / "config.json").exists() or is_single_file(source):
        return source  # already a codec folder or a single-file checkpoint
    if (source / "codec" / "config.json").exists() and (source / "COMPLETE").exists():
        return source / "codec"  # one checkpoint
    ckpts = source / "checkpoints"
    if ckpts.is_dir():
        complete = sorted(p for p in ckpts.iterdir() if (p / "COMPLETE").exists() and (p / "codec").is_dir())
        if complete:
            return complete[-1] / "codec"
    raise FileNotFoundError(
        f"{source}: not a training run (with checkpoints/), a checkpoint (step_XXXXXXXX/) or a "
        "codec folder (config.json)"
    )


def cmd_export(args) -> int:
    from codec.codec import Codec
    from codec.factors import normalisation_of
    from codec.latents.scale import apply_factors, check_rescalable, measure_images, measuring_resolution
    from codec.single_file import save_single_file, ui_incompatibility

    src = find_codec_folder(Path(args.source))
    out = Path(args.output)
    single = args.format == "single-file"
    if single and out.suffix != ".safetensors":
        raise ValueError(f"{out}: --format single-file writes one .safetensors file; name it *.safetensors")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    codec = Codec.from_pretrained(src, device="cpu")
    if single and type(codec.vae).__name__ != "AutoencoderKL":  # before any measuring or deleting
        save_single_file(codec.vae, out)  # raises, naming the kind and the fix
    if args.data:  # re-measured the way `vae-codec scale` measures, keeping the codec's normalisation
        normalisation = normalisation_of(codec.vae.config)
        check_rescalable(codec, normalisation)
        stats = measure_images(codec, args.data, measuring_resolution(codec, args.resolution), args.samples, seed=0)
        apply_factors(codec, stats, normalisation)
        print(f"measured {normalisation} factors on {stats['num_images']} images (scaling_factor "
              f"{codec.scaling_factor:.5f}, {len(stats['skipped'])} unreadable)")
    if out.is_dir():
        shutil.rmtree(out)
    if single:
        codec.meta["exported_from"] = str(src)
        save_single_file(codec.vae, out, meta=codec.meta)
        why = ui_incompatibility(codec.vae.config)
        if why:
            print(f"note: ComfyUI and A1111 will not load {out}: their VAE loaders build only the "
                  f"sd-kl-f8 architecture, and this codec has {why}. diffusers and "
                  "Codec.from_pretrained load it.", file=sys.stderr)
    else:
        codec.save_pretrained(out, meta={"exported_from": str(src)})
    print(f"exported {src} -> {out} (scaling_factor {codec.scaling_factor:.5f})")
    return 0


# ------------------------------------------------------------------------- encode / decode
def _codec(args) -> Codec:
    from codec.codec import Codec

    return Codec.from_pretrained(
        args.codec, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, tile_method=args.tile_method,
        max_memory=args.max_memory,
    )


def cmd_encode(args) -> int:
    from codec.cli.folders import each, inputs_of

    codec = _codec(args)
    many = inputs_of(args.image)
    if many is None:
        loaded = read_image(Path(args.image))
        print(encode_images(codec, args, [(loaded, Path(args.output))])[0])
        return 0
    return each(many, Path(args.output), ".safetensors", load=read_image, group=lambda loaded: loaded[1].shape,
                code=lambda batch: encode_images(codec, args, batch), batch_size=args.batch_size, what="encoding")


def read_image(path: Path):
    from codec.images import load_image, pil_to_tensor

    return path, pil_to_tensor(load_image(path))[None]


def encode_images(codec, args, batch: list) -> list[str]:
    """Encode ``[((image path, image), latents path), ...]``, images of one size, in one call."""
    import torch

    from codec.codec import DOWNSAMPLE, ImageSizeError
    from codec.latents_file import save_latents

    x = torch.cat([image for (_, image), _ in batch])
    h, w = x.shape[-2:]
    # One generator per image: an image's sample is the one it gets when encoded alone.
    gens = [torch.Generator().manual_seed(args.seed) for _ in batch] if args.sample else None
    try:
        latents = codec.encode(x, sample=args.sample, generator=gens, pad=args.pad)
    except ImageSizeError as exc:  # said in the command's own words
        raise ValueError(f"{batch[0][0][0]}: {w}x{h} is not a multiple of {DOWNSAMPLE} pixels; pass --pad (reflection "
                         "padding; decode crops back to the original size) or crop/resize it first") from exc
    said = []
    for ((path, _), output), z in zip(batch, latents):
        save_latents(output, z[None], codec.latent_space, size=(h, w), source=path, codec=args.codec,
                     sampled=bool(args.sample))
        said.append(f"{path} ({w}x{h}) -> {output} latents {tuple(z[None].shape)}")
    return said


def cmd_decode(args) -> int:
    from codec.cli.folders import each, inputs_of

    codec = _codec(args)
    many = inputs_of(args.latents, suffixes=(".safetensors",))
    load = functools.partial(read_checked_latents, codec, args.force)
    if many is None:
        print(decode_latents(codec, [(load(Path(args.latents)), Path(args.output))])[0])
        return 0
    return each(many, Path(args.output), ".png", load=load, group=lambda found: (found[1].latents.shape[1:],
                found[1].size), code=lambda batch: decode_latents(codec, batch), batch_size=args.batch_size,
                what="decoding")


def read_checked_latents(codec, force: bool, path: Path):
    """(path, LatentsFile) of latents in ``codec``'s space (else LatentSpaceMismatch, a ValueError)."""
    from codec.latent_space import check as check_space
    from codec.latents_file import read_latents

    found = read_latents(path)
    warning = check_space(found.space, codec.latent_space, f"the latents in {path}", force=force)
    if warning:
        print(warning, file=sys.stderr)
    if found.latents.ndim in (1, 3):  # one image's latents without the batch dimension
        found = dataclasses.replace(found, latents=found.latents[None])
    return path, found


def decode_latents(codec, batch: list) -> list[str]:
    """Decode ``[((latents path, LatentsFile), image path), ...]``, latents of one shape, in one call."""
    import torch

    from codec.images import save_image

    images = codec.decode(torch.cat([found.latents for (_, found), _ in batch]), size=batch[0][0][1].size)
    said, start = [], 0
    for (path, found), output in batch:
        image = images[start:start + found.latents.shape[0]]
        start += image.shape[0]
        # One image per latent: a file holding several gives OUT-000.png, OUT-001.png ...
        paths = [output] if image.shape[0] == 1 else [output.with_name(f"{output.stem}-{i:03d}{output.suffix}")
                                                      for i in range(image.shape[0])]
        for picture, where in zip(image, paths):
            save_image(picture[None], where)
        shown = str(output) if len(paths) == 1 else f"{paths[0]} ... {paths[-1].name} ({len(paths)} images)"
        said.append(f"{path} -> {shown} ({image.shape[-1]}x{image.shape[-2]})")
    return said


def cmd_reconstruct(args) -> int:
    from codec.codec import DOWNSAMPLE, ImageSizeError
    from codec.evaluation.metrics import LPIPSMetric, psnr
    from codec.images import load_image, pil_to_tensor, save_image

    codec = _codec(args)
    image = pil_to_tensor(load_image(args.image))[None]
    h, w = image.shape[-2:]
    try:
        recon = codec.reconstruct(image, pad=args.pad).clamp(-1, 1)
    except ImageSizeError as exc:  # said in the command's own words, as encode says it
        raise ValueError(f"{args.image}: {w}x{h} is not a multiple of {DOWNSAMPLE} pixels; pass --pad or "
                         "crop/resize it first") from exc
    save_image(recon, args.output)
    scores = f"PSNR {psnr(image, recon).item():.2f} dB"
    if args.lpips:
        metric = LPIPSMetric(args.lpips, codec.device, max_memory=args.max_memory)
        scores += f", LPIPS-{args.lpips} {metric(image, recon).item():.4f}"
    print(f"{args.image} ({w}x{h}) -> {args.output}: {scores}")
    return 0
