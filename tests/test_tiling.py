"""Tiled encode/decode (codec.tiling): exact when a tile covers the image, converging to the
untiled result as the whole-image GroupNorm statistics are refined, and on the CLI.

Decided: the fast tests use the random-weight "test" preset and check the mechanism (tiles
cover the image once, a tile covering the image is the untiled run, the API and CLI work).
Seam quality is only meaningful for a trained codec (with random weights the statistics
refinement does not even converge), so the seam test uses the trained tiny codec of
BENCHMARKS.md when it exists and skips, saying so, otherwise; scripts/bench_tiling.py
measures the same on more Kodak images (BENCHMARKS.md, "Big images").
"""

import os
from pathlib import Path

import pytest
import torch

from codec import Codec
from codec.cli import main
from codec.images import load_image, pil_to_tensor, save_image
from codec.models import build_autoencoder
from codec.tiling import DEFAULT_PASSES, tile_grid, tiled_decode

from conftest import REPO, shared, smooth_image


def psnr(a, b):
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return Codec(build_autoencoder("test"), device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def latents(codec):
    return codec.posterior(pil_to_tensor(load_image_array(0))[None])[0]


def load_image_array(seed):
    from PIL import Image
    return Image.fromarray(smooth_image(seed, 96, 128))


def test_cores_cover_the_image_exactly_once():
    seen = torch.zeros(13, 29, dtype=torch.int)
    for (t, b, l, r), (tt, tb, tl, tr) in tile_grid(13, 29, core=5, margin=3):
        seen[t:b, l:r] += 1
        assert tt <= t and b <= tb and tb - tt <= 11 and tr - tl <= 11
    assert (seen == 1).all()


@torch.no_grad()
def test_a_tile_covering_the_image_is_the_untiled_run(codec, latents):
    ref = codec.vae.decode(latents).sample
    assert torch.equal(tiled_decode(codec.vae, latents, 256, 32), ref)


# The trial-q2 codec of BENCHMARKS.md (`runs/bench-q2/codec` of a checkout that ran it), or any
# trained kl-f8 codec named by VAE_CODEC_TRAINED_CODEC. Without one (a fresh clone, CI), the
# test trains the "test" preset on BSDS500 crops for 300 steps: random weights say nothing
# about seams (their statistics iteration need not settle), a briefly trained codec does.
TRAINED = Path(os.environ.get("VAE_CODEC_TRAINED_CODEC", REPO / "runs" / "bench-q2" / "codec"))


def trained_codec(tmp_path) -> tuple[Path, int]:
    """A trained codec folder and the tile size to test it with."""
    if (TRAINED / "config.json").exists():
        return TRAINED, 256
    from train.__main__ import main as train_main

    out = tmp_path / "trained"
    assert train_main([str(REPO / "configs" / "tiny.yaml"), "--set", "model.preset=test",
                       "--set", f"output_dir={out}", "--set", f"data.train={shared('bsds500', 'train')}",
                       "--set", "data.crop_size=64", "--set", "batch_size=8", "--set", "max_steps=300",
                       "--set", "optim.warmup_steps=20", "--set", "checkpoint_every=1000",
                       "--set", "image_every=0", "--set", "scale_samples=8", "--set", "ema_decay=0"]) == 0
    return out / "codec", 128  # a narrower codec: smaller tiles, more of them (12 here)


@pytest.mark.slow
def test_trained_codec_tiles_without_seams_and_beats_diffusers(tmp_path):
    """A trained codec on a real photo crop (256×384), tiled vs untiled decoding."""
    folder, tile = trained_codec(tmp_path)
    with torch.no_grad():
        quality, diffusers = seam_quality(Codec.from_pretrained(folder, device="cpu").vae, tile)
    print(quality, diffusers)
    # The issue's bar: tiled agrees with untiled to >= 40 dB and beats diffusers' tiling.
    # Measured: q2 codec, 256 px tiles 57.3 dB vs diffusers 34.4; the 300-step "test" codec,
    # 128 px tiles 45.8 dB vs 25.4.
    assert quality[DEFAULT_PASSES] >= 40 and quality[DEFAULT_PASSES] > diffusers + 3, (quality, diffusers)
    assert quality[0] < quality[DEFAULT_PASSES]  # the refinement is what gets it there


def seam_quality(vae, tile: int) -> tuple[dict, float]:
    """PSNR of tiled vs untiled decoding of a kodim01 crop: ours by passes, and diffusers'."""
    x = pil_to_tensor(load_image(shared("kodak", "kodim01.png")))[None][..., :256, :384]
    z = Codec(vae, device="cpu").posterior(x)[0]
    ref = vae.decode(z).sample
    quality = {p: psnr(tiled_decode(vae, z, tile, tile // 4, passes=p), ref) for p in (0, DEFAULT_PASSES)}
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    diffusers = psnr(vae.decode(z).sample, ref)
    vae.disable_tiling()
    return quality, diffusers


def test_tiled_encode_and_codec_api(codec):
    x = torch.stack([pil_to_tensor(load_image_array(i)) for i in range(2)])
    tiled = Codec(codec.vae, device="cpu", tile_size=64, tile_margin=16, tile_passes=1)
    mean, _ = codec.posterior(x)
    mean_t, logvar_t = tiled.posterior(x)
    assert mean_t.shape == mean.shape and torch.isfinite(logvar_t).all()
    decoded = tiled.decode(tiled.encode(x))
    assert decoded.shape == x.shape and torch.isfinite(decoded).all()
    # random weights say nothing about seams (see the module docstring); one tile is exact
    whole = Codec(codec.vae, device="cpu", tile_size=256)
    torch.testing.assert_close(whole.posterior(x)[0], mean, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 8"):
        Codec(codec.vae, device="cpu", tile_size=60)
    with pytest.raises(ValueError, match="no core"):
        Codec(codec.vae, device="cpu", tile_size=64, tile_margin=32)


def test_cli_decode_with_tile_size(codec, tmp_path):
    folder = codec.save_pretrained(tmp_path / "codec")
    save_image(pil_to_tensor(load_image_array(3)), tmp_path / "in.png")
    common = ["--codec", str(folder), "--device", "cpu"]
    assert main(["encode", *common, "--tile-size", "64", "--tile-passes", "1", str(tmp_path / "in.png"), str(tmp_path / "z.safetensors")]) == 0
    assert main(["decode", *common, str(tmp_path / "z.safetensors"), str(tmp_path / "plain.png")]) == 0
    assert main(["decode", *common, "--tile-size", "64", "--tile-margin", "16", "--tile-passes", "0",
                 str(tmp_path / "z.safetensors"), str(tmp_path / "tiled.png")]) == 0
    assert main(["decode", *common, "--tile-size", "256",
                 str(tmp_path / "z.safetensors"), str(tmp_path / "one_tile.png")]) == 0
    plain, tiled, one = (pil_to_tensor(load_image(tmp_path / n)) for n in ("plain.png", "tiled.png", "one_tile.png"))
    assert tiled.shape == plain.shape == (3, 96, 128)
    assert torch.equal(one, plain)
    assert main(["decode", *common, "--tile-size", "12", str(tmp_path / "z.safetensors"), str(tmp_path / "x.png")]) == 2
