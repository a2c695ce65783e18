"""codec.sources through the commands: compress, scale and eval take the values data.train takes
(streams, brace patterns, Hugging Face datasets); truncated tars are caught wherever they are
cut; labels never kill a job; a source that is no known form is a clear error."""

import json
import tarfile

import pytest
import torch
from conftest import smooth_image
from PIL import Image
from test_data import hf_dataset, photos, write_shards  # noqa: F401  (fixture and helpers)

from codec import Codec, LatentDataset
from codec.cli import main
from codec.latents import shards as sh
from codec.models import build_autoencoder
from codec.sources import list_source


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    torch.manual_seed(0)
    return Codec(build_autoencoder("test"), device="cpu").save_pretrained(tmp_path_factory.mktemp("codec") / "codec")


def compress(codec_dir, src, out, *extra, workers=0):
    return main(["compress", "--codec", str(codec_dir), "--input", str(src), "--output", str(out),
                 "--num-workers", str(workers), "--no-progress", "--resolution", "32", *extra])


def rows(out) -> dict[str, torch.Tensor]:
    data = LatentDataset(out)
    return {data[i]["key"]: data[i]["latents"] for i in range(len(data))}


def pipe(shards) -> str:
    return f"pipe:cat {shards[0].parent}/train-{{000000..{len(shards) - 1:06d}}}.tar"


# ------------------------------------------------------------------------- compress a stream
def test_compressing_a_stream_matches_the_local_tars_and_resumes_per_shard(codec_dir, tmp_path, photos, capsys):  # noqa: F811
    shards = write_shards(tmp_path / "s", photos, per_shard=2)
    assert compress(codec_dir, pipe(shards), tmp_path / "streamed", workers=2) == 0
    assert "6 inputs = 6 encoded + 0 skipped; 3 shards" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "streamed")]) == 0
    assert "is a stream" in capsys.readouterr().out
    streamed = rows(tmp_path / "streamed")
    assert compress(codec_dir, tmp_path / "s", tmp_path / "local") == 0  # the same tars, by index
    local = rows(tmp_path / "local")
    assert len(streamed) == len(local) == 6
    for (ks, a), (kl, b) in zip(sorted(streamed.items()), sorted(local.items())):
        assert ks.endswith(kl) and torch.equal(a, b)  # the same latents, keyed by the full URL
    # A job killed while the second shard was in flight: only that shard is done again.
    (tmp_path / "streamed" / sh.PARTS_DIR / "chunk-000001.json").unlink()
    (tmp_path / "streamed" / sh.MANIFEST_FILE).unlink()
    assert compress(codec_dir, pipe(shards), tmp_path / "streamed") == 0
    assert "1 of 3 chunks encoded by this run" in capsys.readouterr().out
    again = rows(tmp_path / "streamed")
    assert again.keys() == streamed.keys() and all(torch.equal(again[k], streamed[k]) for k in again)
    # other shards are another job
    assert compress(codec_dir, f"pipe:cat {shards[0]}", tmp_path / "streamed") != 0
    assert "input shards: 3 before, 1 now" in capsys.readouterr().err


def test_a_stream_cut_short_is_recorded_and_what_came_before_is_kept(codec_dir, tmp_path, photos, capsys):  # noqa: F811
    shards = write_shards(tmp_path / "s", photos, per_shard=3)
    with tarfile.open(shards[1]) as tf:
        boundary = tf.getmembers()[2].offset  # after the first sample (image + .cls): a member boundary
    shards[1].write_bytes(shards[1].read_bytes()[:boundary])
    assert compress(codec_dir, pipe(shards), tmp_path / "lat") == 0
    manifest = sh.load_manifest(tmp_path / "lat")
    assert manifest["summary"]["encoded"] == 4  # 3 of the first shard, 1 before the cut
    assert [s["key"] for s in manifest["skipped"]] == [f"pipe:cat {shards[1]}"]
    assert "cut short" in manifest["skipped"][0]["reason"]
    assert main(["verify", str(tmp_path / "lat")]) == 0


# ------------------------------------------------------------------------- truncated tars, indexed
@pytest.mark.parametrize("where", ["inside a member", "at a member boundary", "without the end blocks"])
def test_a_truncated_tar_is_an_error_naming_it_wherever_it_is_cut(codec_dir, tmp_path, photos, where, capsys):  # noqa: F811
    shard = write_shards(tmp_path / "s", photos, per_shard=6)[0]
    data = shard.read_bytes()
    with tarfile.open(shard) as tf:
        last = tf.getmembers()[-1]
    cut = {"inside a member": last.offset_data + 100, "at a member boundary": last.offset,
           "without the end blocks": last.offset_data + 512}[where]  # (.cls data fits one block)
    shard.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=f"{shard.name}: cannot list this tar .*cut short"):
        list_source(shard)
    assert compress(codec_dir, shard, tmp_path / "lat") == 2
    assert f"{shard}: cannot list this tar" in capsys.readouterr().err


# ------------------------------------------------------------------------- labels
def write_labelled(folder, labels: dict[str, object]):
    folder.mkdir(parents=True)
    rows_ = []
    for i, (name, label) in enumerate(labels.items()):
        Image.fromarray(smooth_image(i, 32, 32)).save(folder / name)
        rows_.append(json.dumps({"file_name": name, "label": label}))
    (folder / "metadata.jsonl").write_text("\n".join(rows_) + "\n")


def test_string_labels_become_class_indices_and_bad_labels_are_recorded(codec_dir, tmp_path, capsys):
    write_labelled(tmp_path / "pets", {"a.png": "dog", "b.png": "cat", "c.png": "dog", "d.png": 2.7,
                                       "e.png": [1], "f.png": 3.0})
    assert compress(codec_dir, tmp_path / "pets", tmp_path / "lat") == 0
    data = LatentDataset(tmp_path / "lat")
    assert data.classes == ["cat", "dog"]
    labels = {data[i]["key"]: data[i]["label"] for i in range(len(data))}
    assert labels == {"a.png": 1, "b.png": 0, "c.png": 1, "f.png": 3}
    skipped = {s["key"]: s["reason"] for s in sh.load_manifest(tmp_path / "lat")["skipped"]}
    assert "not a whole number" in skipped["d.png"] and "d.png" in skipped["d.png"]
    assert "is a list" in skipped["e.png"]


def test_a_string_label_in_side_data_is_a_recorded_skip(codec_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(("a", "b")):
        Image.fromarray(smooth_image(i, 32, 32)).save(folder / f"{name}.png")
    (folder / "a.cls").write_text("cat")  # a name where webdataset .cls holds an index
    (folder / "b.cls").write_text("4")
    assert compress(codec_dir, folder, tmp_path / "lat") == 0
    manifest = sh.load_manifest(tmp_path / "lat")
    assert [s["key"] for s in manifest["skipped"]] == ["a.png"] and "class name" in manifest["skipped"][0]["reason"]
    assert LatentDataset(tmp_path / "lat")[0]["label"] == 4


# ------------------------------------------------------------------------- Hugging Face datasets
def test_compress_and_scale_read_a_hugging_face_dataset(codec_dir, tmp_path, photos, capsys):  # noqa: F811
    hf_dataset(photos, corrupt="002.png").save_to_disk(str(tmp_path / "hf"))
    assert compress(codec_dir, tmp_path / "hf", tmp_path / "lat") == 0
    manifest = sh.load_manifest(tmp_path / "lat")
    assert manifest["summary"]["encoded"] == 5 and [s["key"] for s in manifest["skipped"]] == [
        f"{tmp_path / 'hf'}[2]"]
    data = LatentDataset(tmp_path / "lat")
    assert sorted(data[i]["label"] for i in range(len(data))) == [0, 1, 3, 4, 5]  # the label column
    assert main(["verify", str(tmp_path / "lat")]) == 0
    assert "inputs match" in capsys.readouterr().out
    assert compress(codec_dir, tmp_path / "hf", tmp_path / "streamed", "--streaming") == 0
    assert sh.load_manifest(tmp_path / "streamed")["summary"]["encoded"] == 5
    capsys.readouterr()
    assert compress(codec_dir, tmp_path / "hf", tmp_path / "x", "--image-column", "pixels") == 2
    assert "no column 'pixels' (columns: ['image', 'label'])" in capsys.readouterr().err
    import datasets

    datasets.DatasetDict({"train": hf_dataset(photos)}).save_to_disk(str(tmp_path / "dict"))
    assert compress(codec_dir, tmp_path / "dict", tmp_path / "y", "--split", "test") == 2
    assert "no split 'test' (it has ['train'])" in capsys.readouterr().err
    scaled = tmp_path / "scaled"
    assert main(["scale", "--codec", str(codec_dir), "--input", str(tmp_path / "hf"), "--resolution", "32",
                 "--samples", "6", "--num-workers", "0", "--output", str(scaled)]) == 0
    assert "over 5 images, 1 unreadable" in capsys.readouterr().out


def test_scale_reads_the_start_of_a_stream(codec_dir, tmp_path, photos, capsys):  # noqa: F811
    shards = write_shards(tmp_path / "s", photos, per_shard=2)
    assert main(["scale", "--codec", str(codec_dir), "--input", pipe(shards), "--resolution", "32",
                 "--samples", "3", "--num-workers", "0", "--output", str(tmp_path / "scaled")]) == 0
    assert "over 3 images" in capsys.readouterr().out


# ------------------------------------------------------------------------- bad sources
def test_sources_that_name_nothing_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist .*a source is one of"):
        list_source(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="cannot read this shard|no images in the stream"):
        list_source("pipe:cat /nonexistent.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.tar: cannot list this tar"):
        list_source(tmp_path / "empty.tar")


def test_eval_reads_a_stream_and_a_tar(codec_dir, tmp_path):
    import io

    small = {}
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray(smooth_image(i, 64, 80)).save(buf, format="PNG")
        small[f"{i:03d}.png"] = buf.getvalue()
    shards = write_shards(tmp_path / "s", small, per_shard=2)
    for source in (pipe(shards), shards[0]):
        out = tmp_path / ("eval-" + str(abs(hash(str(source)))))
        assert main(["eval", "--codec", str(codec_dir), "--data", str(source), "--out", str(out),
                     "--no-classical", "--transforms", "none", "--worst", "1"]) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["images"] == 2
