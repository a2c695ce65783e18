import pytest
import torch
from conftest import smooth_image
from diffusers import AutoencoderKL
from PIL import Image

from codec import Codec
from codec.models import PRESETS, build_autoencoder, count_parameters


def test_sd_preset_is_the_stable_diffusion_vae():
    vae = build_autoencoder("sd-kl-f8")
    assert count_parameters(vae) == 83_653_863  # the published 83.65 M
    assert list(vae.config.block_out_channels) == [128, 256, 512, 512]
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    with pytest.raises(ValueError, match="choose from"):
        build_autoencoder("kl-f16")
    assert {"sd-kl-f8", "small", "tiny"} <= set(PRESETS)


def test_encode_shapes_scaling_and_determinism(test_codec):
    x = torch.rand(3, 3, 32, 48) * 2 - 1
    test_codec.set_factors(0.5, 0.1)
    lat = test_codec.encode(x)
    assert lat.shape == (3, 4, 4, 6)
    mean, _ = test_codec.posterior(x)
    torch.testing.assert_close(lat, (mean - 0.1) * 0.5)
    assert torch.equal(lat, test_codec.encode(x))  # posterior mean by default
    a = test_codec.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = test_codec.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    c = test_codec.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batching_does_not_change_results(test_codec):
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    big = Codec(test_codec.vae, device="cpu", batch_size=16)
    torch.testing.assert_close(test_codec.encode(x), big.encode(x), atol=1e-6, rtol=1e-5)


def test_input_kinds_agree(test_codec):
    arr = smooth_image(0, 16, 24)
    t = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = test_codec.encode(t)
    torch.testing.assert_close(test_codec.encode(arr), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(test_codec.encode(Image.fromarray(arr)), ref, atol=1e-6, rtol=0)
    assert test_codec.decode(ref, output_type="pil")[0].size == (24, 16)


def test_sizes_not_multiple_of_8(test_codec):
    x = torch.rand(1, 3, 20, 30) * 2 - 1
    with pytest.raises(ValueError, match="multiple of 8.*pad=True"):
        test_codec.encode(x)
    lat = test_codec.encode(x, pad=True)
    assert lat.shape == (1, 4, 3, 4)
    assert test_codec.decode(lat, size=(20, 30)).shape == (1, 3, 20, 30)
    assert test_codec.reconstruct(x, pad=True).shape == x.shape


def test_bf16_close_to_fp32(test_codec):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    low = Codec(build_autoencoder("test").requires_grad_(False), device="cpu", dtype="bf16")
    low.vae.load_state_dict(test_codec.vae.state_dict())
    ref, got = test_codec.encode(x), low.encode(x)
    assert got.dtype == torch.float32
    assert (ref - got).abs().max() < 0.05 * ref.abs().max() + 1e-3
    with pytest.raises(ValueError, match="choose from"):
        Codec(test_codec.vae, dtype="int8")


def test_diffusers_loads_export_and_reproduces_numbers(test_codec, tmp_path):
    test_codec.set_factors(0.37)
    test_codec.save_pretrained(tmp_path / "c", meta={"note": "test"})
    assert (tmp_path / "c" / "diffusion_pytorch_model.safetensors").exists()
    vae = AutoencoderKL.from_pretrained(tmp_path / "c").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        theirs_img = vae.decode(theirs / vae.config.scaling_factor).sample
    ours = test_codec.encode(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(test_codec.decode(ours), theirs_img, atol=1e-5, rtol=0)
    again = Codec.from_pretrained(tmp_path / "c", device="cpu")
    assert again.scaling_factor == pytest.approx(0.37) and again.meta["note"] == "test"


def test_measure_factors_gives_unit_variance(test_codec):
    batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(3)]
    f = test_codec.measure_factors(batches, generator=torch.Generator().manual_seed(0))
    test_codec.set_factors(f["scaling_factor"])
    gen = torch.Generator().manual_seed(1)
    lat = torch.cat([test_codec.encode(b, sample=True, generator=gen) for b in batches])
    assert f["num_images"] == 12
    assert 0.9 < lat.std().item() < 1.1  # scaled posterior samples have unit variance
    assert f["scaling_factor"] == pytest.approx(1 / f["std"])


def test_decode_rejects_wrong_latents(test_codec):
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        test_codec.decode(torch.zeros(1, 3, 4, 4))


def test_autoencoder_tiny_folders_are_codecs(tmp_path):
    """A TAESD-style student: deterministic latents (a point posterior), loaded by class name,
    tiles blended with a warning, and compressed latents with a zero spread."""
    from codec.cli import main as cli
    from codec.latents.dataset import LatentDataset
    from codec.models import build_student

    torch.manual_seed(0)
    folder = tmp_path / "student"
    build_student("test").save_pretrained(folder)
    codec = Codec.from_pretrained(folder, device="cpu")
    assert type(codec.vae).__name__ == "AutoencoderTiny"
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    mean, logvar = codec.posterior(x)
    assert torch.isneginf(logvar).all()
    assert torch.equal(codec.encode(x, sample=True), codec.encode(x))
    with torch.no_grad():  # by hand with diffusers: scaling 1, shift 0 leave the latents as they are
        assert torch.allclose(mean, codec.vae.encode(x).latents, atol=1e-6)
    tiled = Codec.from_pretrained(folder, device="cpu", tile_size=32)
    with pytest.warns(RuntimeWarning, match="no GroupNorm"):
        y = tiled.decode(codec.encode(x))
    assert y.shape == (2, 3, 64, 96) and torch.isfinite(y).all()

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(smooth_image(i, 32, 32)).save(images / f"{i}.png")
    out = tmp_path / "latents"
    assert cli(["compress", "--codec", str(folder), "--input", str(images), "--output", str(out),
                "--store", "mean_std", "--num-workers", "0"]) == 0
    item = LatentDataset(out)[0]
    assert torch.equal(item["std"], torch.zeros_like(item["std"]))
