"""Tiled encode/decode (codec.tiling, codec.streaming) judged against the untiled run.

Every quality test compares a tiled result with the untiled encode/decode of the same input
(PSNR computed here, by hand) and with plain overlap-and-blend tiling ("blend") and diffusers'
``enable_tiling()``. Determinism: one torch thread while a codec is trained or compared, fp32
throughout (the training runs set ``mixed_precision=no``), fixed seeds, and codecs the tests
build themselves (random, 40-step and 300-step "test"-preset codecs), never a folder that only
one checkout has. The default ("exact") is the untiled result to rounding, so its bars hold on
any weights; "stats" is an estimate, checked for what it promises (cost, the fallback).
"""

import warnings

import pytest
import torch
from conftest import REPO, shared, smooth_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from codec import Codec, tiling
from codec.cli import main
from codec.images import load_image, pil_to_tensor, save_image
from codec.models import build_autoencoder
from codec.tiling import blend_ramp, blend_weights, owned_spans, run_tiled, tile_spans, tiled_decode, tiled_encode


def psnr(a, b, peak_to_peak=2.0):
    """PSNR of two tensors in [-1, 1] (clamped), peak-to-peak 2."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean()
    return float(10 * torch.log10(peak_to_peak**2 / mse))


def latent_psnr(a, b):
    """Agreement of two latent tensors: PSNR with the reference's range as the peak."""
    mse = (a - b).pow(2).mean()
    return float(10 * torch.log10((b.max() - b.min()) ** 2 / mse))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def photo(h=256, w=384):
    """A crop of a real photo (kodim01) as (1, 3, h, w) in [-1, 1]."""
    return pil_to_tensor(load_image(shared("kodak", "kodim01.png")))[None][..., :h, :w]


def random_codec():
    torch.manual_seed(0)
    return Codec(build_autoencoder("test"), device="cpu", batch_size=2)


def trained_codec(tmp_path, steps: int) -> Codec:
    """The "test" preset trained ``steps`` steps on BSDS500 crops, fp32, one thread (seeded)."""
    from train.__main__ import main as train_main

    out = tmp_path / f"trained{steps}"
    assert train_main([str(REPO / "configs" / "tiny.yaml"), "--set", "model.preset=test",
                       "--set", f"output_dir={out}", "--set", f"data.train={shared('bsds500', 'train')}",
                       "--set", "data.crop_size=64", "--set", "batch_size=8", "--set", f"max_steps={steps}",
                       "--set", "optim.warmup_steps=20", "--set", "checkpoint_every=100000",
                       "--set", "image_every=0", "--set", "val_every=0", "--set", "scale_samples=8",
                       "--set", "ema_decay=0", "--set", "mixed_precision=no", "--set", "seed=0"]) == 0
    return Codec.from_pretrained(out / "codec", device="cpu")


@torch.no_grad()
def decode_quality(vae, z, tile):
    """PSNR against the untiled decode of z: each of our methods, and diffusers'."""
    ref = vae.decode(z).sample
    quality = {m: psnr(tiled_decode(vae, z, tile, method=m), ref) for m in tiling.METHODS}
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    quality["diffusers"] = psnr(vae.decode(z).sample, ref)
    vae.disable_tiling()
    return quality


@torch.no_grad()
def encode_quality(vae, x, tile):
    """Latent PSNR of the tiled posterior mean against the untiled one, by method."""
    ref = vae.encode(x).latent_dist.mean
    return {m: latent_psnr(tiled_encode(vae, x, tile, method=m)[0], ref) for m in tiling.METHODS}


# ------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("length,tile,overlap", [(13, 5, 1), (29, 11, 3), (64, 32, 8), (96, 64, 16), (256, 32, 8)])
def test_spans_cover_overlap_and_blend_to_one(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(e - s <= tile for s, e in spans)
    assert all(a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:]))
    owned = owned_spans(spans)
    assert [o[0] for o in owned[1:]] == [o[1] for o in owned[:-1]]  # a partition
    assert all(s <= os_ and oe <= e for (s, e), (os_, oe) in zip(spans, owned))
    total = torch.zeros(length * 8)
    for i, (s, e) in enumerate(spans):
        total[s * 8 : e * 8] += blend_ramp(spans, i, 8)
    torch.testing.assert_close(total, torch.ones_like(total))


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 400), tile=st.integers(4, 64), overlap_share=st.floats(0, 0.4999))
def test_blend_weights_sum_to_one_for_every_valid_overlap(length, tile, overlap_share):
    """Every (tile, overlap) split_tile_size accepts (overlap under half the tile), every length:
    the case of the report was tile 16, overlap 7, a 26-latent side (1.117 with neighbour ramps)."""
    overlap = int(overlap_share * tile)
    assert 2 * overlap < tile
    spans = tile_spans(length, tile, overlap)
    total = torch.zeros(length * 8)
    for (s, e), weight in zip(spans, blend_weights(spans, 8)):
        assert (weight > 0).all()
        total[s * 8 : e * 8] += weight
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-6)


def test_the_reported_overlap_no_longer_brightens_a_band():
    spans = tile_spans(26, 16, 7)  # 208 px, tile 128, overlap 56
    total = torch.zeros(26 * 8)
    for i, (s, e) in enumerate(spans):
        total[s * 8 : e * 8] += blend_ramp(spans, i, 8)
    assert total.max() > 1.1  # the neighbours' ramps alone: the bright band of the report
    total.zero_()
    for (s, e), weight in zip(spans, blend_weights(spans, 8)):
        total[s * 8 : e * 8] += weight
    assert abs(total.max().item() - 1) < 1e-6


@pytest.mark.parametrize("tile_size", [256, 512])
def test_stats_costs_under_three_untiled_decodes_at_2048(tile_size):
    """The issue's cost bar, counted: pixels the model processes / pixels of a 2048² output."""
    seen = []

    def fn(t):
        seen.append(t.shape[-2] * t.shape[-1])
        return torch.zeros(1, 3, t.shape[-2] * 8, t.shape[-1] * 8)

    z = torch.zeros(1, 4, 256, 256)
    run_tiled(fn, torch.nn.Identity(), z, (256, 256), torch.empty(1, 3, 2048, 2048), tile_size, method="stats")
    cost = sum(seen) / (256 * 256)
    assert 2.0 < cost <= 3.0, cost


@torch.no_grad()
def test_exact_costs_under_two_untiled_decodes(one_thread):
    """FLOPs of the default path against the untiled decode (torch's FLOP counter)."""
    vae = random_codec().vae
    z = torch.randn(1, 4, 96, 96, generator=torch.Generator().manual_seed(0))
    counts = []
    for tile in (None, 256):
        with FlopCounterMode(display=False) as counter:
            vae.decode(z) if tile is None else tiled_decode(vae, z, tile)
        counts.append(counter.get_total_flops())
    assert 1.0 < counts[1] / counts[0] < 2.0, counts


# ------------------------------------------------------------------------- exactness and bad input
@torch.no_grad()
def test_a_tile_covering_the_image_is_the_untiled_run():
    codec = random_codec()
    x = pil_to_tensor(Image.fromarray(smooth_image(0, 96, 128)))[None]
    z = codec.vae.encode(x).latent_dist.mean
    for method in tiling.METHODS:
        assert torch.equal(tiled_decode(codec.vae, z, 256, method=method), codec.vae.decode(z).sample)
        assert torch.equal(tiled_encode(codec.vae, x, 256, method=method)[0], codec.vae.encode(x).latent_dist.mean)


def test_bad_tile_settings_are_refused_with_the_fix():
    vae = random_codec().vae
    with pytest.raises(ValueError, match="multiple of 8"):
        Codec(vae, device="cpu", tile_size=60)
    with pytest.raises(ValueError, match="multiple of 8"):
        Codec(vae, device="cpu", tile_size=64, tile_overlap=12)
    with pytest.raises(ValueError, match="less than half the tile"):
        Codec(vae, device="cpu", tile_size=64, tile_overlap=32)
    with pytest.raises(ValueError, match="choose from exact, stats, blend"):
        Codec(vae, device="cpu", tile_size=64, tile_method="passes")


# ------------------------------------------------------------------------- item 1: never worse than blend
def assert_exact_and_best(dec, enc):
    """The default path is the untiled run to rounding, so better than blend and diffusers."""
    assert dec["exact"] >= 80 and dec["exact"] > max(dec["blend"], dec["diffusers"]), dec
    assert enc["exact"] >= 80 and enc["exact"] > enc["blend"], enc


def test_random_weights_exact_tiling_is_the_untiled_run(one_thread):
    vae = random_codec().vae
    x = photo()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(tiled_decode(vae, z, 64), vae.decode(z).sample, atol=1e-4, rtol=0)
        mean, logvar = tiled_encode(vae, x, 64)
        dist = vae.encode(x).latent_dist
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=0)
    for tile in (128, 256):
        assert_exact_and_best(decode_quality(vae, z, tile), encode_quality(vae, x, tile))


@pytest.mark.slow
def test_briefly_trained_weights_exact_beats_blend_and_diffusers(tmp_path, one_thread):
    """40 steps of training (the issue's case that the old refinement lost, 14.9 dB)."""
    vae = trained_codec(tmp_path, 40).vae
    x = photo()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    for tile in (128, 256):
        dec, enc = decode_quality(vae, z, tile), encode_quality(vae, x, tile)
        print(tile, dec, enc)
        assert_exact_and_best(dec, enc)


def test_exact_falls_back_to_blend_where_host_memory_is_short(monkeypatch):
    vae = random_codec().vae
    z = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    blend = tiled_decode(vae, z, 64, method="blend")
    monkeypatch.setattr(tiling, "available_host_bytes", lambda: 1000)
    monkeypatch.setattr(tiling, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"GiB of activations.*tile_method='blend'"):
        assert torch.equal(tiled_decode(vae, z, 64, name="my-codec"), blend)


def test_exact_falls_back_to_blend_on_an_unknown_model(monkeypatch):
    vae = random_codec().vae
    monkeypatch.setattr(tiling, "_warned", set())
    vae.encoder.down_blocks[0] = torch.nn.Identity()  # no longer the diffusers kl-f8 layout
    with pytest.warns(RuntimeWarning, match="does not know this model"):
        assert tiling._exact_or_fallback(vae, vae.encoder, (12, 16), 1, torch.float32, "encoding") == "blend"


def test_diverged_statistics_fall_back_to_blend_and_say_so_once(monkeypatch):
    vae = random_codec().vae
    z = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    blend = tiled_decode(vae, z, 64, method="blend")
    monkeypatch.setattr(tiling, "STATS_TOLERANCE", -1.0)  # every estimate counts as diverged
    monkeypatch.setattr(tiling, "_warned", set())
    with pytest.warns(RuntimeWarning, match="diverged.*tile_method='blend'"):
        fallback = tiled_decode(vae, z, 64, method="stats")
    assert torch.equal(fallback, blend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        tiled_decode(vae, z, 64, method="stats")


# ------------------------------------------------------------------------- item 2: a trained codec
KODAK = [f"kodim{i:02d}" for i in range(1, 25)]


@pytest.mark.slow
def test_trained_codec_tiles_without_seams_on_every_kodak_image(tmp_path, one_thread):
    """A 300-step codec, all 24 Kodak photos, 256 and 512 px tiles: tiled vs untiled decoding
    >= 45 dB and better than diffusers' tiling on each; tiled encoding agrees with untiled."""
    vae = trained_codec(tmp_path, 300).vae
    worst = {}
    for name in KODAK:
        x = pil_to_tensor(load_image(shared("kodak", f"{name}.png")))[None]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            for tile in (256, 512):
                ref = vae.decode(z).sample
                ours = psnr(tiled_decode(vae, z, tile), ref)
                vae.enable_tiling()
                vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
                theirs = psnr(vae.decode(z).sample, ref)
                vae.disable_tiling()
                assert ours >= 45 and ours > theirs, (name, tile, ours, theirs)
                worst[tile] = min(worst.get(tile, 999), ours)
    print("worst tiled vs untiled (dB):", worst)
    assert encode_quality(vae, x, 256)["exact"] >= 80


# ------------------------------------------------------------------------- the public API and CLI
def test_codec_api_tiles_encode_and_decode():
    codec = random_codec()
    x = torch.stack([pil_to_tensor(Image.fromarray(smooth_image(i, 96, 128))) for i in range(2)])
    tiled = Codec(codec.vae, device="cpu", tile_size=64, tile_overlap=16, tile_method="blend")
    mean_t, logvar_t = tiled.posterior(x)
    for i in range(2):  # a batch tiles each image as alone
        torch.testing.assert_close(mean_t[i : i + 1], tiled_encode(codec.vae, x[i : i + 1], 64, 16, "blend")[0])
    decoded = tiled.decode(tiled.encode(x))
    assert decoded.shape == x.shape and torch.isfinite(decoded).all() and torch.isfinite(logvar_t).all()


def test_cli_decode_with_tile_size(tmp_path):
    codec = random_codec()
    folder = codec.save_pretrained(tmp_path / "codec")
    save_image(pil_to_tensor(Image.fromarray(smooth_image(3, 96, 128))), tmp_path / "in.png")
    common = ["--codec", str(folder), "--device", "cpu"]
    z_file = str(tmp_path / "z.safetensors")
    assert main(["encode", *common, "--tile-size", "64", str(tmp_path / "in.png"), z_file]) == 0
    assert main(["decode", *common, z_file, str(tmp_path / "plain.png")]) == 0
    assert main(["decode", *common, "--tile-size", "64", "--tile-overlap", "16", "--tile-method", "blend",
                 z_file, str(tmp_path / "tiled.png")]) == 0
    assert main(["decode", *common, "--tile-size", "256", z_file, str(tmp_path / "one_tile.png")]) == 0
    plain, tiled, one = (pil_to_tensor(load_image(tmp_path / n)) for n in ("plain.png", "tiled.png", "one_tile.png"))
    assert tiled.shape == plain.shape == (3, 96, 128)
    assert torch.equal(one, plain)  # smaller than a tile: the untiled path
    assert main(["decode", *common, "--tile-size", "12", z_file, str(tmp_path / "x.png")]) == 2
    with pytest.raises(SystemExit):
        main(["decode", *common, "--tile-size", "64", "--tile-method", "passes", z_file, str(tmp_path / "x.png")])
