import pytest
import torch
from conftest import smooth_image
from PIL import Image

from codec.images import pil_to_tensor
from train.autoencoder.data import CropDataset, collate, gather_files
from train.common.sampler import EpochSampler


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
    assert sum(s["key"].endswith("broken.png") for s in batch["skipped"]) >= 1
    assert sum(s["key"].endswith("empty.jpg") for s in batch["skipped"]) >= 1


def test_small_images_upscale_or_skip(tmp_path):
    Image.fromarray(smooth_image(0, 16, 20)).save(tmp_path / "small.png")
    Image.fromarray(smooth_image(1, 64, 64)).save(tmp_path / "big.png")
    files = gather_files([tmp_path])
    up = CropDataset(files, crop_size=32, small_images="upscale")
    assert up[(files.index(tmp_path / "small.png"), 0)]["path"].endswith("small.png")
    skip = CropDataset(files, crop_size=32, small_images="skip")
    item = skip[(files.index(tmp_path / "small.png"), 0)]
    record = item["skipped"][0]
    assert item["path"].endswith("big.png") and "smaller than crop" in record["reason"]
    assert record["key"].endswith("small.png") and "small.png" in record["reason"]  # the file is named


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


# ------------------------------------------------------------------------- tar shards
def write_shards(folder, images: dict[str, bytes], per_shard: int, corrupt: str | None = None) -> list:
    """webdataset-style shards ``train-000000.tar`` ...: ``key.png`` members (+ a ``key.cls``)."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    names, shards = sorted(images), []
    for s in range(0, len(names), per_shard):
        path = folder / f"train-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for name in names[s : s + per_shard]:
                for member, data in ((name, b"garbage" if name == corrupt else images[name]),
                                     (name.rsplit(".", 1)[0] + ".cls", b"3")):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


@pytest.fixture
def photos(tmp_path):
    """Six real BSDS500 photos (or generated images where ../shared is absent) as PNG bytes."""
    import io

    from conftest import SHARED_DATA

    source = SHARED_DATA / "bsds500" / "train"
    files = sorted(source.glob("*.jpg"))[:6] if source.is_dir() else []
    arrays = [Image.open(f).convert("RGB") for f in files]
    arrays = arrays or [Image.fromarray(smooth_image(i, 48, 64)) for i in range(6)]
    out = {}
    for i, img in enumerate(arrays):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out[f"{i:03d}.png"] = buf.getvalue()
    return out


def test_tar_shards_give_the_crops_of_the_same_images_in_a_folder(tmp_path, photos):
    from train.autoencoder.data import gather_inputs

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    write_shards(tmp_path / "shards", photos, per_shard=4)
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    for source in (pattern, tmp_path / "shards"):  # a brace pattern, or the folder holding the shards
        items = gather_inputs([source])
        assert [it.key.rsplit("/", 1)[-1] for it in items] == sorted(photos)  # .cls members are not images
        a = CropDataset(gather_files([folder]), crop_size=32, seed=5)
        b = CropDataset(items, crop_size=32, seed=5)
        for i in range(len(photos)):
            assert torch.equal(a[(i, 2)]["pixels"], b[(i, 2)]["pixels"])
    assert b[(0, 0)]["path"].endswith("train-000000.tar/000.png")


def test_a_corrupt_member_is_skipped_and_recorded_by_its_key(tmp_path, photos):
    from train.autoencoder.data import gather_inputs

    write_shards(tmp_path / "shards", photos, per_shard=3, corrupt="001.png")
    ds = CropDataset(gather_inputs([tmp_path / "shards"]), crop_size=32)
    batch = collate([ds[(i, 0)] for i in range(len(ds))])
    assert batch["pixels"].shape[0] == len(photos)  # the slot is filled by the next usable image
    assert [s["key"] for s in batch["skipped"]] == [f"{tmp_path / 'shards' / 'train-000000.tar'}/001.png"]


def test_bad_shard_sources_are_clear_errors(tmp_path, photos):
    import tarfile

    from train.autoencoder.data import gather_inputs

    shards = write_shards(tmp_path / "shards", photos, per_shard=3)
    with pytest.raises(FileNotFoundError, match=r"train-000002.tar does not exist \(and 1 more"):
        gather_inputs([str(tmp_path / "shards" / "train-{000000..000003}.tar")])
    truncated = tmp_path / "cut" / "part.tar"
    truncated.parent.mkdir()
    truncated.write_bytes(shards[0].read_bytes()[:700])
    with pytest.raises(ValueError, match="cannot list this tar"):
        gather_inputs([truncated])
    with tarfile.open(tmp_path / "labels-only.tar", "w"):
        pass
    with pytest.raises(ValueError, match="no images"):
        gather_inputs([tmp_path / "labels-only.tar"])
    (tmp_path / "packed.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match="decompress it"):
        gather_inputs([tmp_path / "packed.tar.gz"])


def test_training_reads_a_shard_pattern(tmp_path, photos):
    from train.__main__ import main as train_main

    write_shards(tmp_path / "shards", photos, per_shard=3)
    out = tmp_path / "run"
    assert train_main(["--set", "model.preset=test", "--set", f"output_dir={out}", "--set",
                       f"data.train={tmp_path / 'shards'}/train-{{000000..000001}}.tar", "--set", "data.crop_size=32",
                       "--set", "batch_size=3", "--set", "max_steps=2", "--set", "loss.perceptual_weight=0",
                       "--set", "data.num_workers=1", "--set", "scale_samples=3", "--set", "data.crop_mode=resized",
                       "--set", "mixed_precision=no"]) == 0
    assert (out / "codec" / "diffusion_pytorch_model.safetensors").exists()


def test_resized_crops_take_a_share_of_the_short_side(tmp_path):
    img = Image.fromarray(smooth_image(7, 96, 96))
    img.save(tmp_path / "square.png")
    whole = CropDataset(gather_files([tmp_path]), 32, random_flip=False, crop_mode="resized", min_fraction=1.0)
    expected = pil_to_tensor(img.resize((32, 32), Image.BICUBIC))
    assert torch.equal(whole[(0, 0)]["pixels"], expected)  # fraction 1 of a square: the whole image
    part = CropDataset(gather_files([tmp_path]), 32, random_flip=False, crop_mode="resized", min_fraction=0.5)
    native = CropDataset(gather_files([tmp_path]), 32, random_flip=False)
    crops = [part[(0, e)]["pixels"] for e in range(4)]
    assert all(c.shape == (3, 32, 32) for c in crops) and not torch.equal(crops[0], crops[1])
    # A resized crop fits more of the image into 32 pixels than a native crop: larger steps between pixels.
    def detail(x):
        return (x[:, 1:] - x[:, :-1]).abs().mean()
    assert max(detail(c) for c in crops) > detail(native[(0, 0)]["pixels"])


# ------------------------------------------------------------------------- Hugging Face datasets
def hf_dataset(photos, corrupt: str | None = None):
    import datasets
    rows = {"image": [{"bytes": b"garbage" if n == corrupt else b, "path": None} for n, b in sorted(photos.items())],
            "label": list(range(len(photos)))}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_a_saved_hugging_face_dataset_gives_the_crops_of_the_same_images(tmp_path, photos):
    from train.autoencoder.data import gather_images

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in photos.items():
        (folder / name).write_bytes(data)
    hf_dataset(photos).save_to_disk(str(tmp_path / "hf"))
    for source in (tmp_path / "hf", f"hf:{tmp_path / 'hf'}"):
        a = CropDataset(gather_files([folder]), crop_size=32, seed=5)
        b = CropDataset(gather_images([source]), crop_size=32, seed=5)
        assert len(b) == len(photos)
        for i in range(len(photos)):
            assert torch.equal(a[(i, 1)]["pixels"], b[(i, 1)]["pixels"])
    both = CropDataset(gather_images([folder, tmp_path / "hf"]), crop_size=32)  # sources concatenate
    assert len(both) == 2 * len(photos) and both[(len(photos), 0)]["path"] == f"{tmp_path / 'hf'}[0]"


def test_hugging_face_bad_rows_splits_and_columns(tmp_path, photos):
    import datasets

    from train.autoencoder.data import gather_images

    hf_dataset(photos, corrupt="002.png").save_to_disk(str(tmp_path / "hf"))
    ds = CropDataset(gather_images([tmp_path / "hf"]), crop_size=32)
    batch = collate([ds[(i, 0)] for i in range(len(ds))])
    assert batch["pixels"].shape[0] == len(photos) and [s["key"] for s in batch["skipped"]] == [
        f"{tmp_path / 'hf'}[2]"]
    with pytest.raises(ValueError, match=r"no column 'pixels' \(columns: \['image', 'label'\]\)"):
        gather_images([tmp_path / "hf"], image_column="pixels")
    datasets.DatasetDict({"validation": hf_dataset(photos)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"no split 'train' \(it has \['validation'\]\)"):
        gather_images([tmp_path / "dict"])
    assert len(gather_images([tmp_path / "dict"], split="validation")) == len(photos)


def test_training_reads_a_hugging_face_dataset(tmp_path, photos):
    from train.__main__ import main as train_main

    hf_dataset(photos).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "run"
    assert train_main(["--set", "model.preset=test", "--set", f"output_dir={out}", "--set", f"data.train={tmp_path}/hf",
                       "--set", "data.crop_size=32", "--set", "batch_size=3", "--set", "max_steps=2", "--set",
                       "loss.perceptual_weight=0", "--set", "data.num_workers=1", "--set", "scale_samples=3",
                       "--set", "mixed_precision=no"]) == 0
    assert (out / "codec" / "config.json").exists()
