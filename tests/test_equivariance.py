"""EQ-VAE: the transforms, the training term, and the latent-space measures of `vae-codec eval`,
checked against values known by hand (an exactly equivariant toy codec, white noise)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from codec.cli import main as cli
from codec.equivariance import LatentMeasures, apply, check_transforms, high_frequency_share
from train.__main__ import main as train_main


def test_transforms_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(apply("down2", x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(apply("down4", x), torch.tensor([[[[7.5]]]]))
    assert torch.equal(apply("rot90", x)[0, 0, 0], torch.tensor([3.0, 7.0, 11.0, 15.0]))  # counter-clockwise
    assert torch.equal(apply("rot180", x), x.flip(-1).flip(-2))
    assert torch.equal(apply("rot270", apply("rot90", x)), x)
    with pytest.raises(ValueError, match="down4 needs latent sides divisible by 4, got 6x8"):
        check_transforms(["down2", "down4"], (6, 8))
    with pytest.raises(ValueError, match="unknown transform"):
        check_transforms(["shear"])


def test_high_frequency_share_of_noise_and_of_smooth_latents():
    torch.manual_seed(0)
    high, total = high_frequency_share(torch.randn(8, 4, 64, 64))
    # White noise spreads evenly over the square of frequencies; the disc of radius half the
    # Nyquist frequency holds pi/16 of it.
    assert high / total == pytest.approx(1 - math.pi / 16, abs=0.01)
    ramp = torch.linspace(-1, 1, 64).expand(2, 4, 64, 64)
    assert high_frequency_share(ramp)[0] / high_frequency_share(ramp)[1] < 0.05


def test_an_equivariant_codec_measures_zero_and_a_position_dependent_one_does_not():
    """Block averaging commutes with block-average downscaling and quarter turns, exactly."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1

    def encode(t):
        return F.avg_pool2d(t, 8)

    def decode(z):
        return F.interpolate(z, scale_factor=8, mode="nearest")

    exact = LatentMeasures(["down2", "down4", "rot90"])
    exact.update(encode, decode, x, encode(x))
    result = exact.result()
    for name in ("down2", "down4", "rot90"):
        assert result["transforms"][name]["latent_error"] == pytest.approx(0, abs=1e-12)
    # rot90 of blocks decodes to exactly rot90(x) only where x is constant per block: not here
    assert result["transforms"]["rot90"]["decoded_psnr"] < 40

    def skewed(t):  # a position-dependent encoder: not equivariant
        z = encode(t)
        return z + torch.linspace(0, 1, z.shape[-1])

    small = LatentMeasures(["down4"])  # a 24-px image has 3x3 latents: no 4x4 block to average
    small.update(encode, decode, x[..., :24, :24], encode(x[..., :24, :24]))
    assert small.result()["images_too_small"] == 1 and small.result()["transforms"]["down4"]["latent_error"] is None

    wrong = LatentMeasures(["down2", "rot90"])
    wrong.update(skewed, decode, x, skewed(x))
    assert all(t["latent_error"] > 0.01 for t in wrong.result()["transforms"].values())


def test_eval_reports_latent_space_measures(tmp_path, image_folder, test_codec, capsys):
    codec = test_codec.save_pretrained(tmp_path / "codec")
    out = tmp_path / "eval"
    assert cli(["eval", "--codec", str(codec), "--data", str(image_folder), "--out", str(out), "--no-classical",
                "--transforms", "down2,rot90"]) == 0
    space = json.loads((out / "metrics.json").read_text())["codecs"][str(codec)]["latents"]["space"]
    assert set(space["transforms"]) == {"down2", "rot90"}
    assert 0 < space["high_frequency_share"] < 1
    assert all(t["latent_error"] > 0 and t["decoded_psnr"] > 0 for t in space["transforms"].values())
    assert "equivariance error" in (out / "report.html").read_text()
    assert cli(["eval", "--codec", str(codec), "--data", str(image_folder), "--out", str(out),
                "--transforms", "tilt"]) == 2
    assert "unknown transform(s) ['tilt']" in capsys.readouterr().err


def train_args(out, data, *extra):
    return ["--set", "model.preset=test", "--set", f"output_dir={out}", "--set", f"data.train={data}",
            "--set", "data.crop_size=32", "--set", "batch_size=2", "--set", "data.num_workers=0",
            "--set", "loss.perceptual_weight=0", "--set", "log_every=1", "--set", "ema_decay=0",
            *[x for e in extra for x in ("--set", e)]]


def test_equivariance_term_trains_and_is_logged(tmp_path, image_folder):
    plain, eq = tmp_path / "plain", tmp_path / "eq"
    assert train_main(train_args(plain, image_folder, "max_steps=2")) == 0
    assert train_main(train_args(eq, image_folder, "max_steps=2", "loss.equivariance_weight=0.5",
                                 "loss.equivariance_mode=additive", "loss.equivariance_transforms=[rot90]")) == 0
    logs = [json.loads(line) for line in (eq / "train_log.jsonl").read_text().splitlines()]
    plain_logs = [json.loads(line) for line in (plain / "train_log.jsonl").read_text().splitlines()]
    first, reference = logs[0], plain_logs[0]
    # Same weights, data and posterior noise at step 1: the loss is the plain one plus 0.5 x the term.
    assert first["nll"] == pytest.approx(reference["nll"], rel=1e-6)
    assert first["loss"] == pytest.approx(reference["loss"] + 0.5 * first["equivariance"], rel=1e-5)
    assert first["equivariance"] > 0


def test_reconstruction_term_by_hand():
    from train.autoencoder.config import LossConfig
    from train.autoencoder.losses import GeneratorLoss

    loss = GeneratorLoss(LossConfig(perceptual_weight=0.0), None)
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.25)
    # mean |x - y| = 0.25, counted as if each image had 3 x 16 x 16 elements (the untransformed size)
    assert float(loss.reconstruction(x, y, 0, per_image=3 * 16 * 16)) == pytest.approx(0.25 * 768)


@pytest.mark.parametrize("setting,message", [
    (["loss.equivariance_weight=1", "loss.equivariance_mode=additive", "data.crop_size=48"],
     "down4 needs latent sides divisible by 4, got 6x6"),
    (["loss.equivariance_weight=1", "loss.equivariance_mode=additive", "loss.equivariance_transforms=[flip]"],
     "unknown transform"),
    (["loss.equivariance_weight=-1"], "must be >= 0"),
])
def test_equivariance_config_errors(tmp_path, image_folder, capsys, setting, message):
    with pytest.raises(SystemExit) as exc:
        train_main(train_args(tmp_path / "x", image_folder, "max_steps=1", *setting))
    assert exc.value.code == 2 and message in capsys.readouterr().err
