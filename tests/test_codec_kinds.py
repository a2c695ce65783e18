"""Every codec kind through every command: it works (checked on its output) or is refused up front
with a clear message; never a traceback, never garbage."""

import json

import pytest
import torch
from conftest import smooth_image
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from codec import Codec
from codec.baseline.mlp_vae import MLPVAE
from codec.cli import main
from codec.models import PRESETS, build_autoencoder, build_student

KINDS = {
    "kl-f8": lambda: build_autoencoder("test"),
    # the SD3 / FLUX.1 layout: 16 channels, no quant convs, a shift
    "kl-f8-16ch": lambda: AutoencoderKL(**{**PRESETS["test"], "latent_channels": 16, "use_quant_conv": False,
                                           "use_post_quant_conv": False, "shift_factor": 0.1}),
    "autoencoder-tiny": lambda: build_student("test"),
    "mlp-vae": lambda: MLPVAE(image_size=28, in_channels=1, hidden_sizes=(32,), latent_size=16),
}
# (command, the words of its refusal) for each kind that cannot serve a command
REFUSED = {
    ("autoencoder-tiny", "scale-per-channel"): "AutoencoderTiny: its diffusers config has no latents_mean",
    ("autoencoder-tiny", "export-single-file"): "single-file (CompVis/LDM layout) export needs an AutoencoderKL",
    ("mlp-vae", "export-single-file"): "single-file (CompVis/LDM layout) export needs an AutoencoderKL",
    ("mlp-vae", "compress"): "is the MLP VAE baseline: compress writes spatial latent shards",
}


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])  # an exception here (a traceback for the user) fails the test
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_command_works_or_refuses_up_front(kind, tmp_path, capsys):
    torch.manual_seed(0)
    codec_dir = Codec(KINDS[kind](), device="cpu").save_pretrained(tmp_path / "codec")
    side = 28 if kind == "mlp-vae" else 32
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(smooth_image(i, side, side)).save(images / f"i{i}.png")
    w = tmp_path / "work"

    def expect(name: str, *argv) -> bool:
        rc, err = run(capsys, *argv)
        if (kind, name) in REFUSED:
            assert rc == 2 and REFUSED[(kind, name)] in err, (name, err)
            return False
        assert rc == 0, (name, err)
        return True

    # encode / decode: the decoded image has the image's size, and equals the codec's own round trip
    expect("encode", "encode", "--codec", codec_dir, images / "i0.png", w / "l.safetensors")
    expect("decode", "decode", "--codec", codec_dir, w / "l.safetensors", w / "d.png")
    assert Image.open(w / "d.png").size == (side, side)
    # compress -> verify -> decompress: every image back
    if expect("compress", "compress", "--codec", codec_dir, "--input", images, "--output", w / "lat",
              "--num-workers", "0", "--no-progress"):
        assert expect("verify", "verify", w / "lat")
        assert expect("decompress", "decompress", w / "lat", w / "rec")
        assert sorted(p.name for p in (w / "rec").iterdir()) == [f"i{i}.png" for i in range(5)]
    else:
        assert not (w / "lat").exists()  # refused before writing anything
    # scale, plain and per channel; the codec then decodes its own new latents, and not its old ones
    for name, extra in (("scale", []), ("scale-per-channel", ["--per-channel"])):
        before = json.loads((codec_dir / "config.json").read_text())
        if expect(name, "scale", "--codec", codec_dir, "--input", images, "--num-workers", "0", *extra):
            after = json.loads((codec_dir / "config.json").read_text())
            assert after != before
            expect("encode", "encode", "--codec", codec_dir, images / "i1.png", w / f"{name}.safetensors")
            latents = load_file(w / f"{name}.safetensors")["latents"]
            assert latents.ndim == (2 if kind == "mlp-vae" else 4)  # per-channel keeps the shape
            expect("decode", "decode", "--codec", codec_dir, w / f"{name}.safetensors", w / f"{name}.png")
            assert Image.open(w / f"{name}.png").size == (side, side)
        else:
            assert json.loads((codec_dir / "config.json").read_text()) == before
    rc, err = run(capsys, "decode", "--codec", codec_dir, w / "l.safetensors", w / "old.png")
    assert rc == 2 and "not in the latent space of" in err  # made before `scale` changed the factors
    # export, folder (with re-measured factors) and single file
    expect("export", "export", codec_dir, w / "exp", "--data", images, "--samples", "4")
    assert Codec.from_pretrained(w / "exp", device="cpu").latent_space["encoder_sha256"] == \
        Codec.from_pretrained(codec_dir, device="cpu").latent_space["encoder_sha256"]
    if not expect("export-single-file", "export", codec_dir, w / "exp.safetensors", "--format", "single-file"):
        assert not (w / "exp.safetensors").exists()
    # eval gives numbers
    expect("eval", "eval", "--codec", codec_dir, "--data", images, "--out", w / "ev", "--no-classical")
    assert any((w / "ev").iterdir())


def test_scale_takes_the_native_size_of_a_fixed_size_codec(tmp_path, capsys):
    codec_dir = Codec(KINDS["mlp-vae"](), device="cpu").save_pretrained(tmp_path / "mlp")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(smooth_image(0, 40, 40)).save(images / "a.png")  # resized to 28 for measuring
    rc, _ = run(capsys, "scale", "--codec", codec_dir, "--input", images, "--num-workers", "0")
    assert rc == 0
    rc, err = run(capsys, "scale", "--codec", codec_dir, "--input", images, "--resolution", "32")
    assert rc == 2 and "takes 28x28 images only" in err


def test_a_distilled_student_keeps_its_teachers_factors(tmp_path, capsys):
    student = Codec(build_student("test"), device="cpu",
                    meta={"latent_stats": {"teacher": "runs/tiny/codec", "teacher_space": {}}})
    folder = student.save_pretrained(tmp_path / "student")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(smooth_image(0, 32, 32)).save(images / "a.png")
    rc, err = run(capsys, "scale", "--codec", folder, "--input", images, "--num-workers", "0")
    assert rc == 2 and "student distilled from runs/tiny/codec" in err


def test_our_exports_load_without_diffusers_config_warnings(tmp_path, capsys, caplog):
    for kind in ("kl-f8", "autoencoder-tiny", "mlp-vae"):
        folder = Codec(KINDS[kind](), device="cpu").save_pretrained(tmp_path / kind)
        capsys.readouterr()
        caplog.clear()
        Codec.from_pretrained(folder, device="cpu")
        said = capsys.readouterr().err + caplog.text
        assert "are not expected" not in said, (kind, said)


def test_exports_and_latents_are_readable_by_other_users(tmp_path, capsys):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        folder = Codec(KINDS["kl-f8"](), device="cpu").save_pretrained(tmp_path / "codec")
        Image.fromarray(smooth_image(0, 32, 32)).save(tmp_path / "a.png")
        assert main(["encode", "--codec", str(folder), str(tmp_path / "a.png"), str(tmp_path / "a.safetensors")]) == 0
        assert main(["export", str(folder), str(tmp_path / "one.safetensors"), "--format", "single-file"]) == 0
        files = [*folder.iterdir(), tmp_path / "a.safetensors", tmp_path / "one.safetensors"]
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        assert set(modes.values()) == {0o644}, modes  # diffusers' weights were 0600
    finally:
        os.umask(umask)
