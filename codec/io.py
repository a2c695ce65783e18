"""Reading a codec's files: the one place that knows where config and metadata live.

A codec is a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, plus
our ``vae_codec.json`` metadata), a pipeline folder with ``vae/``, or a single CompVis/LDM-layout
``.safetensors`` whose header carries the metadata. Loading the weights is
:func:`codec.models.load_autoencoder`; this module answers the questions asked before or beside
that: what is the config, what is the metadata, is it the vanilla MLP VAE or an AutoencoderTiny.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from codec.single_file import META_KEY, is_single_file, read_header

CONFIG_FILE = "config.json"
META_FILE = "vae_codec.json"
MLP_CLASS = "MLPVAE"  # config.json "_class_name" of the vanilla VAE baseline (codec.baseline)
TINY_CLASS = "AutoencoderTiny"  # TAESD-style preview codecs (train.distill students)


class CodecLoadError(ValueError):
    """A codec folder that is missing files or holds malformed ones (the message names them)."""


def read_json(path: str | os.PathLike, kind: type[ValueError] = ValueError):
    """Parse a JSON file, raising ``kind`` (a ValueError) naming the file when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise kind(f"{path}: not valid JSON ({exc})") from exc


def config_folder(path: str | os.PathLike) -> Path | None:
    """The local folder holding the model's ``config.json`` (``vae/`` of a pipeline), or None
    for a single file or a hub id."""
    local = Path(path)
    if is_single_file(local) or not local.is_dir():
        return None
    if not (local / CONFIG_FILE).exists() and (local / "vae" / CONFIG_FILE).exists():
        return local / "vae"
    return local


def read_config(path: str | os.PathLike) -> dict | None:
    """A local codec folder's ``config.json`` (None where there is none to read)."""
    folder = config_folder(path)
    if folder is None or not (folder / CONFIG_FILE).exists():
        return None
    return read_json(folder / CONFIG_FILE, CodecLoadError)


def read_metadata(path: str | os.PathLike) -> dict:
    """Our metadata (training config, latent statistics, provenance) of a codec; {} if none."""
    if is_single_file(path):
        return json.loads(read_header(path).get(META_KEY, "{}"))
    folder = config_folder(path)
    for candidate in ([folder, Path(path)] if folder is not None else []):
        if (candidate / META_FILE).exists():
            return read_json(candidate / META_FILE, CodecLoadError)
    return {}


def is_mlp_vae(source) -> bool:
    """Whether ``source`` (a codec path, a loaded model or a config) is the vanilla MLP VAE
    rather than a convolutional kl-f8 autoencoder: the one test every caller uses."""
    if isinstance(source, (str, os.PathLike)):
        config = read_config(source)
        return config is not None and config.get("_class_name") == MLP_CLASS
    if isinstance(source, dict):  # a config.json (diffusers' FrozenDict is a dict too)
        return source.get("_class_name") == MLP_CLASS
    from codec.baseline.mlp_vae import MLPVAE  # late: the baseline imports the core, not back

    return isinstance(source, MLPVAE)


def is_autoencoder_tiny(source) -> bool:
    """Whether ``source`` (a codec path, a loaded model or a config) is a diffusers
    ``AutoencoderTiny``: deterministic latents (no posterior), no GroupNorm, no exact tiling."""
    if isinstance(source, (str, os.PathLike)):
        config = read_config(source)
        return config is not None and config.get("_class_name") == TINY_CLASS
    if isinstance(source, dict):
        return source.get("_class_name") == TINY_CLASS
    return type(source).__name__ == TINY_CLASS


def readable_by_all(folder: str | os.PathLike) -> None:
    """Give the files under ``folder`` the mode a new file gets (0644 under the usual umask):
    safetensors' ``save_file`` (diffusers' ``save_pretrained``) creates 0600 weights, which
    other users of a shared model folder cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)
