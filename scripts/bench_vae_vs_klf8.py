"""The vanilla VAE (MLPVAE) against a kl-f8 codec on the same photo crops, at equal latent size.

Both codecs were trained on random 64x64 crops of the same photos (bsds500 train + val); here
both encode and decode the same 64x64 tiles of Kodak (``--tiles`` evenly spaced per image) with
the posterior mean, and we report PSNR / SSIM / LPIPS (alex), parameters, latent numbers per
crop, and encode / decode speed (the two codecs alternate in one process; min and median of
``--repeats`` runs over one batch). Pictures: originals / VAE / kl-f8 reconstructions, and
decoded samples of each prior N(0, I) side by side (kl-f8's latents are unscaled z here).

    python -m scripts.bench_vae_vs_klf8 --mlp runs/photos/codec --klf8 /work/main/runs/bench-q2/codec \\
        --data ../shared/data/kodak --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from codec import Codec
from codec.evaluation.metrics import LPIPSMetric, evaluate_pairs, summarize
from codec.images import list_images, load_image, make_grid_image, pil_to_tensor
from codec.io import is_mlp_vae
from codec.models import count_parameters


def kodak_tiles(folder: str, size: int, per_image: int) -> torch.Tensor:
    """``per_image`` size x size tiles of every image, on an evenly spaced grid."""
    tiles = []
    for path in list_images(folder):
        x = pil_to_tensor(load_image(path))
        h, w = x.shape[-2:]
        side = max(int(per_image ** 0.5), 1)
        for i in range(side):
            for j in range(side):
                top = (h - size) * i // max(side - 1, 1)
                left = (w - size) * j // max(side - 1, 1)
                tiles.append(x[:, top : top + size, left : left + size])
    return torch.stack(tiles)


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mlp", required=True)
    p.add_argument("--klf8", required=True)
    p.add_argument("--data", required=True, help="Kodak folder")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--tiles", type=int, default=16, help="tiles per image (a square number)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="crops per timed encode / decode call")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x = kodak_tiles(args.data, args.size, args.tiles)
    codecs = {"vanilla VAE (MLP)": Codec.from_pretrained(args.mlp, device="cpu", batch_size=args.batch),
              "kl-f8 tiny": Codec.from_pretrained(args.klf8, device="cpu", batch_size=args.batch)}
    lpips = LPIPSMetric("alex", "cpu")
    report = {"tiles": x.shape[0], "tile_size": args.size, "data": args.data, "codecs": {}}
    recons = {}
    for name, codec in codecs.items():
        latents = codec.encode(x[:1])
        recon = torch.cat([codec.reconstruct(b) for b in x.split(args.batch)])
        recons[name] = recon
        per = evaluate_pairs([(a, b) for a, b in zip(x.split(args.batch), recon.split(args.batch))], lpips)
        report["codecs"][name] = {
            "path": str(args.mlp if "MLP" in name else args.klf8),
            "parameters": count_parameters(codec.vae),
            "latent_numbers": int(latents[0].numel()),
            **{k: summarize(v) for k, v in per.items()},
        }

    # Speed: the two codecs alternate, one batch per call, so both see the same machine load.
    batch = x[: args.batch]
    times = {name: {"encode": [], "decode": []} for name in codecs}
    lat = {name: c.encode(batch) for name, c in codecs.items()}
    for _ in range(args.repeats):
        for name, codec in codecs.items():
            times[name]["encode"] += timed(lambda c=codec: c.encode(batch), 1)
            times[name]["decode"] += timed(lambda c=codec, z=lat[name]: c.decode(z), 1)
    for name in codecs:
        for op in ("encode", "decode"):
            t = times[name][op]
            report["codecs"][name][f"{op}_ms_per_crop"] = {
                "min": 1000 * min(t) / len(batch), "median": 1000 * statistics.median(t) / len(batch)}

    # Pictures: reconstructions (originals / VAE / kl-f8) and prior samples side by side.
    pick = torch.linspace(0, x.shape[0] - 1, 8).long()
    make_grid_image([x[pick], *(recons[n][pick] for n in codecs)], out / "reconstructions.png")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for codec in codecs.values():
        vae = codec.vae
        shape = tuple(vae.latent_shape()) if is_mlp_vae(vae) else (
            vae.config.latent_channels, args.size // 8, args.size // 8)
        with torch.no_grad():
            samples = vae.decode(torch.randn((16, *shape), generator=gen)).sample.float()
        rows += list(samples.split(8))
    make_grid_image(rows, out / "prior_samples.png")
    report["pictures"] = {"reconstructions": "rows: Kodak tiles / vanilla VAE / kl-f8",
                          "prior_samples": "rows 1-2: vanilla VAE, rows 3-4: kl-f8, z ~ N(0, I)"}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))

    print(f"{report['tiles']} Kodak tiles of {args.size}x{args.size}")
    print("| codec | parameters | latent numbers | PSNR dB | SSIM | LPIPS (alex) | encode ms/crop | decode ms/crop |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in report["codecs"].items():
        print(f"| {name} | {r['parameters'] / 1e6:.2f} M | {r['latent_numbers']} | {r['psnr']['mean']:.2f} | "
              f"{r['ssim']['mean']:.3f} | {r['lpips']['mean']:.3f} | "
              f"{r['encode_ms_per_crop']['min']:.3f} (med {r['encode_ms_per_crop']['median']:.3f}) | "
              f"{r['decode_ms_per_crop']['min']:.3f} (med {r['decode_ms_per_crop']['median']:.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
