"""vae-codec: kl-f8 autoencoders as diffusers-compatible image <-> latent codecs.

The public names are imported when first used (``from codec import Codec``), so that commands
which never touch a model (``vae-codec --help``, ``python -m train --help-config``) start without
loading torch and diffusers.
"""

import importlib

_PUBLIC = {
    "Codec": "codec.codec",
    "ImageLoadError": "codec.images",
    "load_image": "codec.images",
    "LatentDataset": "codec.latents.dataset",
    "PRESETS": "codec.models",
    "build_autoencoder": "codec.models",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'codec' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
