"""GPU checks, in one command: ``pytest -m gpu`` (skipped where there is no CUDA device).

What only a GPU run can show: bf16 and fp16 training with the discriminator on from step 0,
gradient clipping and EMA, killed at a checkpoint and resumed (the resumed EMA must live on the
GPU, and fp16 loss scaling must survive the resume); ``channels_last`` inputs; ``compress`` and
tiled decoding on the device. Throughput figures are ``scripts/gpu_check.py``.
"""

import json

import pytest
import torch
from conftest import smooth_image
from PIL import Image
from safetensors.torch import load_file

from codec import Codec
from codec.cli import main as cli
from codec.models import build_autoencoder

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (pytest -m gpu needs one)")]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(16):
        Image.fromarray(smooth_image(i, 80, 96)).save(folder / f"{i:02d}.png")
    return folder


def train(out, images, *sets) -> int:
    from train.__main__ import main as train_main

    base = ["model.preset=test", f"output_dir={out}", f"data.train={images}", "data.crop_size=64", "batch_size=4",
            "data.num_workers=0", "loss.perceptual_weight=0", "loss.disc_weight=0.5", "loss.disc_start=0",
            "optim.max_grad_norm=1.0", "ema_decay=0.9", "checkpoint_every=2", "image_every=0", "val_every=0",
            "scale_samples=4", "log_every=1"]
    return train_main([arg for s in (*base, *sets) for arg in ("--set", s)])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_gan_clipping_ema_kill_and_resume(tmp_path, images, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    assert train(tmp_path / "whole", images, f"mixed_precision={precision}", "max_steps=4") == 0
    assert train(tmp_path / "cut", images, f"mixed_precision={precision}", "max_steps=2") == 0  # "killed" at 2
    assert train(tmp_path / "cut", images, f"mixed_precision={precision}", "max_steps=4", "resume=true") == 0
    logs = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in logs) and "d_loss" in logs[-1]
    whole, resumed = (load_file(tmp_path / d / "codec" / "diffusion_pytorch_model.safetensors")
                      for d in ("whole", "cut"))
    for key in whole:  # the resumed run is the uninterrupted one, up to the GPU's rounding and atomics
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-3, rtol=1e-3, msg=key)


def test_training_inputs_are_channels_last_on_gpu():
    from train.autoencoder.config import load_config
    from train.autoencoder.recipes.klf8 import KLF8Recipe

    x = KLF8Recipe(load_config(None, [])).inputs({"pixels": torch.rand(2, 3, 16, 16)}, torch.device("cuda"))
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)


def test_tiled_decode_and_compress_on_gpu(tmp_path, images):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cuda")
    z = torch.randn(1, 4, 40, 48)
    plain = codec.decode(z)
    tiled = Codec(codec.vae, device="cuda", tile_size=128)
    torch.testing.assert_close(tiled.decode(z), plain, atol=1e-3, rtol=0)  # exact tiling on the device
    folder = codec.save_pretrained(tmp_path / "codec")
    out = tmp_path / "latents"
    assert cli(["compress", "--codec", str(folder), "--input", str(images), "--output", str(out),
                "--device", "cuda", "--dtype", "fp16", "--resolution", "64", "--num-workers", "0"]) == 0
    assert cli(["verify", str(out)]) == 0
