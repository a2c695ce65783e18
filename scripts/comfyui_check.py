"""Load a single-file VAE we exported with ComfyUI's own VAE loader (what its "Load VAE" node
calls) and compare its decode and encode with diffusers on the same codec's folder.

Not part of the test suite: it needs a ComfyUI checkout. BENCHMARKS.md ("16-channel codecs in a
UI") has the figures; to repeat them:

  # a 16-channel codec in the FLUX.1 layout, as a folder and as one file
  python -c "import torch; from codec import Codec; from codec.models import build_autoencoder; \
      torch.manual_seed(0); Codec(build_autoencoder('flux-f8c16'), device='cpu').save_pretrained('/tmp/c16/folder')"
  vae-codec export /tmp/c16/folder /tmp/c16/vae_c16.safetensors --format single-file
  # ComfyUI's code (e.g. git archive of Comfy-Org/ComfyUI) in /tmp/comfyui, plus einops
  pip install --no-deps --target /tmp/comfy-deps einops
  PYTHONPATH=/tmp/comfyui:/tmp/comfy-deps python scripts/comfyui_check.py /tmp/c16/vae_c16.safetensors /tmp/c16/folder
"""
import logging
import sys

SF, FOLDER = sys.argv[1], sys.argv[2]
sys.argv = ["comfy_check", "--cpu", "--fp32-vae"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()  # otherwise comfy.cli_args ignores sys.argv
import comfy.cli_args  # noqa: E402
import comfy.latent_formats  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)


print("cpu_state:", mm.cpu_state, "args.cpu:", comfy.cli_args.args.cpu)

# a. ComfyUI's loader (exactly what nodes.VAELoader.load_vae does), forced float32
sd = comfy.utils.load_torch_file(SF)
print("state dict tensors:", len(sd),
      "| has quant_conv:", any(k.startswith("quant_conv") for k in sd),
      "| has post_quant_conv:", any(k.startswith("post_quant_conv") for k in sd))
sd_keys = set(sd.keys())
logging.getLogger().setLevel(logging.DEBUG)  # show ComfyUI's "Missing/Leftover VAE keys" lines
vae = comfy.sd.VAE(sd=sd, dtype=torch.float32)
logging.getLogger().setLevel(logging.INFO)
vae.throw_exception_if_invalid()

# b. What ComfyUI detected
fsm = vae.first_stage_model
model_keys = set(fsm.state_dict().keys())
print("latent_channels:", vae.latent_channels)
print("first_stage_model class:", type(fsm).__module__ + "." + type(fsm).__name__)
print("  encoder:", type(fsm.encoder).__module__ + "." + type(fsm.encoder).__name__,
      "| decoder:", type(fsm.decoder).__module__ + "." + type(fsm.decoder).__name__)
if hasattr(fsm, "regularization"):
    reg = fsm.regularization
    print("  regularization:", type(reg).__name__, "sample=", getattr(reg, "sample", None))
print("  decoder.conv_in in_channels:", fsm.decoder.conv_in.in_channels,
      "| encoder.conv_out out_channels:", fsm.encoder.conv_out.out_channels)
print("  downscale/upscale ratio:", vae.downscale_ratio, vae.upscale_ratio)
print("vae_dtype:", vae.vae_dtype, "| device:", vae.device)
print("missing keys (model not in file):", sorted(model_keys - sd_keys))
print("unexpected keys (file not in model):", sorted(sd_keys - model_keys))
fl = comfy.latent_formats.Flux()
print("ComfyUI Flux latent_format: channels=%d scale_factor=%s shift_factor=%s"
      % (fl.latent_channels, fl.scale_factor, fl.shift_factor))

# diffusers reference
from diffusers import AutoencoderKL  # noqa: E402

dvae = AutoencoderKL.from_pretrained(FOLDER, torch_dtype=torch.float32).eval()
print("diffusers config: latent_channels=%d scaling_factor=%s shift_factor=%s"
      % (dvae.config.latent_channels, dvae.config.scaling_factor, dvae.config.shift_factor))

# weight-level check: diffusers weights converted back through ComfyUI's own converter
from comfy import diffusers_convert  # noqa: E402

dconv = diffusers_convert.convert_vae_state_dict(
    {k: v for k, v in dvae.state_dict().items()})
csd = fsm.state_dict()
wdiff = max((csd[k].float() - dconv[k].float().reshape(csd[k].shape)).abs().max().item()
            for k in csd if k in dconv)
print("weights: %d/%d comfy keys present in converted diffusers sd, max abs diff %.3g"
      % (sum(k in dconv for k in csd), len(csd), wdiff))

# c. decode
z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    img_c = vae.decode(z)  # (B,H,W,C) in [0,1]
    img_d = dvae.decode(z).sample
    img_d = (img_d / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
print("decode: comfy", tuple(img_c.shape), img_c.dtype, "| diffusers", tuple(img_d.shape))
print("decode max abs diff: %.3e" % (img_c - img_d).abs().max().item())
with torch.no_grad():  # also pre-clamp, straight through ComfyUI's model vs diffusers
    raw_c = fsm.decode(z)
    raw_d = dvae.decode(z).sample
print("decode pre-clamp max abs diff: %.3e (|x| max %.3f, frac clamped %.3f)"
      % ((raw_c - raw_d).abs().max().item(), raw_d.abs().max().item(), (raw_d.abs() > 1).float().mean().item()))

# d. encode
x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # in [0,1], NCHW
with torch.no_grad():
    lat_c = vae.encode(x.permute(0, 2, 3, 1))  # comfy wants (B,H,W,C) in [0,1]
    lat_d = dvae.encode(x * 2 - 1).latent_dist.mean
print("encode: comfy", tuple(lat_c.shape), "| diffusers mean", tuple(lat_d.shape))
print("encode max abs diff (vs posterior mean): %.3e" % (lat_c - lat_d).abs().max().item())
print("latent stats: comfy mean %.4f std %.4f" % (lat_c.mean().item(), lat_c.std().item()))

del vae  # avoid ModelPatcher.__del__ noise at interpreter shutdown
