"""codec.evaluation.metrics: PSNR / SSIM / MS-SSIM values, NaN handling in summaries, latent statistics."""

import math

import numpy as np
import pytest
import torch

from codec.evaluation.metrics import MS_SSIM_MIN_SIDE, LatentStats, ms_ssim, psnr, ssim, summarize


def _pair(h, w, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    y = (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y


def test_identical_images_score_perfectly():
    x, _ = _pair(MS_SSIM_MIN_SIDE, MS_SSIM_MIN_SIDE)
    assert torch.all(psnr(x, x) > 100)
    assert torch.allclose(ssim(x, x), torch.ones(2))
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)


def test_ms_ssim_ranks_noise_and_skips_small_images():
    x, mild = _pair(MS_SSIM_MIN_SIDE, 192, noise=0.05)
    _, strong = _pair(MS_SSIM_MIN_SIDE, 192, noise=0.4)
    assert torch.all(ms_ssim(x, mild) > ms_ssim(x, strong))
    small, small_y = _pair(MS_SSIM_MIN_SIDE - 8, 300)
    assert torch.isnan(ms_ssim(small, small_y)).all()  # not a crash: left out of the mean


def test_summarize_leaves_nan_out_and_counts():
    s = summarize([1.0, math.nan, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 2}
    assert summarize([math.nan])["n"] == 0 and math.isnan(summarize([])["mean"])


def test_latent_stats_per_channel_and_kl():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 4, 16, 16, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0]).view(1, 4, 1, 1)
    lat[:, 3] += 3.0
    stats = LatentStats()
    # Posterior equal to the prior: KL is exactly 0; shifted by 1 with unit variance: 0.5.
    stats.update(lat, mean=torch.zeros(3, 4, 2, 2), logvar=torch.zeros(3, 4, 2, 2))
    stats.update(lat, mean=torch.ones(3, 4, 2, 2), logvar=torch.zeros(3, 4, 2, 2))
    r = stats.result()
    assert r["channel_std"] == pytest.approx([1.0, 2.0, 0.5, 1.0], rel=0.1)
    assert r["channel_mean"][3] == pytest.approx(3.0, abs=0.1)
    assert r["kl_per_element"] == pytest.approx(0.25)
    assert stats.histogram_values().shape == (4, 2 * 3 * 16 * 16)


def test_psnr_matches_the_closed_form_for_a_known_error():
    """Every pixel off by exactly k grey levels: MSE = (k/255)^2, PSNR = 20 log10(255/k)."""
    from codec.images import uint8_to_tensor

    rng = np.random.default_rng(0)
    a = rng.integers(10, 240, size=(40, 56, 3), dtype=np.uint8)
    for k in (1, 5, 12):
        got = psnr(uint8_to_tensor(a)[None], uint8_to_tensor(a + np.uint8(k))[None])
        assert abs(float(got) - 20 * math.log10(255 / k)) < 1e-3, (k, float(got))


def test_ssim_equals_the_references_on_a_real_photo():
    """SSIM as Wang et al.'s reference and scikit-image compute it (Gaussian window, sigma 1.5,
    the mean over positions whose window lies inside the image), on a Kodak photo and noisy
    copies and as a JPEG at quality 10 (the case that was 0.69672 with torchmetrics' border,
    against 0.69426)."""
    import io

    from conftest import shared
    from PIL import Image
    from skimage.metrics import structural_similarity

    from codec.images import load_image, uint8_to_tensor

    photo = load_image(shared("kodak", "kodim01.png"))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=10)
    a = np.asarray(photo)
    rng = np.random.default_rng(0)
    copies = [np.asarray(Image.open(buffer).convert("RGB"))] + [
        np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8) for sigma in (3, 12)]
    for b in copies:
        ours = float(ssim(uint8_to_tensor(a)[None], uint8_to_tensor(b)[None]))
        theirs = structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False)
        assert abs(ours - theirs) < 2e-5, (ours, theirs)
    assert round(float(ssim(uint8_to_tensor(a)[None], uint8_to_tensor(copies[0])[None])), 4) == 0.6943
