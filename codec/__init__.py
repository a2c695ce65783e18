"""vae-codec: kl-f8 autoencoders as diffusers-compatible image <-> latent codecs."""

from .codec import Codec
from .images import ImageLoadError, load_image
from .latent_dataset import LatentDataset
from .models import PRESETS, build_autoencoder

__all__ = ["Codec", "ImageLoadError", "LatentDataset", "PRESETS", "build_autoencoder", "load_image"]
