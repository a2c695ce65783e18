"""The vanilla VAE baseline: model, objective, data, trainer, eval / sample / interpolate CLI."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_user_error, shared, smooth_image
from PIL import Image
from safetensors.torch import load_file

from codec import Codec
from codec.baseline.arrays import load_split, read_idx
from codec.baseline.elbo import (
    active_units,
    bits_per_dim,
    elbo_terms,
    importance_weighted_log_likelihood,
    kl_weight,
    training_loss,
)
from codec.baseline.mlp_vae import MLPVAE
from codec.cli import main as cli
from train.__main__ import main as train_main


@pytest.fixture(scope="module")
def mnist_small(tmp_path_factory):
    """The first 600 training and 100 test digits of the real MNIST, as an .npz of the same layout."""
    with np.load(shared("mnist", "mnist.npz")) as d:
        arrays = {"x_train": d["x_train"][:600], "y_train": d["y_train"][:600],
                  "x_test": d["x_test"][:100], "y_test": d["y_test"][:100]}
    path = tmp_path_factory.mktemp("mnist") / "mnist_small.npz"
    np.savez(path, **arrays)
    return path


def train_args(out, data, *extra):
    return [
        str(REPO / "configs" / "mlp-vae-mnist.yaml"),
        "--set", f"output_dir={out}", "--set", f"data.train={data}", "--set", "mlp.hidden_sizes=[64]",
        "--set", "mlp.latent_size=8", "--set", "batch_size=50", "--set", "max_minutes=0",
        "--set", "checkpoint_every=10", "--set", "image_every=10", "--set", "log_every=5",
        "--set", "scale_samples=50", "--set", "optim.schedule=constant",
        *[x for e in extra for x in ("--set", e)],
    ]


# ----------------------------------------------------------------------------- model and codec
def test_saved_as_diffusers_folder_and_used_through_codec(tmp_path):
    torch.manual_seed(0)
    model = MLPVAE(image_size=16, in_channels=3, hidden_sizes=(32,), latent_size=6, likelihood="gaussian")
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["_class_name"] == "MLPVAE"
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    codec = Codec.from_pretrained(tmp_path / "m", device="cpu")
    x = torch.from_numpy(np.stack([smooth_image(i, 16, 16) for i in range(3)]))
    latents = codec.encode(x.numpy())
    assert latents.shape == (3, 6)
    out = codec.decode(latents)
    assert out.shape == (3, 3, 16, 16) and out.abs().max() <= 1
    mean, _ = codec.posterior(x.numpy())
    ref = model.encode(torch.from_numpy(x.numpy()).float().div(127.5).sub(1).movedim(-1, 1)).latent_dist.mean
    torch.testing.assert_close(mean, ref)
    with pytest.raises(ValueError, match=r"latents must be \(B, 6\)"):
        codec.decode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="takes 16x16 images"):
        codec.encode(np.zeros((32, 32, 3), np.uint8))


def test_conditional_model_needs_labels():
    model = MLPVAE(hidden_sizes=(16,), latent_size=4, num_classes=10)
    z = torch.randn(3, 4)
    assert model.decode(z, labels=torch.tensor([0, 5, 9])).sample.shape == (3, 1, 28, 28)
    a = model.decode(z, labels=torch.tensor([0, 0, 0])).sample
    b = model.decode(z, labels=torch.tensor([1, 1, 1])).sample
    assert not torch.allclose(a, b)  # the label reaches the decoder
    with pytest.raises(ValueError, match="needs labels"):
        model.decode(z)
    with pytest.raises(ValueError, match=r"integers in \[0, 10\)"):
        model.decode(z, labels=torch.tensor([0, 1, 10]))


# ----------------------------------------------------------------------------- objective
def test_closed_form_kl_matches_torch_distributions():
    torch.manual_seed(0)
    model = MLPVAE(hidden_sizes=(16,), latent_size=5)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    terms = elbo_terms(model, x)
    q = terms["posterior"]
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(terms["kl"], ref, rtol=1e-5, atol=1e-5)


def test_importance_weighting_tightens_the_bound():
    torch.manual_seed(0)
    model = MLPVAE(hidden_sizes=(32,), latent_size=4)
    x = (torch.rand(8, 1, 28, 28) > 0.7).float() * 2 - 1
    gen = torch.Generator().manual_seed(0)
    elbo = torch.stack([-(lambda t: t["rec"] + t["kl"])(elbo_terms(model, x)) for _ in range(200)]).mean(0)
    ll1 = importance_weighted_log_likelihood(model, x, k=1000, chunk=300, generator=gen)
    assert torch.all(ll1 > elbo)  # log p(x) >= E[ELBO]
    # k = 1 is the ELBO itself (one sample): its average over many draws agrees with it.
    one = torch.stack([importance_weighted_log_likelihood(model, x, k=1, generator=gen) for _ in range(200)]).mean(0)
    torch.testing.assert_close(one, elbo, rtol=0.02, atol=2.0)


def test_annealing_schedules():
    assert kl_weight(0, 2.0, "none", 100) == 2.0
    assert kl_weight(25, 2.0, "linear", 100) == 0.5 and kl_weight(100, 2.0, "linear", 100) == 2.0
    # 4 cycles over 100 steps, rising during the first half of each
    steps = (0, 6, 12, 20, 25, 31)
    assert [kl_weight(s, 1.0, "cyclical", 100, 4, 0.5) for s in steps] == [0.0, 0.48, 0.96, 1.0, 0.0, 0.48]
    with pytest.raises(ValueError, match="unknown 'cosine'"):
        kl_weight(0, 1.0, "cosine", 10)


def test_free_bits_stop_pushing_small_kl():
    kl_per_dim = torch.tensor([[0.01, 2.0], [0.03, 4.0]], requires_grad=True)
    terms = {"rec": torch.zeros(2), "kl": kl_per_dim.sum(1), "kl_per_dim": kl_per_dim}
    loss, logs = training_loss(terms, 1.0, free_bits=0.5)
    loss.backward()
    assert kl_per_dim.grad[:, 0].abs().sum() == 0 and kl_per_dim.grad[:, 1].abs().sum() > 0
    assert loss.item() == pytest.approx(0.5 + 3.0)
    assert logs["kl"] == pytest.approx(3.02)


def test_active_units_find_collapsed_dimensions():
    means = torch.randn(500, 4)
    means[:, 1] = 0.001 * torch.randn(500)  # collapsed: the posterior ignores x
    count, variance = active_units(means)
    assert count == 3 and variance[1] < 0.01
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- data
def test_idx_files_as_fashion_mnist_ships_them(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    def header(code, shape):
        return bytes([0, 0, code, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape)

    for split in ("train", "t10k"):
        images_file = tmp_path / f"{split}-images-idx3-ubyte.gz"
        images_file.write_bytes(gzip.compress(header(8, images.shape) + images.tobytes()))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(header(8, labels.shape) + labels.tobytes())
    x, y = load_split(tmp_path, "test")
    assert np.array_equal(x, images) and y.tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_real_fashion_mnist_idx_files():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not (folder / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{folder} is absent (apt-get install dataset-fashion-mnist)")
    x, y = load_split(folder, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10  # the official test split: 1000 per class


def test_npz_split_and_missing_keys(tmp_path, mnist_small):
    x, y = load_split(mnist_small, "train")
    assert x.shape == (600, 28, 28) and x.dtype == np.uint8 and y.shape == (600,)
    np.savez(tmp_path / "bad.npz", x_train=x)
    with pytest.raises(ValueError, match=r"missing array\(s\) \['y_train'\]"):
        load_split(tmp_path / "bad.npz", "train")
    with pytest.raises(ValueError, match="torchvision:MNIST"):
        load_split("torchvision:CIFAR10", "train")


# ----------------------------------------------------------------------------- the commands
def test_train_eval_sample_interpolate_on_mnist(tmp_path, mnist_small, capsys):
    run = tmp_path / "run"
    assert train_main(train_args(run, mnist_small, "max_steps=100", "optim.lr=3e-3", "ema_decay=0")) == 0
    codec_dir = run / "codec"
    assert json.loads((codec_dir / "config.json").read_text())["_class_name"] == "MLPVAE"
    assert (run / "checkpoints" / "step_00000100" / "COMPLETE").exists()

    out = tmp_path / "eval"
    assert cli(["eval", "--codec", str(codec_dir), "--data", str(mnist_small), "--nll-samples", "200",
                "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 100 and report["binarized_test_set"] is True
    assert report["elbo_nats"] < report["log_likelihood_nats"] < 0
    assert report["log_likelihood_nats"] > -400  # it learned something: an untrained model is ~ -545
    assert report["bits_per_dim"] == pytest.approx(-report["log_likelihood_nats"] / (784 * math.log(2)))
    assert 0 < report["active_units"] <= 8
    for name in ("samples", "interpolation", "reconstructions"):
        assert Image.open(out / f"{name}.png").size[0] > 28
    # Every figure comes from the seed: a second eval gives the same numbers (the ELBO's posterior
    # sample included), another seed other ones.
    for seed, same in (("0", True), ("1", False)):
        again = tmp_path / f"eval-{seed}"
        assert cli(["eval", "--codec", str(codec_dir), "--data", str(mnist_small), "--nll-samples", "200",
                    "--out", str(again), "--seed", seed]) == 0
        other = json.loads((again / "metrics.json").read_text())
        assert (other["elbo_nats"] == report["elbo_nats"]) is same
        assert (other["log_likelihood_nats"] == report["log_likelihood_nats"]) is same

    with np.load(mnist_small) as d:
        Image.fromarray(d["x_test"][0]).save(tmp_path / "a.png")
        Image.fromarray(d["x_test"][1]).save(tmp_path / "b.png")
    assert cli(["sample", "--codec", str(codec_dir), "--num", "64", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (8 * 30 + 2, 8 * 30 + 2)  # 8x8 grid, 2-px padding
    assert cli(["interpolate", "--codec", str(codec_dir), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                "--steps", "10", str(tmp_path / "i.png")]) == 0
    row = np.asarray(Image.open(tmp_path / "i.png").convert("L"), dtype=float)
    assert row.shape == (32, 10 * 30 + 2)
    # The ends are the codec's own reconstructions of a and b (posterior means), in that order.
    codec = Codec.from_pretrained(codec_dir, device="cpu")
    for tile, name in ((row[2:30, 2:30], "a.png"), (row[2:30, -30:-2], "b.png")):
        rec = codec.reconstruct(np.asarray(Image.open(tmp_path / name).convert("RGB")))
        expected = rec[0, 0].clamp(-1, 1).add(1).mul(127.5).numpy()
        assert np.abs(tile - expected).max() <= 1.0
    # export / encode / decode treat it like any codec
    assert cli(["export", str(run), str(tmp_path / "exported")]) == 0
    assert MLPVAE.from_pretrained(tmp_path / "exported").config.latent_size == 8
    assert cli(["encode", "--codec", str(codec_dir), str(tmp_path / "a.png"), str(tmp_path / "a.safetensors")]) == 0
    assert load_file(tmp_path / "a.safetensors")["latents"].shape == (1, 8)
    assert cli(["decode", "--codec", str(codec_dir), str(tmp_path / "a.safetensors"), str(tmp_path / "a2.png")]) == 0
    decoded = np.asarray(Image.open(tmp_path / "a2.png").convert("L"), dtype=float)
    assert decoded.shape == (28, 28) and np.abs(decoded - row[2:30, 2:30]).max() <= 1.0  # = the row's first tile

    capsys.readouterr()
    assert cli(["eval", "--codec", str(codec_dir), "--data", str(mnist_small), "--nll-samples", "10",
                "--out", str(out), "--codec", str(codec_dir)]) == 2
    assert "one --codec" in capsys.readouterr().err


def test_mlp_resume_continues_exactly(tmp_path, mnist_small):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_main(train_args(straight, mnist_small, "max_steps=20")) == 0
    assert train_main(train_args(resumed, mnist_small, "max_steps=10")) == 0
    assert train_main(train_args(resumed, mnist_small, "max_steps=20", "resume=true")) == 0
    a = load_file(straight / "codec" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "codec" / "diffusion_pytorch_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_conditional_vae_samples_the_asked_class(tmp_path, mnist_small):
    run = tmp_path / "cvae"
    assert train_main(train_args(run, mnist_small, "max_steps=20", "mlp.conditional=true",
                                 "mlp.kl_anneal=cyclical", "mlp.kl_anneal_steps=20", "mlp.free_bits=0.1",
                                 "mlp.binarize=false")) == 0  # Bernoulli on grey levels
    model = MLPVAE.from_pretrained(run / "codec")
    assert model.config.num_classes == 10
    three = str(tmp_path / "three.png")
    assert cli(["sample", "--codec", str(run / "codec"), "--num", "8", "--label", "3", three]) == 0
    assert cli(["sample", "--codec", str(run / "codec"), "--num", "8", str(tmp_path / "x.png")]) == 2  # no label
    out = tmp_path / "eval"
    assert cli(["eval", "--codec", str(run / "codec"), "--data", str(mnist_small), "--nll-samples", "20",
                "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["conditional"] is True and report["binarized_test_set"] is False
    assert any("not a normalised density" in n for n in report["notes"])


def test_trains_on_photo_crops_like_kl_f8(tmp_path, image_folder, capsys):
    run = tmp_path / "photos"
    assert train_main([
        str(REPO / "configs" / "mlp-vae-photos.yaml"), "--set", f"output_dir={run}",
        "--set", f"data.train={image_folder}", "--set", "mlp.image_size=32", "--set", "mlp.hidden_sizes=[32]",
        "--set", "mlp.latent_size=8", "--set", "batch_size=4", "--set", "max_steps=6", "--set", "max_minutes=0",
        "--set", "data.num_workers=0", "--set", "scale_samples=4", "--set", "image_every=3",
        "--set", f"data.val={image_folder}", "--set", "data.val_crop=32", "--set", "val_every=3",
    ]) == 0
    assert "validation: psnr" in capsys.readouterr().out  # the kl-f8 validation path, PSNR/SSIM/LPIPS
    codec = Codec.from_pretrained(run / "codec", device="cpu")
    x = torch.from_numpy(smooth_image(0, 32, 32))
    assert codec.reconstruct(x.numpy()).shape == (1, 3, 32, 32)
    assert (run / "samples" / "train_00000003.png").exists()


def test_kl_f8_options_are_refused_for_the_mlp(tmp_path, mnist_small, image_folder, capsys):
    with pytest.raises(SystemExit):
        train_main(train_args(tmp_path / "r", mnist_small, "loss.disc_weight=0.5"))
    assert "['loss.disc_weight'] apply to kl-f8 only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(train_args(tmp_path / "r", mnist_small, f"data.val={image_folder}"))
    assert "set data.val_crop=28" in capsys.readouterr().err
    code = train_main(train_args(tmp_path / "r", image_folder, "mlp.conditional=true"))
    assert_user_error(capsys, code, "needs labelled data")


def test_nll_samples_refused_for_kl_f8(tmp_path, test_codec, image_folder, capsys):
    test_codec.save_pretrained(tmp_path / "kl")
    assert cli(["eval", "--codec", str(tmp_path / "kl"), "--data", str(image_folder), "--nll-samples", "10",
                "--out", str(tmp_path / "e")]) == 2
    assert "MLP VAE codecs only" in capsys.readouterr().err
    assert cli(["sample", "--codec", str(tmp_path / "kl"), "--num", "4", "--size", "32", str(tmp_path / "k.png")]) == 0
    assert Image.open(tmp_path / "k.png").size == (2 * 34 + 2, 2 * 34 + 2)
