"""Latents carry their codec's latent space; decode refuses latents of another one (--force to insist)."""

import json

import pytest
import torch
from conftest import smooth_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from codec import Codec
from codec.cli import main
from codec.latent_space import LatentSpaceMismatch
from codec.latents_file import read_latents
from codec.models import build_autoencoder


def save_codec(path, seed=0, **factors):
    torch.manual_seed(seed)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(**factors)
    return codec.save_pretrained(path)


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_image(3, 32, 40)).save(path)
    return path


def encode(codec, photo, out):
    assert main(["encode", "--codec", str(codec), str(photo), str(out)]) == 0
    return out


def test_latents_of_another_per_channel_codec_are_refused_naming_both(tmp_path, photo, capsys):
    # The case: two per-channel codecs, both scaling 1.0 (was: no message, 14.96 dB).
    a = save_codec(tmp_path / "a", seed=0, scaling_factor=1.0, latents_mean=[0.1] * 4, latents_std=[2.0] * 4)
    b = save_codec(tmp_path / "b", seed=1, scaling_factor=1.0, latents_mean=[0.2] * 4, latents_std=[3.0] * 4)
    lat = encode(a, photo, tmp_path / "a.safetensors")
    capsys.readouterr()
    assert main(["decode", "--codec", str(b), str(lat), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(a) in err and str(b) in err and "encoder weights" in err and "latents_mean" in err
    assert "--force" in err and not (tmp_path / "x.png").exists()
    assert main(["decode", "--codec", str(b), "--force", str(lat), str(tmp_path / "x.png")]) == 0
    assert "decoding anyway (--force)" in capsys.readouterr().err and (tmp_path / "x.png").exists()
    assert main(["decode", "--codec", str(a), str(lat), str(tmp_path / "a.png")]) == 0  # its own: fine


def test_same_weights_other_shift_is_refused(tmp_path, photo, capsys):
    plain = save_codec(tmp_path / "plain", scaling_factor=0.5)
    shifted = save_codec(tmp_path / "shifted", scaling_factor=0.5, shift_factor=1.5)
    lat = encode(plain, photo, tmp_path / "p.safetensors")
    capsys.readouterr()
    assert main(["decode", "--codec", str(shifted), str(lat), str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "shift_factor 0 vs 1.5" in err and "encoder weights" not in err


def test_a_decoder_only_fine_tune_decodes_the_original_latents(tmp_path, photo):
    # SD's ft-MSE VAE is the model: same encoder, retrained decoder, the same latents.
    original = save_codec(tmp_path / "orig", scaling_factor=0.5)
    tuned = Codec.from_pretrained(original, device="cpu")
    with torch.no_grad():
        for p in tuned.vae.decoder.parameters():
            p.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    lat = encode(original, photo, tmp_path / "o.safetensors")
    assert main(["decode", "--codec", str(tmp_path / "tuned"), str(lat), str(tmp_path / "t.png")]) == 0


def test_latents_without_or_with_malformed_space_metadata(tmp_path, photo, capsys):
    folder = save_codec(tmp_path / "c", scaling_factor=0.5)
    codec = Codec.from_pretrained(folder, device="cpu")
    x = torch.from_numpy(smooth_image(3, 32, 40)).permute(2, 0, 1)[None] / 127.5 - 1
    bare = tmp_path / "bare.safetensors"
    save_file({"latents": codec.encode(x).contiguous()}, str(bare), metadata={"scaling_factor": "0.5"})
    assert main(["decode", "--codec", str(folder), str(bare), str(tmp_path / "x.png")]) == 2
    assert "do not say which codec made them" in capsys.readouterr().err
    assert main(["decode", "--codec", str(folder), "--force", str(bare), str(tmp_path / "x.png")]) == 0
    lat = encode(folder, photo, tmp_path / "ok.safetensors")
    with safe_open(str(lat), "pt") as f:
        meta, z = f.metadata(), f.get_tensor("latents")
    for broken in ("{not json", json.dumps({"encoder_sha256": "ab"}), json.dumps([1, 2])):
        save_file({"latents": z}, str(tmp_path / "bad.safetensors"), metadata={**meta, "latent_space": broken})
        capsys.readouterr()
        assert main(["decode", "--codec", str(folder), str(tmp_path / "bad.safetensors"), str(tmp_path / "y.png")]) == 2
        assert "malformed latent_space metadata" in capsys.readouterr().err


def test_codec_decode_checks_a_recorded_space(tmp_path, photo):
    a = Codec.from_pretrained(save_codec(tmp_path / "a", seed=0, scaling_factor=0.5), device="cpu")
    b = Codec.from_pretrained(save_codec(tmp_path / "b", seed=1, scaling_factor=0.5), device="cpu")
    lat = read_latents(encode(tmp_path / "a", photo, tmp_path / "a.safetensors"))
    assert lat.space == a.latent_space and lat.size == (32, 40)
    assert a.decode(lat.latents, check=lat.space).shape == (1, 3, 32, 40)
    with pytest.raises(LatentSpaceMismatch, match="encoder weights"):
        b.decode(lat.latents, check=lat.space)
    # Half precision hashes the weights as saved: the same space in fp16.
    half = Codec.from_pretrained(tmp_path / "a", device="cpu", dtype="bf16")
    assert half.latent_space["encoder_sha256"] == a.latent_space["encoder_sha256"]
