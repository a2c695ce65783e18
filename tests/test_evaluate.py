"""vae-codec eval: references (JPEG/WebP rate matching, AutoencoderTiny), pictures, cost, and
the whole report (metrics.json, per_image.csv, report.html rendered in headless Chromium)."""

import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import shared, smooth_image
from diffusers import AutoencoderTiny
from PIL import Image

from codec import Codec
from codec.evaluation.cost import PeakMemory
from codec.evaluation.evaluate import evaluate
from codec.evaluation.figures import error_heatmap, worst_window
from codec.evaluation.references import ClassicalCodec, closest_quality, compress
from codec.images import uint8_to_tensor
from codec.models import build_autoencoder

METRICS = {"psnr", "ssim", "ms_ssim", "lpips_alex", "lpips_vgg"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation, shared by the tests below: our test codec + an AutoencoderTiny + JPEG/WebP
    on three small generated images (MS-SSIM on large ones is tested in test_metrics.py)."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    kl = Codec(build_autoencoder("test"), device="cpu").save_pretrained(root / "kl")
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    tiny.save_pretrained(root / "taesd")
    data = root / "images"
    data.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(i, 48 + 4 * i, 64)).save(data / f"img{i}.png")  # 52: cropped to 48
    (data / "broken.png").write_bytes(b"not an image")
    out = root / "out"
    report = evaluate([str(kl), str(root / "taesd")], str(data), str(out), device="cpu", worst=2, crop_size=32)
    return report, out, root


def test_metrics_json_per_codec(evaluated):
    report, out, root = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["images"] == 3 and any("broken.png" in s for s in saved["skipped"])
    assert list(saved["codecs"]) == [str(root / "kl"), str(root / "taesd"), "jpeg", "webp"]
    for r in saved["codecs"].values():
        assert set(r["metrics"]) == METRICS
        assert all({"mean", "std"} <= set(v) for v in r["metrics"].values())
        assert r["metrics"]["ms_ssim"]["n"] == 0  # too small for five scales: left out, no crash
        assert 0 < r["metrics"]["psnr"]["mean"] < 100
    assert saved["codecs"][str(root / "kl")]["bpp"]["mean"] == pytest.approx(1.0)  # 4 ch * 16 bit / 64
    assert saved["codecs"][str(root / "taesd")]["kind"] == "AutoencoderTiny"
    assert any(n.startswith("rFID") for n in saved["notices"]) or saved["codecs"]["jpeg"]["rfid"] is not None
    assert any("1 image(s) centre-cropped" in n for n in saved["notices"])
    assert any("MS-SSIM left out for 3" in n for n in saved["notices"])


def test_latents_and_cost(evaluated):
    report, _, root = evaluated
    kl, tiny = report["codecs"][str(root / "kl")], report["codecs"][str(root / "taesd")]
    assert len(kl["latents"]["channel_std"]) == 4 and kl["latents"]["kl_per_element"] > 0
    assert tiny["latents"]["kl_per_element"] is None  # deterministic: no posterior, no KL
    assert report["codecs"]["jpeg"]["latents"] is None
    assert kl["cost"]["parameters"] == sum(p.numel() for p in build_autoencoder("test").parameters())
    assert kl["cost"]["timed_images"] == 2  # the first image is a warm-up
    assert kl["cost"]["encode_images_per_s"] > 0 and kl["cost"]["peak_memory_mib"] >= 0


def test_per_image_csv_and_pictures(evaluated):
    _, out, _ = evaluated
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 3 * 4
    assert {r["codec"] for r in rows if r["quality"]} == {"jpeg", "webp"}
    assert sum(r["ms_ssim"] == "" for r in rows) == 3 * 4  # NaN written as an empty cell
    assert Image.open(out / "comparison.png").height > 2 * 64  # two worst images, crops shown 2x
    assert (out / "latents_0.png").exists() and (out / "latents_1.png").exists()


def test_report_html_is_self_contained(evaluated):
    _, out, _ = evaluated
    html = (out / "report.html").read_text()
    sources = re.findall(r"src='([^']*)'", html)
    assert len(sources) >= 2 + 2 * (1 + 2 * 4) and all(s.startswith("data:image/") for s in sources)
    assert "Worst 2 images" in html and "rFID" in html and "LPIPS VGG" in html


def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    _, out, _ = evaluated
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
         (out / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (900, 1200) and pixels.std() > 20  # text, tables and pictures, not blank


def test_closest_quality_matches_brute_force():
    arr = smooth_image(3, 96, 128)
    target = 0.8 * 96 * 128 / 8
    q, data = closest_quality(arr, "webp", target)
    sizes = {k: len(compress(arr, "webp", k)) for k in range(1, 101)}
    assert abs(len(data) - target) <= min(abs(s - target) for s in sizes.values()) * 1.05 + 16
    assert len(data) == sizes[q]


def test_classical_codec_hits_the_rate_on_a_real_photo():
    photo = np.asarray(Image.open(shared("kodak", "kodim23.png")).convert("RGB"))[:256, :256]
    x = uint8_to_tensor(photo)[None]
    for fmt in ("jpeg", "webp"):
        rec = ClassicalCodec(fmt, 1.0)(x)
        assert rec.bpp == pytest.approx(1.0, rel=0.15) and rec.image.shape == x.shape
        assert 1 <= rec.extra["quality"] <= 100


def test_heatmap_and_worst_window():
    x = smooth_image(0, 64, 64)
    y = x.copy()
    assert error_heatmap(x, y).max() <= 4  # no error: (almost) black
    y[40:56, 8:24] = 255 - y[40:56, 8:24]
    top, left, size = worst_window(x, y, 16)
    assert (top, left, size) == (40, 8, 16)
    assert worst_window(x, y, 500)[2] == 64  # a crop larger than the image: the whole image


def test_peak_memory_sees_a_large_allocation():
    tracker = PeakMemory(torch.device("cpu"))
    with tracker:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del big
    assert tracker.peak_bytes >= 48 * 2**20, tracker.method


@torch.no_grad()
def test_eval_of_a_per_channel_codec_equals_decoding_by_hand(tmp_path):
    """A codec with latents_mean/latents_std (what `scale --per-channel` writes): eval's
    reconstruction is decode(posterior mean), computed here without codec.factors."""
    from codec.evaluation.references import LearnedCodec

    torch.manual_seed(0)
    vae = build_autoencoder("test")
    vae.register_to_config(latents_mean=[0.5, -0.2, 0.1, 0.3], latents_std=[2.0, 0.5, 1.5, 3.0],
                           scaling_factor=0.7)
    folder = Codec(vae, device="cpu").save_pretrained(tmp_path / "per-channel")
    x = uint8_to_tensor(smooth_image(5, 48, 64))[None]
    got = LearnedCodec(folder, device="cpu")(x)
    mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(got.image, vae.decode(mean).sample, atol=1e-5, rtol=0)
    stats = torch.tensor([0.5, -0.2, 0.1, 0.3]).view(1, 4, 1, 1), torch.tensor([2.0, 0.5, 1.5, 3.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(got.latents, (mean - stats[0]) * 0.7 / stats[1], atol=1e-5, rtol=0)


def test_eval_reports_activation_peaks_and_fp16_overflow(tmp_path, capsys):
    """A codec made to overflow fp16 without changing its fp32 outputs (a convolution that feeds a
    GroupNorm scaled by 1e3, the mechanism behind SDXL's NaNs): eval names the half and the size."""
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    clean = Codec(vae, device="cpu").save_pretrained(tmp_path / "clean")
    conv = vae.decoder.up_blocks[0].resnets[0].conv1  # feeds norm2 (a GroupNorm): its scale cancels
    with torch.no_grad():
        conv.weight.mul_(1e6), conv.bias.mul_(1e6)
    loud = Codec(vae, device="cpu").save_pretrained(tmp_path / "loud")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(i, 32, 32)).save(data / f"{i}.png")
    report = evaluate([str(clean), str(loud)], str(data), str(tmp_path / "out"), device="cpu", classical=False,
                      transforms=[])
    quiet, noisy = (report["codecs"][str(p)]["cost"]["activations"] for p in (clean, loud))
    assert quiet["fp16_overflows"] == {"encoder": False, "decoder": False} and quiet["decoder_max_abs"] < 1e3
    assert noisy["fp16_overflows"] == {"encoder": False, "decoder": True} and noisy["decoder_max_abs"] > 65504
    assert noisy["encoder_max_abs"] == pytest.approx(quiet["encoder_max_abs"])
    assert any(f"{loud}: activations reach decoder" in n for n in report["notices"])
    assert "overflows (decoder)" in (tmp_path / "out" / "report.html").read_text()


def test_a_hub_codec_is_recognised_by_its_hub_config(tmp_path, monkeypatch):
    """`--codec stabilityai/sd-vae-ft-mse` (the published-protocol command): the class is read from
    the Hub's config.json (here a stand-in for hf_hub_download), not refused as a missing folder."""
    import huggingface_hub

    from codec.evaluation.references import autoencoder_class

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    asked = []

    def download(repo, filename, subfolder=None):
        asked.append((repo, filename, subfolder))
        return str(tmp_path / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert autoencoder_class("madebyollin/taesd") == "AutoencoderTiny"
    assert asked == [("madebyollin/taesd", "config.json", None)]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        autoencoder_class(str(tmp_path / "not-here"))  # a local path is never sent to the Hub
