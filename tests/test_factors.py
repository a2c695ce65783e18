"""scaling_factor, shift_factor and latents_mean/latents_std, pinned against the diffusers
pipelines that use each convention (SDXL: per-channel statistics; SD3: shift; SD 1.x:
scaling only, in test_pipelines.py). Pipelines are built offline from tiny random parts and
fed prompt embeddings directly (no text encoders)."""

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor

from codec import Codec
from codec.factors import scale_latents, scale_std, unscale_latents
from codec.models import build_autoencoder

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
NO_TEXT = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)


def codec_with(**factors):
    torch.manual_seed(0)
    codec = Codec(build_autoencoder("test"), device="cpu")
    codec.set_factors(**factors)
    return codec


def gen(seed):
    return torch.Generator().manual_seed(seed)


def decoded_by_pipeline(pipe, call):
    """The pipeline's latents and its own decoding of them, from one seed."""
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**call, generator=gen(0), output_type="latent").images
    images = pipe(**call, generator=gen(0), output_type="pt").images
    return latents, images


def test_latents_mean_std_like_sdxl():
    codec = codec_with(scaling_factor=0.7, latents_mean=MEAN, latents_std=STD)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    )
    parts = dict(vae=codec.vae, unet=unet, scheduler=EulerDiscreteScheduler(), **NO_TEXT)
    call = dict(prompt_embeds=torch.randn(1, 5, 64), pooled_prompt_embeds=torch.randn(1, 32),
                height=32, width=32, num_inference_steps=2, guidance_scale=1.0)
    latents, images = decoded_by_pipeline(StableDiffusionXLPipeline(**parts), call)
    assert torch.equal((codec.decode(latents) / 2 + 0.5).clamp(0, 1), images)

    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = StableDiffusionXLImg2ImgPipeline(**parts).prepare_latents(
            x, None, 1, 1, torch.float32, torch.device("cpu"), gen(3), add_noise=False)
    assert torch.equal(codec.encode(x, sample=True, generator=gen(3)), theirs)
    # Per channel: channel 1 (std 0.5) is spread 4x wider than channel 2 (std 2.0).
    plain = codec_with(scaling_factor=0.7).encode(x)
    ours = codec.encode(x)
    assert torch.allclose(ours[:, 1], (plain[:, 1] - 0.7 * MEAN[1]) / STD[1], atol=1e-5)


def test_shift_factor_like_sd3():
    codec = codec_with(scaling_factor=0.7, shift_factor=0.2)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=32, pooled_projection_dim=64,
    )
    parts = dict(vae=codec.vae, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                 text_encoder_3=None, tokenizer_3=None, **NO_TEXT)
    call = dict(prompt_embeds=torch.randn(1, 5, 32), pooled_prompt_embeds=torch.randn(1, 64),
                height=32, width=32, num_inference_steps=2, guidance_scale=1.0)
    latents, images = decoded_by_pipeline(StableDiffusion3Pipeline(**parts), call)
    assert torch.equal((codec.decode(latents) / 2 + 0.5).clamp(0, 1), images)

    img2img = StableDiffusion3Img2ImgPipeline(**parts)
    img2img.scheduler.set_timesteps(4)
    t = img2img.scheduler.timesteps[1:2]
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        theirs = img2img.prepare_latents(x, t, 1, 1, torch.float32, torch.device("cpu"), gen(3))
    g = gen(3)
    ours = codec.encode(x, sample=True, generator=g)
    assert torch.equal(img2img.scheduler.scale_noise(ours, t, randn_tensor(ours.shape, generator=g)), theirs)


def test_factor_functions_invert_and_refuse_ambiguity():
    z = torch.randn(2, 4, 3, 3)
    for config in ({"scaling_factor": 0.5}, {"scaling_factor": 0.5, "shift_factor": 0.3},
                   {"scaling_factor": 0.5, "latents_mean": MEAN, "latents_std": STD}):
        assert torch.allclose(unscale_latents(scale_latents(z, config), config), z, atol=1e-6)
    # A posterior std scales like a latent difference (compress --store mean_std).
    config = {"scaling_factor": 0.5, "latents_mean": MEAN, "latents_std": STD}
    std = torch.rand(2, 4, 3, 3)
    assert torch.allclose(scale_std(std, config), scale_latents(z + std, config) - scale_latents(z, config), atol=1e-6)
    with pytest.raises(ValueError, match="both latents_mean/latents_std and shift_factor"):
        scale_latents(z, dict(config, shift_factor=0.1))
    with pytest.raises(ValueError, match="only one of"):
        scale_latents(z, {"scaling_factor": 0.5, "latents_mean": MEAN})
    with pytest.raises(ValueError, match="4 values for 3 latent channels"):
        scale_latents(z[:, :3], config)


def test_scale_per_channel_writes_latents_mean_std(image_folder, tmp_path, capsys):
    from codec.cli import main as cli
    from codec.images import list_images, load_image
    from codec.latents.inputs import fit

    target = codec_with(scaling_factor=5.0).save_pretrained(tmp_path / "codec")
    assert cli(["scale", "--codec", str(target), "--input", str(image_folder), "--resolution", "32",
                "--per-channel", "--num-workers", "0"]) == 0
    assert "latents_mean [" in capsys.readouterr().out
    codec = Codec.from_pretrained(target, device="cpu")
    config = codec.vae.config
    assert config.scaling_factor == 1.0 and config.shift_factor is None
    assert len(config.latents_mean) == len(config.latents_std) == 4
    x = torch.stack([fit(load_image(f), 32)[0] for f in list_images(image_folder)]).float() / 127.5 - 1
    raw = codec.posterior(x)[0]
    mean, std = (torch.tensor(v).view(1, 4, 1, 1) for v in (config.latents_mean, config.latents_std))
    assert torch.allclose(codec.encode(x), (raw - mean) / std, atol=1e-5)
    # On the images it was measured on, posterior samples come out about N(0, 1) per channel.
    z = codec.encode(x, sample=True, generator=gen(1))
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.2 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.2
    assert cli(["scale", "--codec", str(target), "--input", str(image_folder), "--per-channel",
                "--shift", "--num-workers", "0"]) == 2
