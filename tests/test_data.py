import pytest
import torch
from conftest import smooth_image
from PIL import Image

from train.data import CropDataset, EpochSampler, collate, gather_files


def test_crops_are_deterministic_per_epoch(image_folder):
    ds = CropDataset(gather_files([image_folder]), crop_size=32, seed=3)
    a, b, c = ds[(2, 0)], ds[(2, 0)], ds[(2, 1)]
    assert a["pixels"].shape == (3, 32, 32)
    assert torch.equal(a["pixels"], b["pixels"]) and not torch.equal(a["pixels"], c["pixels"])


def test_bad_files_are_skipped_and_recorded(image_folder):
    (image_folder / "broken.png").write_bytes(b"not a png at all")
    (image_folder / "empty.jpg").write_bytes(b"")
    ds = CropDataset(gather_files([image_folder]), crop_size=32)
    batch = collate([ds[(i, 0)] for i in range(len(ds))])
    assert batch["pixels"].shape == (14, 3, 32, 32)  # every slot filled by a usable image
    assert sum("broken.png" in s for s in batch["skipped"]) >= 1
    assert sum("empty.jpg" in s for s in batch["skipped"]) >= 1


def test_small_images_upscale_or_skip(tmp_path):
    Image.fromarray(smooth_image(0, 16, 20)).save(tmp_path / "small.png")
    Image.fromarray(smooth_image(1, 64, 64)).save(tmp_path / "big.png")
    files = gather_files([tmp_path])
    up = CropDataset(files, crop_size=32, small_images="upscale")
    assert up[(files.index(tmp_path / "small.png"), 0)]["path"].endswith("small.png")
    skip = CropDataset(files, crop_size=32, small_images="skip")
    item = skip[(files.index(tmp_path / "small.png"), 0)]
    assert item["path"].endswith("big.png") and "smaller than crop" in item["skipped"][0]


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        gather_files([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gather_files([tmp_path / "nope"])


def test_sampler_shards_and_resumes():
    full = list(EpochSampler(10, seed=1))
    r0, r1 = list(EpochSampler(10, 1, rank=0, world=2)), list(EpochSampler(10, 1, rank=1, world=2))
    assert sorted(i for i, _ in r0 + r1) == list(range(10)) and not set(r0) & set(r1)
    s = EpochSampler(10, seed=1)
    s.set_position(0, 4)
    assert list(s) == full[4:]
    s.set_position(1, 0)
    assert [i for i, _ in s] != [i for i, _ in full] and all(e == 1 for _, e in s)
