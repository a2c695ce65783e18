import math

import pytest
import torch

from codec.evaluation.lpips_weights import load_lpips
from codec.models import build_autoencoder
from train.autoencoder import losses
from train.autoencoder.config import LossConfig
from train.autoencoder.discriminator import PatchDiscriminator


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


# ------------------------------------------------------------------------- the GAN phase's one-pass gradient
@pytest.fixture(scope="module")
def vgg():
    return load_lpips("vgg")


def reference_gan_loss(cfg, lpips, logvar, x, recon, post, disc, last):
    """The LDM reference (``LPIPSWithDiscriminator``) as written there: ``autograd.grad`` of nll and
    of g to the last layer for d_weight, then one backward of the whole loss."""
    rec = (x - recon).abs() + cfg.perceptual_weight * lpips(x, recon)
    nll = (rec / torch.exp(logvar) + logvar).sum() / x.shape[0]
    kl = post.kl().sum() / x.shape[0]
    g_loss = -disc(recon).mean()
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * cfg.disc_weight
    return nll + cfg.kl_weight * kl + d_weight * cfg.disc_factor * g_loss, d_weight


@pytest.mark.parametrize("learn_logvar", [False, True])
def test_gan_gradient_equals_the_double_backward_reference(vgg, learn_logvar):
    """Every VAE gradient (and logvar's), d_weight and the loss value match the reference, on the
    tiny preset with VGG-LPIPS, KL and the discriminator on from step 0, fp32."""
    from train.autoencoder.losses import frozen

    torch.set_num_threads(1)  # the same summation order in both passes
    cfg = LossConfig(perceptual_weight=1.0, perceptual_net="vgg", kl_weight=1e-3, logvar_init=0.3,
                     learn_logvar=learn_logvar, disc_weight=0.5, disc_start=0, disc_factor=0.7)
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    disc = PatchDiscriminator(channels=16, layers=3)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    gen = losses.GeneratorLoss(cfg, vgg)
    last = vae.decoder.conv_out.weight

    def gradients(loss_fn):
        vae.zero_grad(set_to_none=True)
        gen.logvar.grad = None
        torch.manual_seed(1)  # the same posterior sample
        recon, post = forward(vae, x)
        with frozen(disc):
            loss, d_weight = loss_fn(recon, post)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in vae.named_parameters()}
        if learn_logvar:
            grads["logvar"] = gen.logvar.grad.clone()
        return loss.detach(), float(d_weight), grads

    def ours(recon, post):
        loss, logs = gen(x, recon, post, step=0, disc=disc, last_layer=last)
        return loss, logs["d_weight"]

    loss, d_weight, grads = gradients(ours)
    ref_loss, ref_d_weight, ref_grads = gradients(
        lambda recon, post: reference_gan_loss(cfg, vgg, gen.logvar, x, recon, post, disc, last))
    assert 0 < ref_d_weight < 1e4 * cfg.disc_weight  # not clamped: the norms' ratio itself is compared
    assert d_weight == pytest.approx(ref_d_weight, rel=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and ("logvar" in grads) == learn_logvar
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, ref in ref_grads.items():
        # to_k.bias' gradient is 0 in exact arithmetic (softmax ignores a shift shared by all keys):
        # both passes hold rounding noise there, so it is compared against the largest gradient.
        scale = largest if name.endswith("attentions.0.to_k.bias") else ref.abs().max().item()
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert all(p.grad is None for p in disc.parameters())


def test_gan_gradient_under_fp16_loss_scaling(vgg):
    """With a loss scale s, backward(s · loss) gives s times the unscaled gradients and the same
    d_weight (the inner backwards run on scaled losses, the surrogate divides by s)."""
    torch.set_num_threads(1)
    cfg = LossConfig(perceptual_weight=1.0, perceptual_net="vgg", disc_weight=0.5, disc_start=0)
    torch.manual_seed(0)
    vae = build_autoencoder("test")
    disc = PatchDiscriminator(channels=8, layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    gen = losses.GeneratorLoss(cfg, vgg)

    def run(scale):
        vae.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        recon, post = forward(vae, x)
        disc.requires_grad_(False)
        loss, logs = gen(x, recon, post, step=0, disc=disc, last_layer=vae.decoder.conv_out.weight,
                         grad_scale=None if scale is None else torch.tensor(scale))
        (loss * (scale or 1.0)).backward()
        return logs, {n: p.grad / (scale or 1.0) for n, p in vae.named_parameters()}

    logs, grads = run(None)
    logs_s, grads_s = run(1024.0)
    assert logs_s["d_weight"] == pytest.approx(logs["d_weight"], rel=1e-6)
    assert logs_s["loss"] == logs["loss"]
    largest = max(g.abs().max().item() for g in grads.values())
    for name, ref in grads.items():
        scale = largest if name.endswith("attentions.0.to_k.bias") else ref.abs().max().item()  # as above
        torch.testing.assert_close(grads_s[name], ref, rtol=1e-5, atol=1e-6 * scale, msg=name)

    # A scale whose gradients overflow: the GradScaler's to skip (non-finite gradients), while the
    # logged loss stays finite, so the step is not also counted as a non-finite loss.
    logs_o, grads_o = run(2.0**127)
    assert math.isfinite(logs_o["loss"]) and math.isfinite(logs_o["d_weight"])
    assert not all(torch.isfinite(g).all() for g in grads_o.values())
