"""Streamed sources (codec/sources/stream.py): webdataset shards read through ``pipe:`` commands
(what URLs go through too) and streamed Hugging Face datasets, split across processes x
DataLoader workers, every image once per epoch, resumed exactly, every problem recorded."""

import io
import tarfile

import pytest
import torch
from conftest import assert_user_error
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import hf_dataset, photos, write_shards  # noqa: F401  (fixture and helpers)
from torch.utils.data import DataLoader

from codec.sources import is_stream
from codec.sources.stream import ImageStream, StreamPlan
from train.autoencoder.data import Cropper, TooSmall, collate


def pipe_pattern(shards) -> str:
    first, last = shards[0].stem.split("-")[1], shards[-1].stem.split("-")[1]
    return f"pipe:cat {shards[0].parent}/train-{{{first}..{last}}}.tar"


def stream(sources, crop=32, **kw):
    return ImageStream(sources, Cropper(crop), seed=3, unusable=(TooSmall,), progress=False, **kw)


# ------------------------------------------------------------------------- the plan, on keys
def loader_order(plan_for, done: int, workers: int, count: int) -> list[tuple[int, list[int]]]:
    """What a DataLoader over ``workers`` workers resumed after ``done`` batches yields: batch k
    comes from worker k % W, whose n-th batch is global batch done + w + n*W (its class is fixed);
    returns (epoch, positions) of ``count`` batches, from the plan alone."""
    plan = plan_for(workers)
    out = []
    for k in range(count):
        g = done + k  # worker k % W's (k // W)-th batch: done + (k % W) + (k // W) * W
        epoch, t = plan.batch_of(g)
        start, _ = plan.stretch(epoch, g % workers)
        out.append((epoch, list(range(start + t * plan.batch, start + (t + 1) * plan.batch))))
    return out


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=6), world=st.integers(1, 3),
       workers=st.integers(1, 4), batch=st.integers(1, 3), done=st.integers(0, 12), seed=st.integers(0, 5))
def test_plan_every_image_once_per_epoch_and_resume_is_exact(counts, world, workers, batch, done, seed):
    total = sum(counts)
    if total < world * batch:
        with pytest.raises(ValueError, match="fewer than one batch"):
            StreamPlan(counts, seed, batch, 0, world, workers)
        return
    per = total // (world * batch)
    epoch_positions = []
    for rank in range(world):
        def plan_for(w, rank=rank):
            return StreamPlan(counts, seed, batch, rank, world, w)
        whole = loader_order(plan_for, 0, workers, 2 * per)
        assert [e for e, _ in whole] == [0] * per + [1] * per  # epochs stay aligned across workers
        epoch_positions += [p for _, ps in whole[:per] for p in ps]
        # a resumed loader continues with exactly the batches of the uninterrupted one
        whole = loader_order(plan_for, 0, workers, done + 2 * per)
        assert loader_order(plan_for, done, workers, 2 * per) == whole[done:]
    # every position of the epoch once, across processes and workers; fewer than P*B left out
    assert sorted(epoch_positions) == list(range(world * per * batch))
    assert total - len(epoch_positions) < world * batch


# ------------------------------------------------------------------------- real streams, on keys
def tiny_pngs(count: int) -> dict[str, bytes]:
    from PIL import Image

    out = {}
    for i in range(count):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 9 % 256, 40, 90)).save(buf, format="PNG")
        out[f"{i:03d}.png"] = buf.getvalue()
    return out


def write_uneven_shards(folder, sizes: list[int]) -> list:
    """Shards ``train-00000i.tar`` of the given image counts (names unique across shards)."""
    images, shards, n = tiny_pngs(sum(sizes)), [], 0
    folder.mkdir(parents=True, exist_ok=True)
    for s, size in enumerate(sizes):
        path = folder / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for name in sorted(images)[n : n + size]:
                info = tarfile.TarInfo(name)
                info.size = len(images[name])
                tf.addfile(info, io.BytesIO(images[name]))
        n += size
        shards.append(path)
    return shards


def keys_of(source, rank, world, workers, done, batches, batch=2):
    data = stream([source], crop=8)
    data.set_rank(rank, world)
    data.set_position(done, batch)
    loader = DataLoader(data, batch_size=batch, num_workers=workers, collate_fn=collate, drop_last=True)
    out = []
    for b in loader:
        out.append(tuple(k.rsplit("/", 1)[-1] for k in b["paths"]))
        if len(out) == batches:
            break
    return out


@pytest.mark.parametrize("sizes", [[4, 4, 4], [5, 1, 3, 2, 2], [11]])  # uneven; fewer shards than readers
@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_streams_read_every_image_once_per_epoch_and_resume_exactly(tmp_path, sizes, world, workers):
    source = pipe_pattern(write_uneven_shards(tmp_path / "s", sizes))
    total, batch = sum(sizes), 2
    per = total // (world * batch)
    runs = [keys_of(source, r, world, workers, 0, per + 2) for r in range(world)]
    epoch = [k for run in runs for b in run[:per] for k in b]
    assert len(epoch) == len(set(epoch)) == world * per * batch  # no image twice within the epoch
    assert total - len(epoch) < world * batch
    for rank in range(world):
        for done in (1, per):  # resumed inside an epoch, and at its end
            assert keys_of(source, rank, world, workers, done, 2) == runs[rank][done:done + 2], (rank, done)


def test_a_streamed_hugging_face_dataset_resumes_exactly_with_two_workers(tmp_path, photos):  # noqa: F811
    hf_dataset(photos).save_to_disk(str(tmp_path / "hf"))
    data = str(tmp_path / "hf")
    assert is_stream(data, streaming=True) and not is_stream(data)
    whole = keys_of(data, 0, 1, 2, 0, 3, batch=1)
    assert len(set(whole)) == 3
    assert keys_of(data, 0, 1, 2, 1, 2, batch=1) == whole[1:]  # the case of the report: was [104,100] [101,103]
    assert all("[shard " in k[0] and ", row " in k[0] for k in whole)  # keys name the shard and the row


# ------------------------------------------------------------------------- what is recorded
def test_bad_members_and_shards_are_recorded_under_their_own_keys(tmp_path, photos):  # noqa: F811
    shards = write_shards(tmp_path / "s", photos, per_shard=2, corrupt="003.png")
    cut = shards[2]
    with tarfile.open(cut) as tf:
        boundary = tf.getmembers()[-1].offset  # the last member's header: a cut between members
    cut.write_bytes(cut.read_bytes()[:boundary])
    data = stream([pipe_pattern(shards)])
    items = [data_item for _, data_item in zip(range(8), iter(data))]
    records = {r["key"]: r["reason"] for item in items for r in item["skipped"]}
    assert f"pipe:cat {shards[1]}/003.png" in records  # the member, under its shard's full name
    assert "cut short" in records[f"pipe:cat {cut}"]  # the cut shard, under its full URL (not "pipe")
    assert all(key in reason for key, reason in records.items())


def test_small_images_are_recorded_with_their_names(tmp_path):
    from PIL import Image

    images = {}
    for name, side in (("a-small.png", 16), ("b-big.png", 64), ("c-small.png", 20)):
        buf = io.BytesIO()
        Image.new("RGB", (side, side)).save(buf, format="PNG")
        images[name] = buf.getvalue()
    shards = write_shards(tmp_path / "s", images, per_shard=3)
    data = ImageStream([f"pipe:cat {shards[0]}"], Cropper(32, small_images="skip"), unusable=(TooSmall,),
                       progress=False)
    items = iter(data)
    first, second = next(items), next(items)
    assert first["path"].endswith("b-big.png")
    records = first["skipped"] + second["skipped"]  # two small files, two records, each named
    assert {r["key"].rsplit("/", 1)[-1] for r in records} == {"a-small.png", "c-small.png"}
    assert all(r["key"] in r["reason"] and "smaller than crop 32" in r["reason"] for r in records)


def test_bad_stream_sources(tmp_path, photos):  # noqa: F811
    with pytest.raises(OSError, match="pipe:cat /nonexistent.tar: cannot read this shard"):
        stream(["pipe:cat /nonexistent.tar"])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(OSError, match="it is empty"):
        stream([f"pipe:cat {empty}"])
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"x" * 2048)
    with pytest.raises(ValueError, match="no shard .* holds a readable image"):  # all broken: an error, not a hang
        stream([f"pipe:cat {broken}"])
    with pytest.raises(ValueError, match="a source is one of"):
        stream([str(tmp_path)])
    with pytest.raises(OSError, match="http://127.0.0.1:9/x.tar: cannot read this shard"):  # nothing listens there
        stream(["http://127.0.0.1:9/x.tar"])
    assert is_stream("https://host/x.tar") and is_stream("pipe:cat x") and not is_stream(str(tmp_path))


# ------------------------------------------------------------------------- training on streams
def train(out, sources, *sets):
    from train.__main__ import main as train_main

    args = ["model.preset=test", f"output_dir={out}", f"data.train={sources}", "data.crop_size=32", "batch_size=2",
            "loss.perceptual_weight=0", "data.num_workers=2", "scale_samples=2", "mixed_precision=no",
            "checkpoint_every=2", "image_every=0", "val_every=0", *sets]
    return train_main([a for s in args for a in ("--set", s)])


def test_training_on_a_stream_resumes_to_the_uninterrupted_weights(tmp_path, photos):  # noqa: F811
    from safetensors.torch import load_file

    source = pipe_pattern(write_shards(tmp_path / "s", photos, per_shard=2))
    assert train(tmp_path / "whole", source, "max_steps=5") == 0
    assert train(tmp_path / "cut", source, "max_steps=3") == 0
    assert train(tmp_path / "cut", source, "max_steps=5", "resume=true") == 0
    a, b = (load_file(tmp_path / d / "codec" / "diffusion_pytorch_model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_streams_a_hugging_face_dataset(tmp_path, photos):  # noqa: F811
    hf_dataset(photos).save_to_disk(str(tmp_path / "hf"))
    assert train(tmp_path / "run", tmp_path / "hf", "max_steps=2", "data.streaming=true") == 0
    assert (tmp_path / "run" / "codec" / "config.json").exists()
    with pytest.raises(SystemExit):  # mixing a stream with indexed sources is refused
        train(tmp_path / "mixed", f"[{tmp_path / 'hf'},pipe:cat x.tar]", "max_steps=1")


def test_a_stream_too_small_for_a_batch_is_a_clear_error(tmp_path, photos, capsys):  # noqa: F811
    source = pipe_pattern(write_shards(tmp_path / "s", photos, per_shard=2))
    code = train(tmp_path / "run", source, "max_steps=1", "batch_size=8")
    assert_user_error(capsys, code, "the stream holds 6 images, fewer than one batch of 8")
