"""16-channel codecs in the SD3/FLUX.1 layout: presets, model.latent_channels, training from
scratch with scale and shift measured, and the refusals."""

import json

import pytest
import torch
from conftest import assert_user_error
from diffusers import AutoencoderKL
from test_train import args

from codec import Codec
from codec.models import PRESETS, build_autoencoder
from train.__main__ import main


@pytest.mark.parametrize("preset,factors", [("sd3-f8c16", (1.5305, 0.0609)), ("flux-f8c16", (0.3611, 0.1159))])
def test_full_size_presets_are_the_sd3_and_flux_vaes(preset, factors):
    config = PRESETS[preset]
    assert config["latent_channels"] == 16 and not config["use_quant_conv"] and not config["use_post_quant_conv"]
    assert (config["scaling_factor"], config["shift_factor"]) == factors
    assert config["block_out_channels"] == (128, 256, 512, 512) and config["layers_per_block"] == 2


def test_tiny_c16_trains_from_scratch_and_exports_scale_and_shift(tmp_path, image_folder):
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=2", "model.preset=tiny-c16", "loss.disc_weight=0",
                     "loss.perceptual_weight=0")) == 0
    config = json.loads((out / "codec" / "config.json").read_text())
    assert config["latent_channels"] == 16 and config["use_quant_conv"] is False
    stats = json.loads((out / "codec" / "vae_codec.json").read_text())["latent_stats"]
    assert config["shift_factor"] == pytest.approx(stats["mean"]) and config["shift_factor"] != 0
    assert config["scaling_factor"] == pytest.approx(stats["scaling_factor"])
    vae = AutoencoderKL.from_pretrained(out / "codec")  # diffusers' own loader
    assert vae.quant_conv is None and vae.config.latent_channels == 16
    latents = Codec.from_pretrained(out / "codec", device="cpu").encode(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert latents.shape == (1, 16, 4, 4)


def test_latent_channels_widens_any_preset(tmp_path, image_folder):
    assert build_autoencoder("test", latent_channels=16).config.latent_channels == 16
    out = tmp_path / "run"
    assert main(args(out, image_folder, "max_steps=1", "model.latent_channels=16", "loss.disc_weight=0",
                     "loss.perceptual_weight=0")) == 0
    assert json.loads((out / "codec" / "config.json").read_text())["latent_channels"] == 16


def test_init_from_a_16_channel_codec_with_4_channels_asked_is_refused(tmp_path, image_folder, capsys):
    folder = tmp_path / "c16"
    build_autoencoder("tiny-c16").save_pretrained(folder)
    code = main(args(tmp_path / "run", image_folder, "max_steps=1", f"model.init_from={folder}",
                     "model.latent_channels=4"))
    assert_user_error(capsys, code, "has 16 latent channels, model.latent_channels asks for 4")


def test_sixteen_channel_single_files_round_trip_through_diffusers(tmp_path):
    """Export in the FLUX.1 ae / SD3 key layout (no quant convs); diffusers' own single-file
    loader gives the same weights, and our codec the same latents."""
    from codec.cli import main as cli

    torch.manual_seed(0)
    codec = Codec(build_autoencoder("tiny-c16"), device="cpu")
    codec.set_factors(0.3611, 0.1159)
    folder = codec.save_pretrained(tmp_path / "codec")
    single = tmp_path / "ae.safetensors"
    assert cli(["export", str(folder), str(single), "--format", "single-file"]) == 0
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if "quant" in k] and f.get_slice("decoder.conv_in.weight").get_shape()[1] == 16
    theirs = AutoencoderKL.from_single_file(str(single), config=str(folder))
    for k, v in AutoencoderKL.from_pretrained(folder).state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mode()
    assert torch.allclose(Codec.from_pretrained(single, device="cpu").encode(x), (z - 0.1159) * 0.3611, atol=1e-6)


@pytest.mark.parametrize("prefix,factors,whose", [("", (0.3611, 0.1159), "FLUX.1's"),
                                                  ("first_stage_model.", (1.5305, 0.0609), "SD3's")])
def test_a_foreign_16_channel_file_gets_flux_or_sd3_factors_said(tmp_path, capsys, prefix, factors, whose):
    from safetensors.torch import save_file

    from codec.single_file import diffusers_to_ldm, load_single_file

    torch.manual_seed(2)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=16,
                        use_quant_conv=False, use_post_quant_conv=False,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    path = tmp_path / "vae.safetensors"
    save_file({prefix + k: v for k, v in diffusers_to_ldm(vae.state_dict(), 3).items()}, str(path))
    loaded, meta = load_single_file(path)
    err = capsys.readouterr().err
    assert f"(16 latent channels), scaling_factor assumed {factors[0]}, shift_factor {factors[1]} ({whose})" in err
    assert (loaded.config.scaling_factor, loaded.config.shift_factor) == factors
    assert loaded.quant_conv is None and meta["config_inferred"]
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.fixture
def c16_codec(tmp_path):
    """A test-sized codec in the SD3/FLUX.1 layout (16 channels, no quant convs) with scale and shift."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**PRESETS["test"], "latent_channels": 16, "use_quant_conv": False,
                           "use_post_quant_conv": False})
    codec = Codec(vae, device="cpu")
    codec.set_factors(0.9, 0.05)
    return codec.save_pretrained(tmp_path / "c16")


def test_exact_tiling_of_a_16_channel_codec_gives_the_untiled_numbers(c16_codec):
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = Codec.from_pretrained(c16_codec, device="cpu")
    tiled = Codec.from_pretrained(c16_codec, device="cpu", tile_size=64, tile_method="exact")
    latents = whole.encode(x)
    assert latents.shape == (1, 16, 12, 16)
    assert torch.allclose(tiled.encode(x), latents, atol=1e-5)
    assert torch.allclose(tiled.decode(latents), whole.decode(latents), atol=1e-5)


def test_compress_and_latent_diffusion_on_16_channel_latents(c16_codec, image_folder, tmp_path):
    from conftest import REPO

    from codec.cli import main as cli
    from train.ldm import main as ldm

    latents = tmp_path / "latents"
    assert cli(["compress", "--codec", str(c16_codec), "--input", str(image_folder), "--output", str(latents),
                "--resolution", "32", "--num-workers", "0", "--no-progress"]) == 0
    sets = ["model.block_out_channels=[16,32]", "model.norm_num_groups=8", "model.attention_levels=1",
            f"output_dir={tmp_path / 'ldm'}", f"data.latents={latents}", "batch_size=4", "sample_steps=2",
            "num_samples=2", "sample_every=0", "checkpoint_every=2", "max_steps=2"]
    assert ldm([str(REPO / "configs" / "ldm-tiny.yaml"), *[x for s in sets for x in ("--set", s)]]) == 0
    unet = json.loads((tmp_path / "ldm" / "pipeline" / "unet" / "config.json").read_text())
    assert unet["in_channels"] == unet["out_channels"] == 16
    assert (tmp_path / "ldm" / "samples" / "step_00000002.png").exists()  # decoded by the 16-channel codec


def test_a_16_channel_teacher_distils_a_16_channel_student(c16_codec, image_folder, tmp_path, capsys):
    from test_distill import args as distill_args

    from codec.models import build_student
    from train.distill import main as distill

    out = tmp_path / "student"
    assert distill(distill_args(out, image_folder, c16_codec, "max_steps=1", "loss.perceptual_weight=0")) == 0
    config = json.loads((out / "codec" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["latent_channels"] == 16
    four = tmp_path / "four"
    build_student("test", latent_channels=4).save_pretrained(four)
    code = distill(distill_args(tmp_path / "bad", image_folder, c16_codec, "max_steps=1", f"model.init_from={four}"))
    assert_user_error(capsys, code, "latent channels")


def test_fine_tuning_a_16_channel_codec_remeasures_its_scale_and_shift(c16_codec, image_folder, tmp_path):
    """model.init_from an SD3/FLUX.1-layout folder (as diffusers saves those VAEs): the fine-tune keeps
    16 channels and no quant convs, and measures a new scale and shift."""
    out = tmp_path / "ft"
    assert main(args(out, image_folder, "max_steps=1", f"model.init_from={c16_codec}", "loss.disc_weight=0",
                     "loss.perceptual_weight=0")) == 0
    config = json.loads((out / "codec" / "config.json").read_text())
    assert config["latent_channels"] == 16 and config["use_post_quant_conv"] is False
    stats = json.loads((out / "codec" / "vae_codec.json").read_text())["latent_stats"]
    assert config["shift_factor"] == pytest.approx(stats["mean"]) and config["shift_factor"] != 0.05
