"""codec.latents.shards (atomic shards, records, manifest, verify) and codec.LatentDataset."""

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

from codec import LatentDataset
from codec.latents import shards as sh


def make_job(keys, store="mean"):
    return {
        "format": sh.FORMAT, "version": sh.VERSION,
        "codec": {
            "weights_sha256": "abc", "scaling_factor": 0.5, "shift_factor": 0.1, "config": {"a": 1},
        },
        "settings": {"store": store, "resolution": 16},
        "inputs": {"source": "/nowhere", "count": len(keys), "keys_sha256": sh.keys_digest(keys)},
    }


def rows(keys):
    return {
        "keys": list(keys),
        "original_sizes": [[20 + i, 30] for i in range(len(keys))],
        "crops_top_left": [[i, 0] for i in range(len(keys))],
    }


def build(out, store="mean", seed=0):
    """Two chunks by hand: chunk 0 = 3 rows of shape (4, 2, 2); chunk 1 = 2 rows + 1 skipped."""
    keys = ["a.jpg", "b.jpg", "c.png", "d/e.jpg", "d/f.jpg", "g.jpg"]
    job = make_job(keys, store)
    sh.check_or_write_job(out, job, write=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for chunk, chunk_keys in ((0, keys[:3]), (1, keys[3:5])):
        n = len(chunk_keys)
        if store == "mean_std":
            t = {
                "mean": torch.randn(n, 4, 2, 2, generator=g),
                "std": torch.rand(n, 4, 2, 2, generator=g) + 0.5,
            }
        else:
            t = {"latents": torch.randn(n, 4, 2, 2, generator=g)}
        tensors.update({(chunk, k): v for k, v in t.items()})
        entry = sh.write_shard(out, sh.shard_name(chunk, (2, 2)), t, rows(chunk_keys), job)
        skipped = [{"key": "g.jpg", "reason": "g.jpg: cannot read image"}] if chunk == 1 else []
        record = {"chunk": chunk, "shards": [entry], "skipped": skipped}
        sh.atomic_write_json(sh.record_path(out, chunk), record)
    manifest = sh.merge_manifest(out, job, num_chunks=2)
    return job, manifest, tensors


def test_shard_is_written_atomically_and_readable_on_its_own(tmp_path):
    job, manifest, tensors = build(tmp_path)
    shard = tmp_path / manifest["shards"][0]["file"]
    names = sorted(p.name for p in shard.parent.iterdir())
    assert names == ["000000-2x2.safetensors", "000001-2x2.safetensors"]
    assert manifest["shards"][0]["sha256"] == sh.sha256_file(shard)
    job_read, entry = sh.read_shard_entry(shard)
    assert job_read == job and entry["keys"] == ["a.jpg", "b.jpg", "c.png"] and entry["rows"] == 3
    ds = LatentDataset(shard)  # no manifest needed
    assert len(ds) == 3 and ds.scaling_factor == 0.5
    assert torch.equal(ds[1]["latents"], tensors[(0, "latents")][1])
    assert ds[1]["original_size"].tolist() == [21, 30] and ds[1]["crop_top_left"].tolist() == [1, 0]


def test_interrupted_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    target = tmp_path / "shards" / "x.safetensors"

    def killed(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        sh.atomic_write_bytes(target, b"data")
    assert not target.exists()
    assert any(sh.TMP_MARK in p.name for p in target.parent.iterdir())  # only a temporary


def test_manifest_accounts_for_every_input_and_cleans_leftovers(tmp_path):
    (tmp_path / "shards").mkdir()
    # killed mid-write:
    (tmp_path / "shards" / "000000-2x2.safetensors.tmp-123").write_bytes(b"half")
    (tmp_path / "shards" / "000007-9x9.safetensors").write_bytes(b"orphan")  # no record names it
    _, manifest, _ = build(tmp_path)
    assert manifest["summary"] == {
        "inputs": 6, "encoded": 5, "skipped": 1, "shards": 2,
        "bytes": sum(s["bytes"] for s in manifest["shards"]), "latent_shapes": {"4x2x2": 5},
    }
    assert manifest["skipped"] == [{"key": "g.jpg", "reason": "g.jpg: cannot read image"}]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "000000-2x2.safetensors", "000001-2x2.safetensors"]
    assert json.loads((tmp_path / "manifest.json").read_text())["codec"]["scaling_factor"] == 0.5


def test_a_chunk_with_a_cut_shard_is_not_done(tmp_path):
    build(tmp_path)
    assert sh.load_record(tmp_path, 1) is not None
    shard = tmp_path / sh.shard_name(1, (2, 2))
    shard.write_bytes(shard.read_bytes()[:-10])
    assert sh.load_record(tmp_path, 1) is None
    with pytest.raises(RuntimeError, match="rerun the compress command"):
        sh.merge_manifest(tmp_path, make_job([]), num_chunks=2)


def test_job_mismatch_is_refused_naming_the_difference(tmp_path):
    keys = ["a.jpg", "b.jpg"]
    sh.check_or_write_job(tmp_path, make_job(keys), write=True)
    sh.check_or_write_job(tmp_path, make_job(keys), write=False)  # same job: fine
    with pytest.raises(sh.JobMismatchError, match=r"store: 'mean' -> 'sample'.*new --output"):
        sh.check_or_write_job(tmp_path, make_job(keys, store="sample"), write=False)
    other = make_job(keys)
    other["codec"]["weights_sha256"] = "def"
    with pytest.raises(sh.JobMismatchError, match="codec weights_sha256"):
        sh.check_or_write_job(tmp_path, other, write=False)
    with pytest.raises(sh.JobMismatchError, match="input files: 2 before, 3 now"):
        sh.check_or_write_job(tmp_path, make_job(keys + ["c.jpg"]), write=False)


def test_verify_finds_damage_missing_shards_and_changed_inputs(tmp_path):
    build(tmp_path)
    keys = ["a.jpg", "b.jpg", "c.png", "d/e.jpg", "d/f.jpg", "g.jpg"]
    problems, summary = sh.verify(tmp_path, keys)
    assert problems == [] and summary["encoded"] == 5
    problems, _ = sh.verify(tmp_path, keys + ["new.jpg"])
    assert problems == ["1 input(s) not in the latents, e.g. ['new.jpg']"]
    shard = tmp_path / sh.shard_name(0, (2, 2))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems, _ = sh.verify(tmp_path)
    assert any("checksum mismatch" in p for p in problems)
    assert any("accounts for 3 inputs but the job had 6" in p for p in problems)
    (tmp_path / sh.shard_name(1, (2, 2))).unlink()
    assert any("missing" in p for p in sh.verify(tmp_path)[0])


def test_unfinished_output_says_to_rerun(tmp_path):
    sh.check_or_write_job(tmp_path, make_job(["a.jpg"]), write=True)
    with pytest.raises(FileNotFoundError, match="rerun the same compress command"):
        LatentDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a compressed dataset"):
        LatentDataset(tmp_path / "elsewhere")


def test_mean_std_gives_a_fresh_posterior_sample_per_access(tmp_path):
    _, _, tensors = build(tmp_path, store="mean_std")
    ds = LatentDataset(tmp_path)
    mean, std = tensors[(1, "mean")][0], tensors[(1, "std")][0]
    item = ds[3]
    assert item["key"] == "d/e.jpg"
    assert torch.equal(item["mean"], mean) and torch.equal(item["std"], std)
    torch.manual_seed(0)
    draws = torch.stack([ds[3]["latents"] for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    assert torch.allclose(draws.mean(0), mean, atol=4 * std.max() / 20)  # 400 draws: se = std / 20
    assert torch.allclose(draws.std(0), std, rtol=0.25)
    assert torch.equal(LatentDataset(tmp_path, sample=False)[3]["latents"], mean)


def test_dataloader_with_workers_reads_every_row_once(tmp_path):
    _, _, tensors = build(tmp_path)
    ds = LatentDataset(tmp_path)
    assert ds.indices_by_shape() == {(4, 2, 2): [0, 1, 2, 3, 4]}
    ds[0]  # a handle opened in the parent must not leak into the workers
    loader = DataLoader(
        ds, batch_size=2, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = {}
    for batch in loader:
        for key, lat in zip(batch["key"], batch["latents"]):
            seen[key] = lat
    assert sorted(seen) == ["a.jpg", "b.jpg", "c.png", "d/e.jpg", "d/f.jpg"]
    assert torch.equal(seen["d/f.jpg"], tensors[(1, "latents")][1])
    with pytest.raises(IndexError):
        ds[5]
