"""vae-codec: kl-f8 autoencoders as diffusers-compatible image <-> latent codecs."""

from codec.codec import Codec
from codec.images import ImageLoadError, load_image
from codec.latents.dataset import LatentDataset
from codec.models import PRESETS, build_autoencoder

__all__ = ["Codec", "ImageLoadError", "LatentDataset", "PRESETS", "build_autoencoder", "load_image"]
