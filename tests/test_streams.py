"""Streamed training data (train/streams.py): webdataset shards read through ``pipe:`` commands
(what URLs go through too), split across processes, resumed exactly, bad members recorded."""

import pytest
import torch
from test_data import hf_dataset, photos, write_shards  # noqa: F401  (fixture and helpers)

from train.data import Cropper
from train.streams import StreamCrops, is_stream


def pipe_pattern(shards) -> str:
    first, last = shards[0].stem.split("-")[1], shards[-1].stem.split("-")[1]
    return f"pipe:cat {shards[0].parent}/train-{{{first}..{last}}}.tar"


def stream(sources, **crop):
    return StreamCrops(sources, Cropper(32, **crop), seed=3)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_every_image_once_per_epoch_across_readers(tmp_path, photos):  # noqa: F811
    shards = write_shards(tmp_path / "s", photos, per_shard=2)  # 3 shards of 2
    source = stream([pipe_pattern(shards)])
    for readers in (2, 3, 4):  # by shard (3 shards >= readers) or, with 4 readers, by image
        keys = [[k for k, _ in source.samples(0, r, readers, [])] for r in range(readers)]
        flat = [k.rsplit("/", 1)[-1] for ks in keys for k in ks]
        assert sorted(flat) == sorted(photos), readers
    orders = [[k for k, _ in source.samples(e, 0, 1, [])] for e in range(4)]
    assert len({tuple(o) for o in orders}) > 1  # shard order reshuffled per epoch


def test_a_resumed_stream_continues_exactly_and_bad_members_are_recorded(tmp_path, photos):  # noqa: F811
    shards = write_shards(tmp_path / "s", photos, per_shard=2, corrupt="003.png")
    whole = take(iter(stream([pipe_pattern(shards)])), 12)  # two epochs and more
    skipped = [s for item in whole for s in item["skipped"]]
    assert len(skipped) == 2 and all("003.png" in s for s in skipped)  # once per epoch, named
    resumed = stream([pipe_pattern(shards)])
    resumed.set_position(5, 1)  # after 5 batches of 1
    for a, b in zip(whole[5:], take(iter(resumed), 7)):
        assert a["path"] == b["path"] and torch.equal(a["pixels"], b["pixels"])


def test_bad_stream_sources(tmp_path, photos):  # noqa: F811
    with pytest.raises(OSError, match="pipe:cat /nonexistent.tar: cannot read this shard"):
        stream(["pipe:cat /nonexistent.tar"])
    shards = write_shards(tmp_path / "s", photos, per_shard=3)
    cut = tmp_path / "s" / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[:900])  # the second shard cut short
    items = take(iter(stream([pipe_pattern(shards)])), 5)
    problems = [s for item in items for s in item["skipped"]]
    assert any("train-000001.tar: shard unreadable or cut short" in p for p in problems)
    assert is_stream("https://host/x.tar") and is_stream("pipe:cat x") and not is_stream(str(tmp_path))


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
