"""The fp16-safe fine-tune's proof (BENCHMARKS.md, "fp16-safe codecs"): a trained codec made to
overflow fp16, before and after ``fp16_safe``, against the original codec's float32 outputs.

    # 1. the overflowing codec: the GroupNorm-fed conv1 that peaks highest in each half x 1000
    python -m scripts.bench_fp16_safe overflow --codec RUN/codec --out WORK/overflowing --images KODAK [--factor 1e4]
    # 2. the fine-tune (python -m train ... --set model.init_from=WORK/overflowing --set fp16_safe.bound=1000)
    # 3. the measurements
    python -m scripts.bench_fp16_safe measure --original RUN/codec --codec WORK/overflowing \\
        --codec WORK/safe/codec --images KODAK --crops 4 --crop-size 128

For each codec, on every image: the largest |activation| of each half (float32), then fp16 encode
and decode, counting batches that overflow (fallbacks, recomputed in float32 as ``Codec`` does),
and the PSNR of the fp16 decodes of the original's latents against the original's float32 decodes.

CPUs without fp16 arithmetic run torch's fp16 convolutions ~200x slower than float32, so the
whole images use an *emulated* fp16: weights rounded to fp16, and every leaf module's output
rounded to fp16 (``x.half().float()``: values beyond 65504 become inf, as in fp16), the arithmetic
inside a module in float32 (as fp16 GPU kernels accumulate). ``--crops`` centre crops run in real
fp16 (``Codec(dtype="fp16")``) too, which checks the emulation: the same fallbacks, and the PSNR
between the two fp16 decodes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codec import Codec
from codec.evaluation.activations import FP16_MAX, ActivationPeaks, leaf_modules
from codec.precision import PrecisionFallbackWarning
from train.autoencoder.fp16_safe import conv_peaks, groupnorm_fed_convs

BLOW_UP = 1e3  # the issue's factor; --factor where a codec's peaks stay inside fp16's range even so


def load_images(folder: str, limit: int = 0) -> list[torch.Tensor]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    files = files[:limit] if limit else files
    arrays = [np.array(Image.open(f).convert("RGB")) for f in files]
    return [torch.from_numpy(a).permute(2, 0, 1).float()[None] / 127.5 - 1 for a in arrays]


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def overflow(args) -> None:
    """Scale the GroupNorm-fed conv that peaks highest in each half by ``--factor``; check that
    float32 does not notice and whether the peaks pass fp16's range."""
    codec = Codec.from_pretrained(args.codec, device="cpu")
    vae = codec.vae
    images = [centre_crop(x, 256)[0] for x in load_images(args.images, 4)]
    convs = groupnorm_fed_convs(vae)
    peaks = conv_peaks(vae, images, convs)
    chosen = {half: max((n for n, _ in convs if n.startswith(half)), key=peaks.get) for half in ("encoder", "decoder")}
    before = [codec.decode(codec.encode(x[None])) for x in images]
    with torch.no_grad():
        for name in chosen.values():
            conv = dict(convs)[name]
            conv.weight.mul_(args.factor)
            conv.bias.mul_(args.factor)
    after = [codec.decode(codec.encode(x[None])) for x in images]
    codec.save_pretrained(args.out)
    report = {"factor": args.factor,
              "scaled": {n: {"peak_before": peaks[n], "peak_after": peaks[n] * args.factor,
                             "passes_fp16_max": peaks[n] * args.factor > FP16_MAX} for n in chosen.values()},
              "float32_max_abs_difference": max(float((a - b).abs().max()) for a, b in zip(before, after)),
              "float32_psnr_min": min(psnr(a, b) for a, b in zip(before, after))}
    print(json.dumps(report, indent=1))


class EmulatedFP16:
    """A float32 copy of a vae whose weights and leaf-module outputs are rounded to fp16."""

    def __init__(self, vae):
        self.vae = copy.deepcopy(vae).float()
        with torch.no_grad():
            for p in self.vae.parameters():
                p.copy_(p.half().float())
        for _, module in leaf_modules(self.vae):
            module.register_forward_hook(lambda m, i, o: o.half().float() if isinstance(o, torch.Tensor) else o)

    @torch.no_grad()
    def encode(self, x):
        return self.vae.encode(x.half().float()).latent_dist.mean

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z.half().float()).sample


def checked(fn, fallback, x, counter: list):
    """fn(x); where it is not finite, the float32 ``fallback(x)`` and one more fallback counted."""
    out = fn(x)
    if bool(torch.isfinite(out).all()):
        return out
    counter[0] += 1
    return fallback(x)


@torch.no_grad()
def emulated_passes(vae, emulated: EmulatedFP16, images, latents) -> tuple[int, list[torch.Tensor]]:
    """Emulated fp16 encodes of ``images`` and decodes of ``latents``: (fallbacks, decodes)."""
    counter = [0]
    for x in images:
        checked(emulated.encode, lambda t: vae.encode(t).latent_dist.mean, x, counter)
    decodes = [checked(emulated.decode, lambda t: vae.decode(t).sample, z, counter) for z in latents]
    return counter[0], decodes


def measure(args) -> None:
    original = Codec.from_pretrained(args.original, device="cpu")
    images = load_images(args.images, args.limit)
    with torch.no_grad():
        ref_latents = [original.vae.encode(x).latent_dist.mean for x in images]
        ref_images = [original.vae.decode(z).sample for z in ref_latents]
    crops = [centre_crop(x, args.crop_size) for x in images[:args.crops]]
    with torch.no_grad():
        crop_latents = [original.vae.encode(c).latent_dist.mean for c in crops]
        crop_refs = [original.vae.decode(z).sample for z in crop_latents]
    results = {}
    for folder in [args.original, *args.codec]:
        codec = Codec.from_pretrained(folder, device="cpu")
        vae = codec.vae
        peaks = ActivationPeaks(vae)
        with torch.no_grad():
            for x in images:
                vae.decode(vae.encode(x).latent_dist.mean)
        peak = peaks.result()
        peaks.close()
        emulated = EmulatedFP16(vae)
        start = time.perf_counter()
        fallbacks, decodes = emulated_passes(vae, emulated, images, ref_latents)
        emulated_s = time.perf_counter() - start
        row = {"encoder_max_abs": peak["encoder_max_abs"], "decoder_max_abs": peak["decoder_max_abs"],
               "fp16_holds": not any(peak["fp16_overflows"].values()),
               "emulated_fp16_fallbacks": fallbacks, "emulated_passes": 2 * len(images),
               "emulated_psnr_vs_original_fp32": [psnr(a, b) for a, b in zip(decodes, ref_images)],
               "emulated_seconds": emulated_s}
        psnrs = row["emulated_psnr_vs_original_fp32"]
        print(f"{folder}: peaks {row['encoder_max_abs']:.4g} / {row['decoder_max_abs']:.4g}, "
              f"emulated fp16 fallbacks {fallbacks}/{2 * len(images)}, PSNR vs original fp32 mean "
              f"{np.mean(psnrs):.2f} min {np.min(psnrs):.2f} dB", flush=True)
        if crops:
            row.update(real_fp16(folder, crops, crop_latents, crop_refs, emulated))
            print(f"  real fp16 on {len(crops)} crops: fallbacks {row['real_fp16_fallbacks']}, PSNR min "
                  f"{row['real_fp16_psnr_min']:.2f} dB, emulation vs real {row['emulation_vs_real_psnr_min']} dB; "
                  f"decode fp16 {row['real_fp16_decode_s']:.2f} s vs fp32 {row['fp32_decode_s']:.3f} s per crop",
                  flush=True)
        results[folder] = row
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def real_fp16(folder, crops, crop_latents, crop_refs, emulated) -> dict:
    """Real fp16 (Codec, dtype fp16) on the crops: fallbacks, PSNR against the original's float32
    decodes, the emulation's agreement, and decode time per crop against float32."""
    half = Codec.from_pretrained(folder, device="cpu", dtype="fp16", batch_size=1)
    full = Codec.from_pretrained(folder, device="cpu", batch_size=1)
    scale = lambda z: z * half.vae.config.scaling_factor  # noqa: E731  (the codec takes scaled latents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionFallbackWarning)
        for c in crops:
            half.encode(c)
        start = time.perf_counter()
        decodes = [half.decode(scale(z)) for z in crop_latents]
        half_s = (time.perf_counter() - start) / len(crops)
    start = time.perf_counter()
    for z in crop_latents:
        full.decode(scale(z))
    full_s = (time.perf_counter() - start) / len(crops)
    emulated_decodes = [emulated.decode(z) for z in crop_latents]
    return {"real_fp16_fallbacks": half.fallbacks, "real_fp16_passes": 2 * len(crops),
            "real_fp16_psnr_min": min(psnr(a, b) for a, b in zip(decodes, crop_refs)),
            "emulation_vs_real_psnr_min": min(psnr(a, b) for a, b in zip(decodes, emulated_decodes)
                                              if bool(torch.isfinite(b).all())) if half.fallbacks == 0 else None,
            "real_fp16_decode_s": half_s, "fp32_decode_s": full_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("overflow")
    o.add_argument("--codec", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--images", required=True)
    o.add_argument("--factor", type=float, default=BLOW_UP)
    m = sub.add_parser("measure")
    m.add_argument("--original", required=True)
    m.add_argument("--codec", action="append", default=[])
    m.add_argument("--images", required=True)
    m.add_argument("--limit", type=int, default=0)
    m.add_argument("--crops", type=int, default=4)
    m.add_argument("--crop-size", type=int, default=128)
    m.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    overflow(args) if args.command == "overflow" else measure(args)


if __name__ == "__main__":
    main()
