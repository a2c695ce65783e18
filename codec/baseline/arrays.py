"""Small labelled image datasets as arrays: MNIST ``.npz``, Fashion-MNIST idx files, torchvision.

Sources (``load_split(source, split)``):

* ``path/to/mnist.npz`` with ``x_train`` / ``y_train`` / ``x_test`` / ``y_test`` (the Keras layout,
  as in ``../shared/data/mnist``);
* a folder with the four idx files of MNIST or Fashion-MNIST (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``), as Debian's ``dataset-fashion-mnist`` installs;
* ``torchvision:MNIST`` / ``torchvision:FashionMNIST`` (downloaded by torchvision into
  ``$VAE_CODEC_DATA`` or ``~/.cache/vae-codec``; needs internet the first time).

Returns uint8 images (N, H, W) and int64 labels (N,).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


def is_array_source(source: str | os.PathLike) -> bool:
    s = str(source)
    idx_folder = Path(s).is_dir() and _idx_file(Path(s), "train", "images") is not None
    return s.endswith(".npz") or s.startswith("torchvision:") or idx_folder


def load_split(source: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    s = str(source)
    if s.startswith("torchvision:"):
        return _torchvision(s.split(":", 1)[1], split)
    path = Path(s)
    if not path.exists():
        raise FileNotFoundError(f"data source {path} does not exist")
    if path.suffix == ".npz":
        return _npz(path, split)
    if path.is_dir():
        return _idx_folder(path, split)
    raise ValueError(f"{path}: not an .npz file, an idx folder or torchvision:NAME")


def _npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        keys = (f"x_{split}", f"y_{split}")
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; found {sorted(data.files)}")
        x, y = data[keys[0]], data[keys[1]]
    return _check(x, y, path)


def _idx_file(folder: Path, split: str, kind: str) -> Path | None:
    stem = f"{_IDX_PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """The idx format of LeCun's MNIST files: zero bytes, a dtype code, the rank, big-endian sizes."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    dtype = np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder(">")
    body = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * rank)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def _idx_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _idx_file(folder, split, "images"), _idx_file(folder, split, "labels")
    if images is None or labels is None:
        raise FileNotFoundError(
            f"{folder}: no {_IDX_PREFIX[split]}-images-idx3-ubyte[.gz] / {_IDX_PREFIX[split]}-labels-idx1-ubyte[.gz]"
        )
    return _check(read_idx(images), read_idx(labels), folder)


def _torchvision(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    import torchvision.datasets as tvd

    if name not in ("MNIST", "FashionMNIST", "KMNIST"):
        raise ValueError(f"torchvision:{name}: choose torchvision:MNIST, torchvision:FashionMNIST "
                         "or torchvision:KMNIST")
    root = os.environ.get("VAE_CODEC_DATA", str(Path.home() / ".cache" / "vae-codec"))
    ds = getattr(tvd, name)(root, train=split == "train", download=True)
    return _check(ds.data.numpy(), ds.targets.numpy(), f"torchvision:{name}")


def _check(x: np.ndarray, y: np.ndarray, where) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (N, H, W), got {x.dtype} {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{where}: {x.shape[0]} images but labels of shape {y.shape}")
    return x, y.astype(np.int64)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) in [-1, 1], the convention of ``codec.images``."""
    return torch.from_numpy(x).float().div_(127.5).sub_(1.0)[:, None]


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stochastic binarisation (each pixel is 1 with probability its grey level), in [-1, 1]."""
    p = (x + 1) / 2
    return torch.bernoulli(p, generator=generator) * 2 - 1
