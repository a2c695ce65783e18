"""``vae-codec export | encode | decode``: a trained run to a shareable codec, images to latents
and back."""

from __future__ import annotations

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
                   help="also LPIPS with this backbone (real ImageNet weights; see README 'Offline LPIPS weights')")
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
    codec = _codec(args)
    many = inputs_of(args.image)
    if many is None:
        print(encode_one(codec, args, Path(args.image), Path(args.output)))
        return 0
    return each(many, Path(args.output), ".safetensors", lambda src, dst: encode_one(codec, args, src, dst), "encoding")


def encode_one(codec, args, image_path: Path, output: Path) -> str:
    import torch

    from codec.codec import DOWNSAMPLE, ImageSizeError
    from codec.images import load_image, pil_to_tensor
    from codec.latents_file import save_latents

    image = pil_to_tensor(load_image(image_path))[None]
    h, w = image.shape[-2:]
    gen = torch.Generator().manual_seed(args.seed) if args.sample else None
    try:
        latents = codec.encode(image, sample=args.sample, generator=gen, pad=args.pad)
    except ImageSizeError as exc:  # said in the command's own words
        raise ValueError(f"{image_path}: {w}x{h} is not a multiple of {DOWNSAMPLE} pixels; pass --pad (reflection "
                         "padding; decode crops back to the original size) or crop/resize it first") from exc
    save_latents(output, latents, codec.latent_space, size=(h, w), source=image_path, codec=args.codec,
                 sampled=bool(args.sample))
    return f"{image_path} ({w}x{h}) -> {output} latents {tuple(latents.shape)}"


def cmd_decode(args) -> int:
    codec = _codec(args)
    many = inputs_of(args.latents, suffixes=(".safetensors",))
    if many is None:
        print(decode_one(codec, args, Path(args.latents), Path(args.output)))
        return 0
    return each(many, Path(args.output), ".png", lambda src, dst: decode_one(codec, args, src, dst), "decoding")


def decode_one(codec, args, latents_path: Path, output: Path) -> str:
    from codec.images import save_image
    from codec.latent_space import check as check_space
    from codec.latents_file import read_latents

    found = read_latents(latents_path)
    warning = check_space(found.space, codec.latent_space, f"the latents in {latents_path}", force=args.force)
    if warning:
        print(warning, file=sys.stderr)
    image = codec.decode(found.latents, size=found.size)
    # One image per latent: a file holding several gives OUT-000.png, OUT-001.png ...
    paths = [output] if image.shape[0] == 1 else [output.with_name(f"{output.stem}-{i:03d}{output.suffix}")
                                                  for i in range(image.shape[0])]
    for picture, path in zip(image, paths):
        save_image(picture[None], path)
    shown = str(output) if len(paths) == 1 else f"{paths[0]} ... {paths[-1].name} ({len(paths)} images)"
    return f"{latents_path} -> {shown} ({image.shape[-1]}x{image.shape[-2]})"


# ------------------------------------------------------------------------- folders and globs
def inputs_of(source: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[Path, str]] | None:
    """A folder (recursive) or a glob pattern -> [(file, relative name)], sorted; None for one file.
    ``suffixes``: the files taken (default: images)."""
    import glob

    from codec.images import IMAGE_EXTENSIONS

    wanted = suffixes or tuple(IMAGE_EXTENSIONS)
    if Path(source).is_dir():
        root = Path(source)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in wanted and not p.is_dir())
        return [(p, p.relative_to(root).as_posix()) for p in files]
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix.lower() in wanted)
        if not files:
            raise FileNotFoundError(f"{source}: the pattern matches no {'/'.join(wanted)} file")
        return [(p, p.name) for p in files]
    return None


def each(inputs: list[tuple[Path, str]], out_dir: Path, suffix: str, work, what: str) -> int:
    """Run ``work(src, dst)`` on every input into ``out_dir`` (names kept, ``suffix`` set), with a
    progress bar; an input that fails is skipped and recorded (``out_dir/skipped.tsv``), never lost."""
    from tqdm.auto import tqdm

    from codec.images import ImageLoadError

    if not inputs:
        raise FileNotFoundError(f"no input files to {what.removesuffix('ing')}e")
    skipped = []
    for src, name in tqdm(inputs, desc=what, unit="file"):
        try:
            work(src, out_dir / Path(name).with_suffix(suffix))
        except (ImageLoadError, ValueError, OSError) as exc:
            skipped.append((name, str(exc)))
    if skipped:
        (out_dir / "skipped.tsv").write_text("".join(f"{n}\t{r}\n" for n, r in skipped))
    print(f"{len(inputs)} files -> {out_dir}: {len(inputs) - len(skipped)} done, {len(skipped)} skipped"
          + (f" (listed in {out_dir / 'skipped.tsv'})" if skipped else ""))
    for name, reason in skipped[:10]:
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    return 0


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
