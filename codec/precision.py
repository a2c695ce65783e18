"""Half-precision inference that never returns inf/NaN silently.

fp16 overflows above 65504: VAEs whose activations grow large (SDXL's VAE is the known case)
decode to inf/NaN in fp16. :func:`run_checked` runs one batch in the codec's dtype and, when
the result is not finite, warns, counts the event and redoes that batch in float32 (the same
weights upcast; a half -> float -> half round trip is lossless, so the model is unchanged
afterwards). bf16 has float32's range and rarely overflows, but is checked the same way.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


class PrecisionFallbackWarning(UserWarning):
    """A batch overflowed in fp16/bf16 and was recomputed in float32."""


def all_finite(result) -> bool:
    parts = result if isinstance(result, (tuple, list)) else (result,)
    return all(bool(torch.isfinite(p).all()) for p in parts if p is not None)


def run_checked(codec, fn: Callable[[torch.Tensor], object], chunk: torch.Tensor, what: str):
    """``fn(chunk)``; if the codec runs in half precision and the result has inf/NaN, redo it
    in float32, increment ``codec.fallbacks`` and warn."""
    result = fn(chunk)
    if codec.dtype == torch.float32 or all_finite(result):
        return result
    codec.fallbacks += 1
    warnings.warn(
        f"{what}: non-finite values in {str(codec.dtype).replace('torch.', '')} "
        f"(overflow); recomputed this batch of {chunk.shape[0]} in float32 "
        f"({codec.fallbacks} fallback(s) so far)",
        PrecisionFallbackWarning,
        stacklevel=3,
    )
    dtype = codec.dtype
    codec.vae.to(dtype=torch.float32)
    try:
        result = fn(chunk.float())
    finally:
        codec.vae.to(dtype=dtype)
    if not all_finite(result):
        raise FloatingPointError(f"{what}: non-finite values even in float32; the input or the model is broken")
    return result
