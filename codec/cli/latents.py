"""``vae-codec compress | verify | decompress | scale``: image datasets <-> latent shards
(the work is :mod:`codec.latents`; ``python -m codec.compress`` is :func:`main`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from codec.choices import LATENT_DTYPE_NAMES, STORES
from codec.cli.options import codec_args, memory_arg, source_args, tile_args
from codec.launch import relaunch_if_needed


def _default_workers() -> int:

    return min(4, os.cpu_count() or 1)


def register(sub) -> None:
    """Add compress / verify / decompress / scale to the ``vae-codec`` parser."""
    p = sub.add_parser("compress", help="image folder / tar shards -> latent shards (resumable)")
    codec_args(p)
    p.add_argument("--input", required=True,
                   help="image folder (recursive, .tar shards included), a file list, a .tar or a brace pattern of "
                        "them, a URL or pipe: command of .tar shards (streamed, one chunk per shard), hf:NAME or a "
                        "save_to_disk folder (the values data.train takes)")
    source_args(p)
    p.add_argument("--output", required=True, help="folder for shards/ and manifest.json")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize the short side and centre-crop to this square "
                   "(default: native size, cropped to multiples of 8)")
    p.add_argument("--store", default="mean", choices=list(STORES),
                   help="posterior mean, one posterior sample, or mean and std "
                   "(fresh samples every epoch)")
    p.add_argument("--latent-dtype", default="fp16", choices=list(LATENT_DTYPE_NAMES))
    p.add_argument("--shard-size", type=int, default=1000,
                   help="inputs per chunk (one shard per latent shape)")
    p.add_argument("--num-workers", type=int, default=_default_workers(),
                   help="image decoding processes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the posterior samples of --store sample")
    p.add_argument("--flip", action="store_true",
                   help="also store the latents of the horizontally mirrored image (for flip augmentation; "
                        "LatentDataset picks one of the two per access)")
    p.add_argument("--labels", default="auto", choices=["auto", "folders"],
                   help="auto: class labels from .cls / .json side data where present; folders: the first "
                        "folder under --input is the class (class_name/image.jpg)")
    p.add_argument("--buckets", type=int, default=None, metavar="SIDE",
                   help="aspect-ratio buckets of about SIDE² pixels (e.g. 256, 1024): each image is resized to "
                        "the bucket closest to its aspect ratio and centre-cropped; shards group by bucket")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("verify",
                       help="check latent shards: checksums, manifest vs shards vs inputs")
    p.add_argument("latents", help="a folder written by `vae-codec compress`")
    p.add_argument("--input", default=None, help="list these inputs again and compare "
                   "(default: the job's input, if it still exists)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("decompress", help="latent shards -> PNG images (decoded)")
    p.add_argument("latents")
    p.add_argument("output")
    p.add_argument("--codec", default=None,
                   help="codec folder (default: the one named in the manifest); one of another latent space "
                        "is refused")
    p.add_argument("--force", action="store_true", help="decode with a --codec of another latent space "
                   "anyway, with a warning")
    p.add_argument("--limit", type=int, default=None, help="decode at most this many images (in manifest order)")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="decode only these inputs (their keys, e.g. sub/img01.jpg; see manifest.json)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=int, default=8)
    memory_arg(p)
    tile_args(p)
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("scale",
                       help="measure scaling_factor (and shift) on images, write it into the codec")
    codec_args(p)
    p.add_argument("--input", required=True, help="images: any source compress takes (a stream is read from "
                   "its start, --samples images)")
    source_args(p)
    p.add_argument("--resolution", type=int, default=None,
                   help="short side resized to this and centre-cropped square for measuring (default 256; a "
                        "fixed-size codec such as the MLP VAE: its own size)")
    p.add_argument("--samples", type=int, default=512, help="images used, spread over the input")
    p.add_argument("--shift", action="store_true",
                   help="also set shift_factor to the latent mean (SD3/Flux style)")
    p.add_argument("--per-channel", action="store_true",
                   help="set latents_mean/latents_std per channel instead (SDXL style; "
                        "scaling_factor becomes 1)")
    p.add_argument("--output", default=None,
                   help="write the codec here instead of updating --codec in place")
    p.add_argument("--num-workers", type=int, default=_default_workers())
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scale)


def cmd_compress(args) -> int:
    from codec.latents.compress import compress

    compress(
        args.codec, args.input, args.output, resolution=args.resolution, store=args.store,
        latent_dtype=args.latent_dtype, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, dtype=args.dtype, seed=args.seed,
        progress=not args.no_progress, flip=args.flip, labels=args.labels, buckets=args.buckets,
        bucket_step=args.bucket_step, image_column=args.image_column, split=args.split, streaming=args.streaming,
        max_memory=args.max_memory,
    )
    return 0


def cmd_verify(args) -> int:
    from codec.latents import shards as sh
    from codec.sources import list_source

    manifest = sh.load_manifest(args.latents)
    source = args.input or manifest["inputs"]["source"]
    keys = None
    if "shards" in manifest["inputs"]:
        print(f"note: input {source} is a stream; checked the manifest's own input list only")
    elif Path(source).exists():
        options = {k: manifest["inputs"][k] for k in ("image_column", "split") if k in manifest["inputs"]}
        keys = [i.key for i in list_source(source, options.get("image_column", "image"), options.get("split", "train"))]
    else:
        print(f"note: input {source} is not reachable; checked the manifest's own input list only")
    problems, s = sh.verify(args.latents, keys)
    for p in problems:
        print(f"problem: {p}")
    if problems:
        print(f"{args.latents}: {len(problems)} problem(s)")
        return 1
    print(
        f"{args.latents}: OK, {s['inputs']} inputs = {s['encoded']} in {s['shards']} shards "
        f"+ {s['skipped']} skipped; checksums match"
        + ("; inputs match" if keys is not None else "")
    )
    return 0


def cmd_decompress(args) -> int:
    from codec.latents.compress import decompress

    n = decompress(
        args.latents, args.output, args.codec, args.device, args.dtype, args.batch_size,
        args.tile_size, args.tile_overlap, args.tile_method, max_memory=args.max_memory, force=args.force,
        limit=args.limit, keys=args.keys,
    )
    print(f"decoded {n} images into {args.output}")
    return 0


def _fmt(values) -> str:

    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def cmd_scale(args) -> int:
    from codec.codec import Codec
    from codec.latents import shards as sh
    from codec.latents.scale import apply_factors, check_rescalable, measure_images, measuring_resolution

    if args.shift and args.per_channel:
        raise ValueError("--shift and --per-channel exclude each other (no pipeline applies both)")
    target = Path(args.output or args.codec)
    if args.output is None and not (target / "config.json").exists():
        raise ValueError(
            f"{target} has no config.json to update (a pipeline folder?); pass --output DIR"
        )
    codec = Codec.from_pretrained(
        args.codec, device=args.device, dtype=args.dtype, batch_size=args.batch_size, max_memory=args.max_memory
    )
    normalisation = "per-channel" if args.per_channel else "shift" if args.shift else "scale"
    check_rescalable(codec, normalisation)
    resolution = measuring_resolution(codec, args.resolution)
    before = codec.scaling_factor
    stats = measure_images(codec, args.input, resolution, args.samples, args.seed, args.num_workers,
                           image_column=args.image_column, split=args.split, streaming=args.streaming)
    apply_factors(codec, stats, normalisation)
    # Saved beside and renamed in: the weights being overwritten may still be memory-mapped.
    tmp = target.parent / f"{target.name}{sh.TMP_MARK}scale"
    codec.save_pretrained(tmp)
    target.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, target / f.name)
    tmp.rmdir()
    shift = f", shift_factor {codec.shift_factor:.5f}" if args.shift else ""
    if args.per_channel:
        shift = f", latents_mean {_fmt(stats['channel_mean'])}, latents_std {_fmt(stats['channel_std'])}"
    print(
        f"scaling_factor {before:.5f} -> {codec.scaling_factor:.5f}{shift} (1 / std of posterior "
        f"samples over {stats['num_images']} images, {len(stats['skipped'])} unreadable); "
        f"written to {target}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m codec.compress ARGS`` == ``vae-codec compress ARGS``."""

    from codec.cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    relaunched = relaunch_if_needed("codec.compress", argv)
    return relaunched if relaunched is not None else cli_main(["compress", *argv])
