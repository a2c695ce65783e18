"""Labels, captions and per-sample JSON carried from the inputs into the latent shards
(codec/latents/conditioning.py), on real photos arranged into class folders."""

import io
import json
import tarfile

import pytest
from conftest import SHARED_DATA, smooth_image
from PIL import Image

from codec import Codec, LatentDataset
from codec.cli import main
from codec.latents import shards as sh
from codec.models import build_autoencoder


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    return Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path_factory.mktemp("c") / "codec")


def photo(i: int) -> Image.Image:
    files = sorted((SHARED_DATA / "bsds500" / "train").glob("*.jpg"))
    return Image.open(files[i]).convert("RGB") if files else Image.fromarray(smooth_image(i, 48, 64))


@pytest.fixture
def classes(tmp_path):
    """cats/ and dogs/ with captions (.txt), a .json, a metadata.jsonl row, and an orphan caption."""
    root = tmp_path / "pets"
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for j in range(2):
            photo(2 * c + j).save(root / name / f"{j}.jpg")
    (root / "cats" / "0.txt").write_text("a sleepy cat\n")
    (root / "dogs" / "1.json").write_text(json.dumps({"caption": "a dog in the snow", "photographer": "kim"}))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "dogs/0.jpg", "text": "a wet dog", "year": 2020})
                                         + "\n" + json.dumps({"file_name": "birds/9.jpg", "text": "gone"}) + "\n")
    (root / "cats" / "lost.txt").write_text("a caption whose image is missing")
    return root


def compress(codec_dir, src, out, *extra):
    return main(["compress", "--codec", str(codec_dir), "--input", str(src), "--output", str(out),
                 "--resolution", "32", "--num-workers", "0", "--no-progress", *extra])


def test_class_folders_captions_and_metadata_reach_the_dataset(codec_dir, classes, tmp_path):
    out = tmp_path / "lat"
    assert compress(codec_dir, classes, out, "--labels", "folders") == 0
    ds = LatentDataset(out)
    assert ds.classes == ["cats", "dogs"]
    items = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert {k: v["label"] for k, v in items.items()} == {"cats/0.jpg": 0, "cats/1.jpg": 0, "dogs/0.jpg": 1,
                                                        "dogs/1.jpg": 1}
    assert items["cats/0.jpg"]["caption"] == "a sleepy cat" and items["cats/1.jpg"]["caption"] is None
    assert items["dogs/0.jpg"]["caption"] == "a wet dog" and items["dogs/0.jpg"]["meta"]["year"] == 2020
    assert items["dogs/1.jpg"]["meta"] == {"caption": "a dog in the snow", "photographer": "kim"}
    orphans = {o["key"] for o in sh.load_manifest(out)["orphans"]}
    assert orphans == {"cats/lost.txt", "metadata.jsonl: birds/9.jpg"}
    assert main(["verify", str(out)]) == 0


def test_bad_side_data_and_class_folders(codec_dir, classes, tmp_path, capsys):
    (classes / "cats" / "1.json").write_text("{not json")
    photo(5).save(classes / "stray.jpg")  # not in a class folder
    out = tmp_path / "lat"
    assert compress(codec_dir, classes, out, "--labels", "folders") == 0
    skipped = {s["key"]: s["reason"] for s in sh.load_manifest(out)["skipped"]}
    assert "json side data is unreadable" in skipped["cats/1.jpg"]
    assert skipped["stray.jpg"] == "not in a class folder (--labels folders)"
    (classes / "empty").mkdir()
    assert compress(codec_dir, classes, tmp_path / "other", "--labels", "folders") == 2
    assert "class folder(s) ['empty']" in capsys.readouterr().err
    (classes / "metadata.jsonl").write_text("{broken\n")
    assert compress(codec_dir, classes, tmp_path / "third") == 2
    assert "metadata.jsonl:1: not a JSON object with a file_name" in capsys.readouterr().err


def test_tar_samples_carry_cls_txt_and_json_members(codec_dir, tmp_path):
    shard = tmp_path / "data" / "train-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            photo(i).save(buf, format="JPEG")
            members = {f"s{i}.jpg": buf.getvalue(), f"s{i}.cls": str(7 + i).encode()}
            if i == 1:
                members["s1.txt"] = b"a caption in the tar"
                members["s1.json"] = json.dumps({"source": "web"}).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "lat"
    assert compress(codec_dir, tmp_path / "data", out) == 0
    ds = LatentDataset(out)
    got = {ds[i]["key"]: (ds[i]["label"], ds[i]["caption"], ds[i]["meta"]) for i in range(len(ds))}
    assert got == {"train-000000.tar/s0.jpg": (7, None, None),
                   "train-000000.tar/s1.jpg": (8, "a caption in the tar", {"source": "web"}),
                   "train-000000.tar/s2.jpg": (9, None, None)}


def test_latents_without_side_data_have_no_conditioning_fields(codec_dir, tmp_path):
    (tmp_path / "plain").mkdir()
    photo(0).save(tmp_path / "plain" / "a.jpg")
    assert compress(codec_dir, tmp_path / "plain", tmp_path / "lat") == 0
    item = LatentDataset(tmp_path / "lat")[0]
    assert not {"label", "caption", "meta"} & set(item) and LatentDataset(tmp_path / "lat").classes is None
