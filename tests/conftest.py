"""Shared fixtures: generated images, the shared real data (skipped when absent), tiny codecs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (it ships beside the checkout on dev machines and CI)")
    return path


def smooth_image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A uint8 (H, W, 3) image with smooth structure (gradients + blobs), like a photo crop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        img[..., c] = 0.5 + 0.25 * np.sin(6 * f * xx + a) * np.cos(5 * f * yy + b)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """12 generated PNG/JPEG images of mixed sizes, one in a subfolder."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(12):
        arr = smooth_image(i, 40 + 8 * (i % 3), 48 + 8 * (i % 2))
        target = folder / "sub" if i == 0 else folder
        Image.fromarray(arr).save(target / f"img{i:02d}.{'jpg' if i % 2 else 'png'}")
    return folder


@pytest.fixture
def test_codec():
    from codec import Codec
    from codec.models import build_autoencoder

    torch.manual_seed(0)
    return Codec(build_autoencoder("test"), device="cpu", batch_size=2)


def assert_user_error(capsys, code: int, pattern: str) -> None:
    """A command's one-line user error: exit 2, the message matching ``pattern``, no traceback."""
    import re

    err = capsys.readouterr().err
    assert code == 2 and re.search(pattern, err) and "Traceback" not in err, (code, err)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that pin torch to one thread (for a fixed summation order) must not leave later
    tests running with it: results compared across processes depend on the thread count."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
