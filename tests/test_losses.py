import pytest
import torch

from codec.evaluation.lpips_weights import load_lpips
from codec.models import build_autoencoder
from train import losses
from train.config import LossConfig
from train.discriminator import PatchDiscriminator


def forward(vae, x):
    post = vae.encode(x).latent_dist
    return vae.decode(post.sample()).sample, post


@pytest.fixture(scope="module")
def alex():
    return load_lpips("alex")


def test_lpips_gradient_reaches_decoder(alex):
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def decoder_grad(weight):
        vae.zero_grad()
        torch.manual_seed(1)
        recon, post = forward(vae, x)
        cfg = LossConfig(perceptual_weight=weight, perceptual_net="alex")
        loss, logs = losses.GeneratorLoss(cfg, alex)(x, recon, post, step=0)
        loss.backward()
        return vae.decoder.conv_out.weight.grad.clone(), logs

    g0, logs0 = decoder_grad(0.0)
    g1, logs1 = decoder_grad(1.0)
    assert "lpips" in logs1 and "lpips" not in logs0 and logs1["lpips"] > 0
    assert (g1 - g0).abs().max() > 1e-6  # the perceptual term changes the decoder's gradient


def test_reference_formula_and_logged_terms():
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, post = forward(vae, x)
    cfg = LossConfig(perceptual_weight=0.0, logvar_init=0.5, kl_weight=1e-3, reconstruction="l2")
    loss, logs = losses.GeneratorLoss(cfg, None)(x, recon, post, step=0)
    nll = (((x - recon) ** 2) / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2
    kl = post.kl().sum() / 2
    torch.testing.assert_close(loss, nll + 1e-3 * kl)
    assert {"rec", "nll", "kl", "logvar", "loss", "disc_factor"} <= set(logs)


def test_gan_terms_only_after_disc_start(monkeypatch):
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    disc = PatchDiscriminator(channels=8, layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = LossConfig(perceptual_weight=0.0, disc_weight=0.5, disc_start=10)
    gen = losses.GeneratorLoss(cfg, None)
    last = vae.decoder.conv_out.weight

    def boom(*a):
        raise AssertionError("adaptive weight computed before disc_start")

    with monkeypatch.context() as m:
        m.setattr(losses, "adaptive_weight", boom)
        recon, post = forward(vae, x)
        _, logs = gen(x, recon, post, step=9, disc=disc, last_layer=last)
    assert logs["disc_factor"] == 0.0 and "g_loss" not in logs
    recon, post = forward(vae, x)
    _, logs = gen(x, recon, post, step=10, disc=disc, last_layer=last)
    assert logs["disc_factor"] == 1.0 and logs["d_weight"] >= 0 and "g_loss" in logs


def test_discriminator_loss_sends_nothing_to_the_autoencoder():
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    disc = PatchDiscriminator(channels=8, layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _ = forward(vae, x)
    d_loss, logs = losses.discriminator_loss(disc, x, recon, factor=1.0)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert {"d_loss", "logits_real", "logits_fake"} <= set(logs)
