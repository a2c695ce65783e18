"""Options shared by several ``vae-codec`` subcommands (kept apart so command modules need not
import each other)."""

from __future__ import annotations

from codec.choices import DEFAULT_TILE_METHOD as DEFAULT_METHOD
from codec.choices import TILE_METHODS as METHODS


def codec_args(p) -> None:
    """--codec/--device/--dtype/--batch-size: every subcommand that loads one codec."""
    p.add_argument("--codec", required=True, help="codec folder (ours or any diffusers AutoencoderKL)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=int, default=8)
    memory_arg(p)


def memory_arg(p) -> None:
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of one encode/decode pass, e.g. 8G or 512M (default: half the available "
                        "host memory, or 80%% of the free GPU memory); images over it are done in exact tiles "
                        "(the same numbers), images too large even tiled are refused before any work")


def tile_args(p) -> None:
    """--tile-size & co. (encode, decode, decompress): see codec.tiling."""
    p.add_argument("--tile-size", type=int, default=None,
                   help="process images larger than this many pixels in tiles (memory bounded by the tile)")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="stats/blend: pixels by which neighbouring tiles overlap and are blended "
                        "(default: a quarter of the tile)")
    p.add_argument("--tile-method", choices=METHODS, default=DEFAULT_METHOD,
                   help="exact (default): the untiled result, one tile at a time (host memory holds "
                        "whole-image activations; falls back to blend, with a warning, where they do "
                        "not fit); stats: whole-image GroupNorm statistics estimated in one extra pass; "
                        "blend: each tile its own statistics (plain overlap-and-blend)")


def source_args(p) -> None:
    """How a Hugging Face dataset source is read (the data.image_column / hf_split / streaming
    of training)."""
    p.add_argument("--image-column", default="image", help="Hugging Face datasets: the column holding the images")
    p.add_argument("--split", default="train", help="Hugging Face datasets: the split to read")
    p.add_argument("--streaming", action="store_true",
                   help="Hugging Face datasets: stream instead of reading by row (URLs and pipe: always stream)")
