"""Single-file checkpoints in the CompVis/LDM layout: export, diffusers' own loader, foreign
files (no config: architecture from shapes), and training from one (model.init_from)."""

import json

import pytest
import torch
from conftest import REPO, smooth_image
from diffusers import AutoencoderKL
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from codec import Codec
from codec.cli import main
from codec.models import build_autoencoder
from codec.single_file import diffusers_to_ldm, load_single_file
from train.__main__ import main as train_main


@pytest.fixture
def codec_dir(tmp_path):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(0.4321, 0.05)
    return codec.save_pretrained(tmp_path / "codec", meta={"note": "kept"})


def test_folder_to_single_file_to_folder_is_exact(codec_dir, tmp_path, capsys):
    single = tmp_path / "vae.safetensors"
    assert main(["export", str(codec_dir), str(single), "--format", "single-file"]) == 0
    with safe_open(str(single), "pt") as f:
        keys = set(f.keys())
    # The CompVis/LDM names UIs expect, attention as 1x1 convolutions.
    assert {"encoder.down.0.block.0.norm1.weight", "decoder.up.3.upsample.conv.weight",
            "encoder.mid.attn_1.q.weight", "decoder.mid.block_2.conv2.bias",
            "quant_conv.weight", "encoder.norm_out.weight"} <= keys
    assert not any("down_blocks" in k or "to_q" in k for k in keys)
    assert load_file(single)["encoder.mid.attn_1.q.weight"].ndim == 4
    # the test preset is not what UIs build: export says so, naming what differs
    err = capsys.readouterr().err
    assert "ComfyUI and A1111 will not load" in err and "block_out_channels=[8, 8, 16, 16]" in err

    back = tmp_path / "back"
    assert main(["export", str(single), str(back)]) == 0  # single file -> diffusers folder
    a = load_file(codec_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(back / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg_a = json.loads((codec_dir / "config.json").read_text())
    cfg_b = json.loads((back / "config.json").read_text())
    assert {k: v for k, v in cfg_a.items() if not k.startswith("_")} == {
        k: v for k, v in cfg_b.items() if not k.startswith("_")}
    assert cfg_b["scaling_factor"] == 0.4321 and cfg_b["shift_factor"] == 0.05
    assert json.loads((back / "vae_codec.json").read_text())["note"] == "kept"


@pytest.mark.parametrize("preset,loadable", [("sd-kl-f8", True), ("sd3-f8c16", True), ("flux-f8c16", True),
                                             ("small", False), ("tiny", False), ("tiny-c16", False), ("test", False)])
def test_which_presets_ui_loaders_can_build(preset, loadable):
    from codec.models import PRESETS
    from codec.single_file import ui_incompatibility

    assert (ui_incompatibility(PRESETS[preset]) is None) == loadable


def test_diffusers_reads_our_single_file(codec_dir, tmp_path):
    """The other side: diffusers' own single-file loader gives the same weights."""
    single = tmp_path / "vae.safetensors"
    assert main(["export", str(codec_dir), str(single), "--format", "single-file"]) == 0
    # config= a local folder keeps diffusers off the hub.
    theirs = AutoencoderKL.from_single_file(str(single), config=str(codec_dir))
    ours = AutoencoderKL.from_pretrained(codec_dir)
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    codec = Codec.from_pretrained(single, device="cpu")
    assert codec.scaling_factor == 0.4321
    with torch.no_grad():
        z = theirs.encode(x).latent_dist.mode()
    assert torch.allclose(codec.encode(x), (z - 0.05) * 0.4321, atol=1e-6)


def foreign_vae():
    """An SD-style VAE (32 groups, as LDM's Normalize) with other widths and depth."""
    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=32, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def test_foreign_single_file_architecture_from_shapes(tmp_path, capsys):
    vae = foreign_vae()
    ldm = diffusers_to_ldm(vae.state_dict(), 3)
    # Like a full SD checkpoint: prefixed keys and no config in the header.
    path = tmp_path / "sd.safetensors"
    extra = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(2, 3, 4, 4),
             "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}  # a full SD file
    save_file({**{f"first_stage_model.{k}": v for k, v in ldm.items()},
               **{f"first_stage_model.{k}" if k.startswith("loss") else k: v for k, v in extra.items()}},
              str(path))
    loaded, meta = load_single_file(path)
    err = capsys.readouterr().err
    assert "scaling_factor assumed 0.18215" in err and "ignored 2 training-only tensor(s)" in err
    assert meta["ignored_training_tensors"] == 2
    assert meta["config_inferred"] and loaded.config.scaling_factor == 0.18215
    assert list(loaded.config.block_out_channels) == [32, 32, 64]
    assert loaded.config.layers_per_block == 2
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    broken = tmp_path / "broken.safetensors"
    save_file({**ldm, "encoder.extra.weight": torch.zeros(1)}, str(broken))
    with pytest.raises(ValueError, match="broken.safetensors.*encoder.extra.weight"):
        load_single_file(broken)
    assert main(["export", str(tmp_path / "missing.safetensors"), str(tmp_path / "o")]) == 2


def test_training_starts_from_a_single_file(tmp_path):
    vae = foreign_vae()
    path = tmp_path / "sd.safetensors"
    save_file(diffusers_to_ldm(vae.state_dict(), 3), str(path))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.fromarray(smooth_image(i, 40, 40)).save(images / f"{i}.png")
    out = tmp_path / "run"
    argv = [str(REPO / "configs" / "tiny.yaml"), *[x for s in (
        f"model.init_from={path}", f"output_dir={out}", f"data.train={images}", "data.crop_size=32",
        "batch_size=2", "data.num_workers=0", "max_steps=1", "scale_samples=2", "ema_decay=0",
        "image_every=0", "mixed_precision=no", "optim.warmup_steps=0",
    ) for x in ("--set", s)]]
    assert train_main(argv) == 0
    trained = AutoencoderKL.from_pretrained(out / "codec")
    assert list(trained.config.block_out_channels) == [32, 32, 64]
    drift = {k: (trained.state_dict()[k] - v).abs().max().item() for k, v in vae.state_dict().items()}
    assert max(drift.values()) > 0  # it trained...
    assert max(drift.values()) < 0.01  # ...one Adam step (lr 5e-4) away from the file's weights


def test_single_file_export_of_a_codec_without_an_ldm_layout_is_refused(tmp_path, capsys):
    from codec.models import build_student

    tiny = Codec(build_student("test"), device="cpu").save_pretrained(tmp_path / "student")
    out = tmp_path / "student.safetensors"
    assert main(["export", str(tiny), str(out), "--format", "single-file"]) == 2  # was an AttributeError
    err = capsys.readouterr().err
    assert "needs an AutoencoderKL; this codec's class is AutoencoderTiny" in err and "--format diffusers" in err
    assert not out.exists()
