"""Latent shards on disk: the safetensors shard writer, the manifest, and ``verify``.

Layout of a compressed dataset (``OUT``)::

    OUT/job.json                       what is being made: codec (config, factors, weight hash),
                                       settings, and the input set (count + hash of the keys)
    OUT/shards/000012-32x32.safetensors  rows of one chunk of inputs with one latent shape
    OUT/parts/chunk-000012.json        commit record of chunk 12: its shards and skipped inputs
    OUT/manifest.json                  job.json + every shard + every skipped input (written last)

A shard holds ``latents`` (N, C, h, w) (the posterior mean or one posterior sample), or ``mean``
and ``std`` (N, C, h, w), all *scaled* as diffusion models consume them:
``(z - shift_factor) * scaling_factor``. Its safetensors metadata repeats the job and lists, row
by row, the input key, the original image size (h, w) and the crop's top-left corner in the
resized image, so a shard can be read on its own.

Every file is written under a temporary name and renamed when complete, and a chunk counts as
done only once its record exists, so a process killed at any moment leaves nothing that a rerun
would mistake for finished work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from codec.choices import STORES  # noqa: F401  (re-exported)
from codec.io import read_json
from codec.reproducible import safetensors_bytes

FORMAT = "vae-codec-latents"
VERSION = 1
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
PARTS_DIR = "parts"
TMP_MARK = ".tmp-"

LATENT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Per-row conditioning a shard may carry (codec.latents.conditioning): label, caption, meta.
CONDITIONING_ROWS = ("labels", "captions", "metas")


class ShardError(ValueError):
    """A shard, manifest or record that is malformed; the message names the file."""


class JobMismatchError(ValueError):
    """The output folder holds a different job (codec, settings or inputs)."""


# ------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file + fsync + rename (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def keys_digest(keys) -> str:
    """Order-independent fingerprint of a set of input keys."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


# ------------------------------------------------------------------------- shards
def shard_name(chunk: int, latent_hw: tuple[int, int]) -> str:
    return f"{SHARD_DIR}/{chunk:06d}-{latent_hw[0]}x{latent_hw[1]}.safetensors"


def write_shard(
    out: Path, name: str, tensors: dict[str, torch.Tensor], rows: dict, job: dict
) -> dict:
    """Write one shard atomically; returns its manifest entry (with size and sha256).

    ``rows`` holds per-row lists: ``keys``, ``original_sizes`` [(h, w)], ``crops_top_left``.
    """
    n = len(rows["keys"])
    shapes = {tuple(t.shape) for t in tensors.values()}
    if len(shapes) != 1 or next(iter(shapes))[0] != n:
        raise ValueError(f"shard {name}: tensors {shapes} do not match {n} rows")
    meta = {
        "format": FORMAT,
        "job": json.dumps(job),
        "keys": json.dumps(rows["keys"]),
        "original_sizes": json.dumps(rows["original_sizes"]),
        "crops_top_left": json.dumps(rows["crops_top_left"]),
        **{field: json.dumps(rows[field]) for field in CONDITIONING_ROWS if field in rows},
    }
    data = safetensors_bytes(tensors, meta)  # sorted header: identical runs, identical bytes
    atomic_write_bytes(out / name, data)
    return {
        "file": name,
        "rows": n,
        "latent_shape": list(next(iter(shapes))[1:]),
        "tensors": sorted(tensors),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "keys": rows["keys"],
        "original_sizes": rows["original_sizes"],
        "crops_top_left": rows["crops_top_left"],
        **{field: rows[field] for field in CONDITIONING_ROWS if field in rows},
    }


def read_shard_entry(path: Path) -> tuple[dict, dict]:
    """A shard read on its own: ``(job, entry)`` from its safetensors header (no tensor data).

    Raises FileNotFoundError when ``path`` is missing and :class:`ShardError` (a ValueError)
    naming the file for anything else: not safetensors, not one of our shards, malformed
    metadata. Nothing else comes out (the reader is fuzzed, tests/test_untrusted_files.py).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such shard file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            names = sorted(f.keys())
            shapes = {n: list(f.get_slice(n).get_shape()) for n in names}
    except Exception as exc:  # safetensors raises SafetensorError, OSError or others on bad headers
        raise ShardError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} shard (no '{FORMAT}' format tag in its metadata)")
    try:
        job = json.loads(meta["job"])
        entry = {
            "file": path.name,
            "tensors": names,
            "keys": json.loads(meta["keys"]),
            "original_sizes": json.loads(meta["original_sizes"]),
            "crops_top_left": json.loads(meta["crops_top_left"]),
            **{field: json.loads(meta[field]) for field in CONDITIONING_ROWS if field in meta},
        }
    except (KeyError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: malformed shard metadata ({type(exc).__name__}: {exc})") from exc
    expected = [{"latents"}, {"mean", "std"}]
    expected += [view | {f"{n}_flip" for n in view} for view in expected]  # with --flip: both views
    shape_set = {tuple(s) for s in shapes.values()}
    if set(names) not in expected or len(shape_set) != 1 or len(next(iter(shape_set))) != 4:
        raise ShardError(f"{path}: expected tensors 'latents' or 'mean'+'std' (each also '_flip' with --flip) "
                         f"of one (N, C, h, w) shape, got {shapes}")
    shape = next(iter(shape_set))
    rows = [entry["keys"], entry["original_sizes"], entry["crops_top_left"]]
    if not isinstance(job, dict) or any(not isinstance(r, list) or len(r) != shape[0] for r in rows):
        raise ShardError(f"{path}: metadata does not describe its {shape[0]} rows")
    entry.update(rows=shape[0], latent_shape=list(shape[1:]))
    return job, entry


# ------------------------------------------------------------------------- job and records
def job_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two jobs that would change the stored latents."""
    diffs = []
    oc, nc = old.get("codec", {}), new.get("codec", {})
    for key in ("weights_sha256", "scaling_factor", "shift_factor", "config"):
        if oc.get(key) != nc.get(key):
            shown = "" if key == "config" else f": {oc.get(key)!r} -> {nc.get(key)!r}"
            diffs.append(f"codec {key}{shown}")
    os_, ns = old.get("settings", {}), new.get("settings", {})
    for key in sorted(set(os_) | set(ns)):
        if os_.get(key) != ns.get(key):
            diffs.append(f"{key}: {os_.get(key)!r} -> {ns.get(key)!r}")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    if (oi.get("count"), oi.get("keys_sha256")) != (ni.get("count"), ni.get("keys_sha256")):
        diffs.append(f"input files: {oi.get('count')} before, {ni.get('count')} now (or renamed)")
    if oi.get("shards") != ni.get("shards"):  # a stream's input set is its list of shards
        diffs.append(f"input shards: {len(oi.get('shards') or [])} before, {len(ni.get('shards') or [])} now "
                     "(or others)")
    return diffs


def check_or_write_job(out: Path, job: dict, write: bool) -> None:
    """Refuse an output made by another job; ``write`` the job file when there is none yet."""
    path = out / JOB_FILE
    if path.exists():
        diffs = job_differences(read_json(path, ShardError), job)
        if diffs:
            raise JobMismatchError(
                f"{out} holds latents of a different job ({'; '.join(diffs)}); rerun with the "
                "original codec and settings to continue it, or choose a new --output "
                "(or delete this one)"
            )
    elif write:
        atomic_write_json(path, job)


def record_path(out: Path, chunk: int) -> Path:
    return out / PARTS_DIR / f"chunk-{chunk:06d}.json"


def load_record(out: Path, chunk: int) -> dict | None:
    """A chunk's commit record if the chunk is complete on disk (record and all its shards)."""
    path = record_path(out, chunk)
    if not path.exists():
        return None
    record = read_json(path, ShardError)
    for shard in record["shards"]:
        f = out / shard["file"]
        if not f.exists() or f.stat().st_size != shard["bytes"]:
            return None  # a shard vanished or was cut: redo the whole chunk
    return record


def merge_manifest(out: Path, job: dict, num_chunks: int, orphans: list[dict] | None = None) -> dict:
    """Merge every chunk record into ``manifest.json`` and delete leftovers of killed runs."""
    shards, skipped, read = [], [], []
    for chunk in range(num_chunks):
        record = load_record(out, chunk)
        if record is None:
            raise RuntimeError(
                f"chunk {chunk} of {out} is not complete; rerun the compress command"
            )
        shards += record["shards"]
        skipped += record["skipped"]
        read += record.get("inputs", [])
    encoded = sum(s["rows"] for s in shards)
    shapes: dict[str, int] = {}
    for s in shards:
        label = "x".join(map(str, s["latent_shape"]))
        shapes[label] = shapes.get(label, 0) + s["rows"]
    job = dict(job)
    if "shards" in job["inputs"]:  # a stream: its input set is what its shards held, known now
        job["inputs"] = {**job["inputs"], "count": len(read), "keys_sha256": keys_digest(read)}
    manifest = dict(job)
    manifest["summary"] = {
        "inputs": job["inputs"]["count"],
        "encoded": encoded,
        "skipped": len(skipped),
        "shards": len(shards),
        "bytes": sum(s["bytes"] for s in shards),
        "latent_shapes": shapes,
    }
    counts = {f"with_{field[:-1]}": sum(v is not None for sh in shards for v in sh.get(field, []))
              for field in CONDITIONING_ROWS}
    if any(counts.values()):  # how many rows have each kind (an image without its caption is kept, counted)
        manifest["summary"].update(counts)
    manifest["shards"] = shards
    manifest["skipped"] = sorted(skipped, key=lambda s: s["key"])
    manifest["orphans"] = orphans or []  # side data without an image (not inputs, so not in skipped)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    # Shards of chunks that were redone under another name and half-written temporaries.
    referenced = {s["file"] for s in shards}
    for folder in (out / SHARD_DIR, out / PARTS_DIR, out):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            stale_shard = folder == out / SHARD_DIR and f"{SHARD_DIR}/{f.name}" not in referenced
            if f.is_file() and (TMP_MARK in f.name or stale_shard):
                f.unlink()
    return manifest


def load_manifest(out: str | os.PathLike) -> dict:
    """``out/manifest.json``; FileNotFoundError when absent, :class:`ShardError` when malformed."""
    out = Path(out)
    path = out / MANIFEST_FILE
    if not path.exists():
        hint = (
            "the compression has not finished: rerun the same compress command to complete it"
            if (out / JOB_FILE).exists()
            else "not a compressed dataset (make one with `vae-codec compress`)"
        )
        raise FileNotFoundError(f"{path} is missing: {hint}")
    manifest = read_json(path, ShardError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest (no '{FORMAT}' format tag)")
    problems = [k for k in ("codec", "inputs", "shards", "skipped") if k not in manifest]
    try:
        if not problems:
            problems = [f"codec.{k}" for k in ("scaling_factor", "shift_factor") if k not in manifest["codec"]]
            for i, shard in enumerate(manifest["shards"]):
                missing = [k for k in ("file", "rows", "latent_shape", "tensors", "keys") if k not in shard]
                problems += [f"shards[{i}].{k}" for k in missing]
    except TypeError:  # a list where a dict belongs, a number where a list belongs...
        problems = ["the expected structure"]
    if problems:
        raise ShardError(f"{path}: malformed manifest, missing {', '.join(problems[:5])}")
    return manifest


# ------------------------------------------------------------------------- verify
def verify(out: str | os.PathLike, input_keys: list[str] | None = None) -> tuple[list[str], dict]:
    """Check manifest vs shards vs inputs; returns ``(problems, summary)``.

    Checks every shard's size, sha256, tensor shapes and row keys against the manifest; that
    every input key appears exactly once (in a shard or in the skipped list) and that the keys
    are the input set the job was started with; and, given ``input_keys`` (the inputs listed
    again now), that no input was added or removed since.
    """
    out = Path(out)
    manifest = load_manifest(out)
    problems: list[str] = []
    seen: dict[str, str] = {}

    def claim(key: str, where: str) -> None:
        if key in seen:
            problems.append(f"{key!r} appears twice: {seen[key]} and {where}")
        seen[key] = where

    for shard in manifest["shards"]:
        path = out / shard["file"]
        if not path.exists():
            problems.append(f"{shard['file']}: missing")
            continue
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: checksum mismatch (the file was changed or damaged)")
            continue
        _, entry = read_shard_entry(path)
        if (entry["keys"], entry["rows"], entry["latent_shape"]) != (
            shard["keys"], shard["rows"], shard["latent_shape"]
        ):
            problems.append(f"{shard['file']}: rows, keys or shape differ from the manifest")
        for key in shard["keys"]:
            claim(key, shard["file"])
    for item in manifest["skipped"]:
        claim(item["key"], "skipped")
    inputs = manifest["inputs"]
    if len(seen) != inputs["count"] or keys_digest(seen) != inputs["keys_sha256"]:
        problems.append(
            f"manifest accounts for {len(seen)} inputs but the job had {inputs['count']} "
            "(or different keys)"
        )
    if input_keys is not None:
        now = set(input_keys)
        missing, extra = sorted(now - set(seen)), sorted(set(seen) - now)
        if missing:
            problems.append(f"{len(missing)} input(s) not in the latents, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{len(extra)} key(s) no longer among the inputs, e.g. {extra[:3]}")
    return problems, manifest["summary"]
