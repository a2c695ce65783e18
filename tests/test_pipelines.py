"""Our codec inside diffusers pipelines, built offline from tiny random components.

The other side proves interop: diffusers loads the exported folder with
``AutoencoderKL.from_pretrained``, and the pipelines' own scaling, decoding and encoding give
the numbers ``Codec`` gives.
"""

import json

import numpy as np
import pytest
import torch
from conftest import REPO, smooth_image
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from codec import Codec
from train.__main__ import main as train_main

transformers = pytest.importorskip("transformers", reason="pipelines extra: pip install -e .[pipelines]")

SIZE = 64
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def trained_codec_dir(tmp_path_factory, request):
    """A codec trained here (3 steps, "test" preset) and exported by the training run."""
    images = tmp_path_factory.mktemp("images")
    for i in range(4):
        Image.fromarray(smooth_image(i, 48, 48)).save(images / f"{i}.png")
    out = tmp_path_factory.mktemp("run")
    argv = [str(REPO / "configs" / "tiny.yaml"), *[x for s in (
        "model.preset=test", f"output_dir={out}", f"data.train={images}", "data.crop_size=32",
        "batch_size=2", "data.num_workers=0", "max_steps=3", "scale_samples=4", "ema_decay=0",
        "image_every=0", "mixed_precision=no",
    ) for x in ("--set", s)]]
    assert train_main(argv) == 0
    meta = json.loads((out / "codec" / "vae_codec.json").read_text())
    assert meta["step"] == 3 and meta["latent_stats"]["scaling_factor"] != 1.0
    return out / "codec"


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer from a character vocabulary written here (no hub)."""
    chars = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )


def components(tmp_path, vae):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 8,
        in_channels=4, out_channels=4, cross_attention_dim=32, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=16,
    ))
    return dict(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tiny_tokenizer(tmp_path),
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_text_to_image_decodes_like_codec(trained_codec_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(trained_codec_dir)  # diffusers' loader, not ours
    pipe = StableDiffusionPipeline(**components(tmp_path, vae)).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, height=SIZE, width=SIZE + 16, num_inference_steps=2, guidance_scale=2.0)

    images = pipe(**call, generator=gen(), output_type="np").images
    assert images.shape == (1, SIZE, SIZE + 16, 3) and np.isfinite(images).all()

    latents = pipe(**call, generator=gen(), output_type="latent").images
    decoded = pipe(**call, generator=gen(), output_type="pt").images
    codec = Codec.from_pretrained(trained_codec_dir, device="cpu")
    assert codec.scaling_factor == vae.config.scaling_factor != 1.0
    ours = (codec.decode(latents) / 2 + 0.5).clamp(0, 1)  # the pipeline's postprocess
    assert torch.equal(ours, decoded)
    # A different scaling factor would decode differently: the comparison can fail.
    codec.set_factors(codec.scaling_factor * 2)
    assert not torch.allclose((codec.decode(latents) / 2 + 0.5).clamp(0, 1), decoded, atol=1e-3)


def test_img2img_encodes_like_codec(trained_codec_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(trained_codec_dir)
    pipe = StableDiffusionImg2ImgPipeline(**components(tmp_path, vae)).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    photo = Image.fromarray(smooth_image(5, SIZE, SIZE + 16))

    out = pipe(PROMPT, image=photo, strength=0.5, num_inference_steps=4, generator=gen(),
               output_type="np").images
    assert out.shape == (1, SIZE, SIZE + 16, 3) and np.isfinite(out).all()

    # The pipeline's own preprocessing + encoding: a posterior *sample* scaled by the factor,
    # then noised to the start timestep, all from one generator.
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[2:3]
    x = pipe.image_processor.preprocess(photo)
    with torch.no_grad():  # as inside pipe.__call__
        theirs = pipe.prepare_latents(x, t, 1, 1, torch.float32, torch.device("cpu"), gen(7))

    codec = Codec.from_pretrained(trained_codec_dir, device="cpu")
    g = gen(7)
    ours = codec.encode(photo, sample=True, generator=g)
    noise = randn_tensor(ours.shape, generator=g, dtype=ours.dtype)
    # Equal up to float rounding: the pipeline's preprocessed tensor has another memory layout
    # (batch stride) than ours, and oneDNN's convolutions round differently (~2e-6 here).
    assert torch.allclose(pipe.scheduler.add_noise(ours, noise, t), theirs, atol=2e-5, rtol=0)
    assert not torch.allclose(pipe.scheduler.add_noise(codec.encode(photo), noise, t), theirs, atol=1e-2)
    # ...and the deterministic encoding is the posterior mode diffusers returns with "argmax".
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    with torch.no_grad():
        mode = retrieve_latents(vae.encode(x), sample_mode="argmax") * vae.config.scaling_factor
    assert torch.allclose(codec.encode(photo), mode, atol=2e-5, rtol=0)
