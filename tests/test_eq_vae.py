"""EQ-VAE as published (loss.equivariance_weight > 0, equivariance_mode published): the draws,
the resampling against the reference's, a run that trains with the GAN on transformed pairs and
resumes exactly, the weight, and the refusals."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error
from test_train import args, weights

from train.__main__ import main
from train.autoencoder import eq_vae


def test_draws_follow_the_papers_probabilities_and_repeat_per_step():
    draws = [eq_vae.draw(0, 0, step, 32) for step in range(4000)]
    modes = [d.mode for d in draws]
    assert abs(modes.count("latent") / 4000 - 0.5) < 0.03
    assert abs(modes.count("image") / 4000 - 0.5 * 0.25) < 0.02
    latent = [d for d in draws if d.mode == "latent"]
    assert {d.size[0] for d in latent} == set(range(8, 32))  # the paper's {8..31}/32 at 256-px crops
    assert {d.angle for d in latent} == {1, 2, 3} and all(d.size[0] == d.size[1] for d in latent)
    assert {d.angle for d in draws if d.mode != "latent"} == {0}
    assert eq_vae.draw(0, 0, 17, 32) == draws[17]  # the same step draws the same
    assert [eq_vae.draw(0, 1, s, 32) for s in range(50)] != draws[:50]  # ranks draw their own
    anisotropic = [eq_vae.draw(0, 0, s, 32, anisotropic=True) for s in range(200)]
    assert any(d.size and d.size[0] != d.size[1] for d in anisotropic)
    small = {eq_vae.draw(0, 0, s, 8).size for s in range(400)} - {None}
    assert {h for h, _ in small} == set(range(2, 8))  # a 64-px crop: latent sides 2..7


def test_tau_resamples_as_the_reference_does():
    """At L = 32 (256-px crops), τ is the reference's interpolate(scale_factor=k/32) then
    rot90(dims=[-1, -2]), on the latent and on the image, bit for bit."""
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(2, 4, 32, 32, generator=g), torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    def reference(t, k, angle):
        return torch.rot90(F.interpolate(t, scale_factor=k / 32, mode="bilinear", align_corners=False), k=angle,
                           dims=[-1, -2])

    for k in (8, 13, 31):
        for angle in (1, 2, 3):
            d = eq_vae.Draw("latent", (k, k), angle)
            assert torch.equal(d.latent(z), reference(z, k, angle)) and torch.equal(d.image(x), reference(x, k, angle))
    # A latent side that is not a power of two still gets exactly k (12 * (5/12) rounds down to 4).
    assert eq_vae.Draw("latent", (5, 5), 1).latent(torch.zeros(1, 4, 12, 12)).shape[-2:] == (5, 5)


def eq_args(out, data, *extra):
    return args(out, data, "loss.equivariance_weight=1", "loss.disc_layers=1", "loss.disc_start=0",
                "loss.perceptual_weight=0", *extra)


def test_a_run_trains_on_transformed_pairs_with_the_gan_and_resumes_exactly(tmp_path, image_folder):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(eq_args(straight, image_folder, "max_steps=6")) == 0
    assert main(eq_args(resumed, image_folder, "max_steps=3")) == 0
    assert main(eq_args(resumed, image_folder, "max_steps=6", "resume=true")) == 0
    a, b = weights(straight / "codec"), weights(resumed / "codec")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert {entry["eq_vae_mode"] for entry in log} >= {2.0}  # latent steps happened
    assert all("g_loss" in entry for entry in log)  # the GAN judged every step's pair


@pytest.mark.parametrize("extra,pattern", [
    (["data.crop_size=16"], "leaves no latent pixel; use data.crop_size >= 32"),
    (["loss.equivariance_min_scale=0.05"], "0.05 of the 4x4 latent .* leaves no latent pixel"),
    (["loss.equivariance_min_scale=0.99"], "leaves no size below"),
    (["loss.disc_layers=3", "data.crop_size=64"], "use data.crop_size >= 128"),
    (["loss.equivariance_p_prior=1.5"], "equivariance_p_prior"),
    (["loss.equivariance_mode=paper"], "unknown 'paper'"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, image_folder, capsys, extra, pattern):
    with pytest.raises(SystemExit) as exc:  # a config error: argparse's one line, exit 2
        main(eq_args(tmp_path / "r", image_folder, "max_steps=1", *extra))
    assert_user_error(capsys, exc.value.code, pattern)


def test_the_weight_scales_the_transformed_steps_loss(tmp_path, image_folder):
    """Step 0 of seed 0 is a latent step (see the draws): its loss at weight 0.5 is half of weight 1's."""
    assert eq_vae.draw(0, 0, 0, 4).mode == "latent"
    losses = {}
    for weight in ("1", "0.5"):
        out = tmp_path / weight
        assert main(eq_args(out, image_folder, "max_steps=1", f"loss.equivariance_weight={weight}")) == 0
        losses[weight] = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["0.5"] == pytest.approx(losses["1"] / 2, rel=1e-6)
