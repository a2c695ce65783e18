"""One latents file (``vae-codec encode``'s output): the latents and where they came from.

A ``.safetensors`` holding ``latents`` (B, C, h, w) (or (B, D) for the MLP VAE) and string
metadata: the latent space (:mod:`codec.latent_space`, as one sorted JSON string), the original
``height``/``width`` (decode crops back to them), ``source``, ``codec``, ``sampled``, and for
readers that know only the old format ``scaling_factor``/``shift_factor``. Written with sorted
headers (:mod:`codec.reproducible`): the same image and codec give the same bytes. Read without
unpickling anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from codec.latent_space import SPACE_KEY, from_metadata, to_metadata
from codec.reproducible import save_safetensors


@dataclass
class LatentsFile:
    latents: torch.Tensor
    space: dict | None  # None: the file does not say (older vae-codec, other tools)
    size: tuple[int, int] | None  # (height, width) of the encoded image, when recorded
    metadata: dict


def save_latents(path: str | os.PathLike, latents: torch.Tensor, space: dict,
                 size: tuple[int, int] | None = None, **extra: str) -> Path:
    """Write ``latents`` made in ``space`` (``Codec.latent_space``) with ``extra`` string metadata."""
    meta = {SPACE_KEY: to_metadata(space), "scaling_factor": repr(space["scaling_factor"]),
            "shift_factor": repr(space["shift_factor"]), **{k: str(v) for k, v in extra.items()}}
    if size is not None:
        meta.update(height=str(size[0]), width=str(size[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({"latents": latents}, path, metadata=meta)
    return path


def read_latents(path: str | os.PathLike) -> LatentsFile:
    """A latents file read back; unreadable files and files without ``latents`` are ValueErrors
    naming the file, malformed metadata too."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such latents file")
    try:  # safetensors only: a latents file is never unpickled
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable latents file ({type(exc).__name__}: {exc})") from exc
    if "latents" not in tensors:
        raise ValueError(f"{path}: no 'latents' tensor (found {sorted(tensors)})")
    try:
        size = (int(meta["height"]), int(meta["width"])) if "height" in meta else None
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: malformed height/width metadata ({exc})") from exc
    return LatentsFile(tensors["latents"], from_metadata(meta.get(SPACE_KEY), str(path)), size, meta)
