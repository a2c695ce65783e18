"""A memory budget for encoding and decoding, and the path chosen per image to stay inside it.

An untiled pass over a 10-megapixel photo needs gigabytes of activations (the ``tiny`` preset:
about 560 bytes a pixel to encode and 1 040 to decode, measured with ``getrusage`` at 1-2 MP;
``small`` 1 300 / 2 070), so a camera photo can exceed the machine and get the process killed
by the kernel without a word. :func:`choose_path` estimates what the untiled pass needs and,
when that is over the budget, picks the largest tile whose exact tiled pass fits
(:mod:`codec.tiling` "exact": the untiled numbers), else "stats" tiles (bounded host memory),
else refuses the image before any work with what it would need.

The estimate, per image pixel and batch item, in elements of the compute dtype:
``k * widest + 20`` with ``widest`` the widest channel count of the two full-resolution levels
(``block_out_channels[:2]``: the decoder's last up block works on its upsampled input), ``k``
4.5 to decode and 3 to encode (the measured figures are 4.0-4.1 and 2.2-2.6 times ``widest``,
plus the images themselves). The exact tiled path adds its two whole-image activations
(:func:`codec.streaming.host_bytes`) and the latent-resolution mid block, which it runs untiled
(its attention uses PyTorch's memory-efficient kernels: linear in the positions).

The budget (``max_memory``) defaults to half the available host memory on the CPU, or 80 % of
the free device memory on a GPU (the exact path's whole-image buffers then live on the host,
checked against half of its available memory).
"""

from __future__ import annotations

import re

import torch

from codec.io import is_autoencoder_tiny

HOST_SHARE, DEVICE_SHARE = 0.5, 0.8
DECODE_K, ENCODE_K, PER_PIXEL_EXTRA = 4.5, 3.0, 20
TILE_SIDES = (2048, 1024, 512, 256)  # tried largest first: fewer tiles, less halo work
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


class MemoryBudgetError(ValueError):
    """An image that does not fit the memory budget even in tiles (raised before any work)."""


def parse_memory(value) -> int | None:
    """``"8G"``, ``"512MiB"``, ``"1.5g"``, a number of bytes, or None / ``"auto"`` (the default
    budget) -> bytes. Zero, negative or unreadable values are a ValueError naming the forms."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"max_memory {value!r} is not a positive amount of memory; give bytes or a size "
                         "like 512M, 8G, 1.5GiB (or 'auto')")
    return int(float(match.group(1)) * _UNITS[unit])


def available_host_bytes() -> int:
    """Memory the host can still give (Linux MemAvailable; free pages elsewhere)."""
    import os

    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def budgets(device: torch.device, max_memory: int | None) -> tuple[int, int, str]:
    """(budget of the device that computes, host budget, how the first was chosen)."""
    host = int(available_host_bytes() * HOST_SHARE)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        auto = (int(free * DEVICE_SHARE), f"{DEVICE_SHARE:.0%} of the free GPU memory")
    else:
        auto = (host, f"{HOST_SHARE:.0%} of the available host memory")
    budget, how = (max_memory, "max_memory") if max_memory is not None else auto
    return budget, (budget if device.type != "cuda" else host), how


def widest_channels(vae) -> int:
    if is_autoencoder_tiny(vae):
        return max(*vae.config.encoder_block_out_channels, *vae.config.decoder_block_out_channels)
    return max(vae.config.block_out_channels[:2])


def untiled_bytes(vae, op: str, pixels: int, batch: int, dtype: torch.dtype) -> int:
    """Estimated peak memory of an untiled encode / decode of ``batch`` images of ``pixels``."""
    k = DECODE_K if op == "decode" else ENCODE_K
    return int((k * widest_channels(vae) + PER_PIXEL_EXTRA) * pixels * batch * _bytes(dtype))


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def choose_path(vae, op: str, hw: tuple[int, int], batch: int, dtype: torch.dtype, device: torch.device,
                max_memory: int | None) -> tuple[int | None, str, str | None]:
    """(tile size or None for untiled, tile method, a notice or None) for one batch of images of
    ``hw`` pixels (H, W). Raises :class:`MemoryBudgetError` when nothing fits."""
    from codec import streaming

    h, w = hw
    budget, host_budget, how = budgets(device, max_memory)
    need = untiled_bytes(vae, op, h * w, batch, dtype)
    if need <= budget:
        return None, "exact", None
    gib = 2**30
    images = 6 * h * w * batch * 4  # the input and output images, float32 on the host
    tiny = is_autoencoder_tiny(vae)
    exact_host = 0 if tiny else streaming.host_bytes(list(vae.config.block_out_channels), (h // 8, w // 8),
                                                     batch, dtype)
    mid = 0 if tiny else 6 * (h // 8) * (w // 8) * batch * vae.config.block_out_channels[-1] * _bytes(dtype)
    shared = device.type != "cuda"  # one pool: the tile's work and the whole-image buffers add up
    for method in (("blend",) if tiny else ("exact", "stats")):
        held = images + (exact_host if method == "exact" else 0)
        for side in TILE_SIDES:
            if h <= side and w <= side:  # one tile: the untiled pass, which does not fit
                continue
            tile_pixels = min(side, h) * min(side, w)
            work = untiled_bytes(vae, op, tile_pixels, batch, dtype) + (mid if method == "exact" else 0)
            fits = work + held <= budget if shared else (work <= budget and held <= host_budget)
            if fits:
                same = "the untiled numbers" if method == "exact" else "whole-image statistics estimated"
                return side, method, (
                    f"{op} of {w}x{h} images: an untiled pass would need about {need / gib:.1f} GiB, over the "
                    f"memory budget of {budget / gib:.1f} GiB ({how}); using {method} tiles of {side} px "
                    f"({same}). Set max_memory / --max-memory to change the budget")
    smallest = untiled_bytes(vae, op, min(TILE_SIDES[-1], h) * min(TILE_SIDES[-1], w), batch, dtype) + images
    raise MemoryBudgetError(
        f"{op} of a {w}x{h} image needs about {smallest / gib:.2f} GiB even in {TILE_SIDES[-1]}-px tiles "
        f"({need / gib:.1f} GiB untiled), over the memory budget of {budget / gib:.2f} GiB ({how}); "
        "raise --max-memory / max_memory if the machine has it, or use a smaller image")
