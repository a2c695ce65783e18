"""fp16 / bf16 inference: an overflowing batch is redone in float32, counted and reported."""

import pytest
import torch

from codec import Codec
from codec.models import build_autoencoder
from codec.precision import PrecisionFallbackWarning


def overflowing_codec(dtype: str, part: str) -> tuple[Codec, Codec]:
    """A float32 reference and a half-precision copy whose first conv overflows.

    fp16 (max 65504): conv_in's bias is set near the limit and its weights scaled up, so its
    output passes 65504 while every weight stays representable, as in VAEs that overflow in
    fp16 for real. bf16 has float32's exponent range, so nothing overflows in bf16 that does
    not in float32; there a hook multiplies conv_in's output by 1e38 only when it is bf16.
    """
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    conv = getattr(vae, part).conv_in
    if dtype == "fp16":
        with torch.no_grad():
            conv.bias.fill_(6e4)
            conv.weight.mul_(1e4)
    ref = Codec(vae, device="cpu", batch_size=2)
    half = Codec(build_autoencoder("test"), device="cpu", dtype=dtype, batch_size=2)
    half.vae.load_state_dict(ref.vae.state_dict())
    if dtype == "bf16":
        getattr(half.vae, part).conv_in.register_forward_hook(
            lambda m, i, out: out * 1e38 if out.dtype == torch.bfloat16 else out
        )
    return ref, half


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_decode_overflow_falls_back_to_fp32_and_says_so(dtype):
    ref, half = overflowing_codec(dtype, "decoder")
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    raw = half.vae.decode(z.to(half.dtype)).sample  # what the model alone gives: not finite
    assert not torch.isfinite(raw).all()
    with pytest.warns(PrecisionFallbackWarning, match="recomputed this batch"):
        out = half.decode(z)
    assert torch.isfinite(out).all()
    assert half.fallbacks == 2  # batches of 2 + 1, both overflowed
    expected = ref.decode(z)
    # the redo uses the half-rounded weights: equal to the fp32 model up to that rounding;
    tolerance = {"fp16": 1e-2, "bf16": 5e-2}[dtype]  # bf16 keeps 8 mantissa bits, fp16 11
    assert (out - expected).abs().max() <= tolerance * expected.abs().max()
    assert half.vae.dtype == half.dtype  # back in half precision afterwards


def test_encode_overflow_falls_back_and_a_finite_batch_does_not():
    ref, half = overflowing_codec("fp16", "encoder")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with pytest.warns(PrecisionFallbackWarning):
        lat = half.encode(x)
    assert torch.isfinite(lat).all() and half.fallbacks == 1
    expected = ref.encode(x)
    assert (lat - expected).abs().max() <= 1e-2 * expected.abs().max()
    fine = Codec(build_autoencoder("test"), device="cpu", dtype="fp16")
    fine.encode(x)
    assert fine.fallbacks == 0
