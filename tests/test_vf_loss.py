"""VA-VAE's vision-foundation alignment (loss.vf_weight, train/autoencoder/vf_loss.py, codec/foundation.py,
codec/alignment.py): both terms against values computed by hand (dead zones included), the adaptive
weight, the foundation models (a small random DINOv2, the offline VGG16), runs that resume exactly
and export a plain AutoencoderKL, eval's alignment report, and the refusals."""

import json
import math

import pytest
import torch
from conftest import assert_user_error, smooth_image
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from test_train import args, weights

from codec import Codec
from codec.alignment import cosine_term, distance_term, fit_projection
from codec.foundation import FoundationModelUnavailable, load_foundation, match_grid
from codec.models import build_autoencoder
from train.__main__ import main
from train.autoencoder.config import LossConfig
from train.autoencoder.vf_loss import VFLoss


def vf_args(out, data, model, *extra):
    """The test preset with the VF loss on, LPIPS and the GAN off (both tested elsewhere)."""
    return args(out, data, "loss.vf_weight=0.1", f"loss.vf_model={model}", "loss.perceptual_weight=0",
                "loss.disc_weight=0", *extra)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """A small randomly initialised DINOv2 (transformers), saved as a folder loss.vf_model can name."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          patch_size=4, image_size=32)
    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vgg16():
    try:
        return load_foundation("vgg16")
    except FoundationModelUnavailable as exc:  # no ImageNet VGG16 weights on this machine
        pytest.skip(str(exc))


def test_both_terms_equal_the_hand_computed_values_with_their_dead_zones():
    # One image, two channels, a 1x2 grid: z'1 = (1, 0), z'2 = (0, 3); f1 = (2, 0), f2 = (1, -1).
    projected = torch.tensor([[1.0, 0.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 2)  # (B, C, h, w)
    features = torch.tensor([[2.0, 0.0], [1.0, -1.0]]).T.reshape(1, 2, 1, 2)
    # cos(z'1, f1) = 1: relu(1 - 0.5 - 1) = 0 (dead zone); cos(z'2, f2) = -1/sqrt2: 0.5 + 1/sqrt2.
    r = 1 / math.sqrt(2)
    assert cosine_term(projected, features).item() == pytest.approx((0 + 0.5 + r) / 2, abs=1e-6)
    assert cosine_term(projected, features, margin=0.0).item() == pytest.approx((0 + 1 + r) / 2, abs=1e-6)
    # Position pairs: cos(z'1, z'2) = 0, cos(f1, f2) = 1/sqrt2; the diagonal agrees (|0| - 0.25: dead).
    assert distance_term(projected, features).item() == pytest.approx(2 * (r - 0.25) / 4, abs=1e-6)
    assert distance_term(projected, features, margin=0.75).item() == 0.0  # |Δ| = 0.707 < 0.75: all dead
    # A point inside both dead zones everywhere: no loss, no gradient.
    p = features.clone().requires_grad_(True)
    (cosine_term(p, features) + distance_term(p, features)).backward()
    assert p.grad.abs().sum() == 0
    # Magnitudes do not matter (cosines), and pairs are taken within each image only.
    assert cosine_term(5 * projected, features).item() == pytest.approx(cosine_term(projected, features).item())
    two = torch.cat([projected, -projected]), torch.cat([features, features])
    assert distance_term(*two).item() == pytest.approx(distance_term(projected, features).item(), abs=1e-6)


def test_the_adaptive_weight_is_the_gradient_norm_ratio_at_the_encoders_last_layer():
    layer = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    x = torch.tensor([1.0, 2.0])
    nll, vf = (layer @ x).pow(2).sum(), (layer @ x).sum() * 3
    vf_loss = VFLoss.__new__(VFLoss)  # the weight needs no foundation model
    vf_loss.cfg = LossConfig(vf_weight=0.1)
    got = vf_loss.weight(nll, vf, layer, None)
    g_nll = torch.autograd.grad(nll, layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf, layer, retain_graph=True)[0]
    assert got.item() == pytest.approx(0.1 * (g_nll.norm() / (g_vf.norm() + 1e-4)).item(), rel=1e-6)
    assert not got.requires_grad
    clamped = vf_loss.weight(nll * 1e6, vf * 1e-12, layer, None)  # ratio ~3e10: the reference's clamp at 1e8
    assert clamped.item() == pytest.approx(0.1 * 1e8)
    vf_loss.cfg = LossConfig(vf_weight=0.1, vf_adaptive=False)
    assert vf_loss.weight(nll, vf, layer, None).item() == pytest.approx(0.1)


def test_foundation_models_give_frozen_features_on_a_16_px_token_grid(dinov2, vgg16):
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    dino = load_foundation(str(dinov2))
    f = dino(x)
    assert f.shape == (2, 16, 2, 3) and not f.requires_grad and not dino.training
    dino.train()
    assert not dino.training and not any(p.requires_grad for p in dino.parameters())
    # The patch tokens, CLS dropped, of the image resized to 4 px (its patch) per token.
    from transformers import Dinov2Model

    net = Dinov2Model.from_pretrained(dinov2).eval()
    normalised = ((x + 1) / 2 - dino.mean) / dino.std
    resized = torch.nn.functional.interpolate(normalised, size=(8, 12), mode="bilinear")
    tokens = net(pixel_values=resized).last_hidden_state
    torch.testing.assert_close(f, tokens[:, 1:].reshape(2, 2, 3, 16).permute(0, 3, 1, 2))
    # VGG16: relu5_3 of the LPIPS backbone's real ImageNet weights, 512 channels at stride 16.
    from codec.evaluation.lpips_weights import backbone_state_dict

    v = vgg16(x)
    assert v.shape == (2, 512, 2, 3) and v.min() >= 0
    assert torch.equal(vgg16.net[28].weight, backbone_state_dict("vgg")[0]["features.28.weight"])
    with pytest.raises(ValueError, match="40x48-px images give no whole token grid .* multiples of 16"):
        vgg16(torch.zeros(1, 3, 40, 48))
    with pytest.raises(ValueError, match="token grid 2x2 .* cannot be matched to the 5x5 latent grid"):
        match_grid(torch.zeros(1, 4, 5, 5), (2, 2))
    assert match_grid(torch.ones(1, 4, 4, 6), (2, 3)).shape == (1, 4, 2, 3)


def test_a_run_with_a_dinov2_resumes_exactly_and_exports_a_plain_autoencoder_kl(tmp_path, image_folder, dinov2,
                                                                                 capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(vf_args(straight, image_folder, dinov2, "max_steps=6")) == 0
    assert main(vf_args(resumed, image_folder, dinov2, "max_steps=3")) == 0
    assert main(vf_args(resumed, image_folder, dinov2, "max_steps=6", "resume=true")) == 0
    a, b = weights(straight / "codec"), weights(resumed / "codec")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The projector: trained (it moved between the checkpoints), resumed exactly, never exported.
    def projector(run, step):
        return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")["projector.weight"]

    assert projector(straight, 6).shape == (16, 4, 1, 1)
    assert not torch.equal(projector(straight, 3), projector(straight, 6))
    assert torch.equal(projector(straight, 6), projector(resumed, 6))
    assert not any("projector" in k for k in a)
    vae = AutoencoderKL.from_pretrained(straight / "codec")  # diffusers loads the export as it is
    assert set(vae.state_dict()) == set(a)
    # Resuming it without the VF loss is refused in one line (not accelerate's missing-key traceback).
    assert main(args(resumed, image_folder, "max_steps=7", "resume=true", "loss.perceptual_weight=0",
                     "loss.disc_weight=0")) == 2
    assert "trained with a VF projector to 16 channels, this run has no VF loss" in capsys.readouterr().err
    log = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert all(e["vf_cos"] >= 0 and e["vf_distance"] >= 0 and e["vf_weight"] > 0 for e in log)


def test_vgg16_fine_tunes_an_existing_codec_offline(tmp_path, image_folder, vgg16):
    torch.manual_seed(0)
    start = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "start")
    out = tmp_path / "run"
    assert main(vf_args(out, image_folder, "vgg16", "max_steps=2", f"model.init_from={start}",
                        "loss.vf_adaptive=false")) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["vf_weight"] for e in log] == [pytest.approx(0.1)] * 2
    assert log[0]["vf_cos"] > 0
    assert not torch.equal(weights(start)["encoder.conv_out.weight"], weights(out / "codec")["encoder.conv_out.weight"])


@pytest.mark.parametrize("extra,pattern", [
    (["loss.vf_model=./no-such-dinov2"], r"cannot load the foundation model './no-such-dinov2'.*loss.vf_model=vgg16"),
    (["data.crop_size=40"], "token grid .* cannot be matched to the 5x5 latent grid of 40-px crops"),
    (["model.kind=mlp-vae"], "model.kind mlp-vae is refused"),
    (["model.train_decoder_only=true"], "trains the encoder"),
    (["loss.equivariance_weight=1"], "use one of them"),
    (["loss.vf_margin_cos=3"], "vf_margin_cos"),
])
def test_settings_that_cannot_work_are_refused(tmp_path, image_folder, capsys, extra, pattern):
    code = 0
    try:
        code = main(vf_args(tmp_path / "r", image_folder, "vgg16", "max_steps=1", *extra))
    except SystemExit as exc:  # a config error: argparse's one line, exit 2
        code = exc.code
    assert_user_error(capsys, code, pattern)


def test_a_distilled_student_is_refused(tmp_path, image_folder, capsys):
    from train.distill import main as distill

    torch.manual_seed(0)
    teacher = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "teacher")
    with pytest.raises(SystemExit) as exc:
        distill(["--set", f"distill.teacher={teacher}", "--set", "distill.student=test", "--set",
                 f"data.train={image_folder}", "--set", f"output_dir={tmp_path / 'r'}", "--set", "loss.vf_weight=0.1"])
    assert_user_error(capsys, exc.value.code, "model.kind autoencoder-tiny is refused")


def test_eval_reports_each_codecs_alignment(tmp_path, capsys, vgg16):
    from codec.cli.parser import main as cli

    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path / "kl")
    data = tmp_path / "images"
    data.mkdir()
    for i, (h, w) in enumerate([(48, 64), (32, 48), (40, 48)]):  # the last has no whole 16-px grid
        Image.fromarray(smooth_image(i, h, w)).save(data / f"img{i}.png")
    out = tmp_path / "out"
    assert cli(["eval", "--codec", str(codec), "--data", str(data), "--out", str(out), "--device", "cpu",
                "--no-classical", "--transforms", "none", "--vf-model", "vgg16", "--crop", "16"]) == 0
    printed = capsys.readouterr().out
    assert "alignment with vgg16" in printed and "left out" in printed
    got = json.loads((out / "metrics.json").read_text())["codecs"][str(codec)]["latents"]["alignment"]
    assert got["model"] == "vgg16" and got["images"] == 2 and got["left_out"] == 1
    # The first image by hand: its posterior mean, projected by least squares onto its features.
    from codec.images import uint8_to_tensor

    vae = AutoencoderKL.from_pretrained(codec)
    terms = []
    for i in (0, 1):
        x = uint8_to_tensor(smooth_image(i, *[(48, 64), (32, 48)][i]))[None]
        f = vgg16(x)
        z = match_grid(vae.encode(x).latent_dist.mean, f.shape[-2:])
        p = fit_projection(z, f)
        terms.append((cosine_term(p, f).item(), distance_term(p, f).item()))
    assert got["cosine_term"] == pytest.approx(sum(t[0] for t in terms) / 2, rel=1e-4)
    assert got["distance_term"] == pytest.approx(sum(t[1] for t in terms) / 2, rel=1e-4, abs=1e-6)
    assert "alignment with vgg16" in (out / "report.html").read_text()


@pytest.mark.slow
def test_two_cpu_processes_train_the_projector_under_ddp(tmp_path, image_folder, vgg16):
    """`accelerate launch` with 2 processes: the projector is part of the DDP-wrapped model."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train",
           *vf_args(out, image_folder, "vgg16", "max_steps=2", "checkpoint_every=1")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    first, last = (load_file(out / "checkpoints" / f"step_{s:08d}" / "model.safetensors")["projector.weight"]
                   for s in (1, 2))
    assert not torch.equal(first, last)
    assert not any("projector" in k for k in weights(out / "codec"))
