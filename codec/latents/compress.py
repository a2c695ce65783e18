"""Image datasets <-> latent shards: :func:`compress` (resumable, multi-process) and
:func:`decompress`.

The inputs (:mod:`codec.latents.inputs`: image files found recursively, and the image members of
webdataset ``.tar`` shards) are sorted by key and cut into chunks of ``shard_size``. Chunk ``i``
becomes ``shards/{i:06d}-{h}x{w}.safetensors`` (one shard per latent shape) plus the commit
record ``parts/chunk-{i:06d}.json``; see :mod:`codec.latents.shards` for the format. A rerun
skips the chunks whose record exists, so a killed job continues where it stopped and every input
ends up in exactly one shard row or in the skipped list. Under ``accelerate launch`` (or
torchrun) rank ``r`` of ``W`` encodes every ``W``-th pending chunk, and rank 0 merges
``manifest.json``. Because work is divided by chunk (not by rank), a rerun may use a different
number of processes.

Images are decoded, resized and cropped in DataLoader workers (``num_workers``) while the main
process encodes; memory holds at most one chunk of latents plus the loader's prefetched batches,
whatever the dataset size. The commands are :mod:`codec.cli.latents`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from codec.codec import DOWNSAMPLE, Codec
from codec.images import save_image
from codec.io import is_mlp_vae, read_metadata
from codec.latent_space import check as check_space
from codec.latent_space import from_metadata
from codec.latents import shards as sh
from codec.latents.buckets import make_buckets
from codec.latents.chunks import ChunkWriter, noise_id  # noqa: F401  (noise_id: re-exported)
from codec.latents.conditioning import folder_classes, orphans, string_classes
from codec.latents.inputs import ImageInputs, as_list
from codec.latents.shard_inputs import ShardInputs
from codec.launch import distributed_state
from codec.models import load_autoencoder
from codec.sources import is_hf_dataset, is_stream, list_source
from codec.sources.sides import read_metadata_jsonl
from codec.sources.stream import stream_shards
from codec.tiling import check_method


# ------------------------------------------------------------------------- the job
def weights_sha256(vae) -> str:
    """Fingerprint of a model's weights (names, dtypes and bytes), independent of its folder."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_codec(path, device=None, dtype="fp32", batch_size=8, max_memory=None) -> tuple[Codec, dict]:
    """The codec and its description for a manifest (config, factors, weight hash, metadata)."""
    vae = load_autoencoder(path).float()  # hashed in fp32 on the CPU, whatever --dtype is
    meta = read_metadata(path)
    info = {
        # Absolute when local, so decompress finds it from any folder (else a hub id).
        "path": str(Path(path).resolve()) if Path(path).exists() else str(path),
        "weights_sha256": weights_sha256(vae),
        # JSON round trip: tuples become lists, as they read back from job.json.
        "config": json.loads(json.dumps(
            {k: v for k, v in vae.config.items() if not k.startswith("_")}, default=str
        )),
    }
    codec = Codec(vae, device=device, dtype=dtype, batch_size=batch_size, meta=meta, max_memory=max_memory)
    codec.name = info["path"]
    info.update(scaling_factor=codec.scaling_factor, shift_factor=codec.shift_factor, meta=meta,
                latent_space=codec.latent_space)
    return codec, info


def refuse_flat_latents(codec) -> None:
    """Shards hold spatial (C, h, w) latents for diffusion training; the MLP VAE baseline's flat
    (D,) latents of 28-px images are for comparisons, encoded in memory."""
    if is_mlp_vae(codec):
        raise ValueError(
            f"{codec if isinstance(codec, (str, os.PathLike)) else 'this codec'} is the MLP VAE baseline: "
            "compress writes spatial latent shards of kl-f8 codecs (AutoencoderKL, AutoencoderTiny) for "
            "diffusion training. Encode MLP VAE latents with `vae-codec encode` or Codec.encode, or compare "
            "it with `vae-codec eval`"
        )


def compress(
    codec_path,
    source,
    output,
    resolution: int | None = None,
    store: str = "mean",
    latent_dtype: str = "fp16",
    shard_size: int = 1000,
    batch_size: int = 8,
    num_workers: int = 2,
    device: str | None = None,
    dtype: str = "fp32",
    seed: int = 0,
    progress: bool = True,
    flip: bool = False,
    labels: str = "auto",
    buckets: int | None = None,
    bucket_step: int = 64,
    image_column: str = "image",
    split: str = "train",
    streaming: bool = False,
    max_memory: int | str | None = None,
) -> dict | None:
    """Encode every image of ``source`` (any form of :mod:`codec.sources`) into shards under
    ``output``; returns the manifest's summary on the main process (None on the others). See the
    module docstring. The steps: check the settings, list the inputs, describe the job, plan the
    chunks, encode and commit this process's chunks, merge the manifest."""
    from tqdm.auto import tqdm

    bucket_sizes = check_settings(store, latent_dtype, resolution, buckets, bucket_step, labels, shard_size, seed)
    refuse_flat_latents(codec_path)
    state = distributed_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    barrier = state.wait_for_everyone if state else (lambda: None)
    streamed = is_stream(source, streaming)
    if streamed and labels == "folders":
        raise ValueError("--labels folders needs class folders; a stream has none (labels come from .cls/.json)")
    # A stream is encoded one chunk per input shard (its images are known only once read);
    # anything else is listed now, sorted by key and cut into chunks of shard_size.
    shards = stream_shards([source], image_column, split) if streamed else None
    inputs = [] if streamed else list_source(source, image_column, split)
    codec, codec_info = load_codec(codec_path, device=device or (state.device if state else None), dtype=dtype,
                                   batch_size=batch_size, max_memory=max_memory)
    refuse_flat_latents(codec.vae)  # a hub id: known once loaded
    # The class list: class folders (--labels folders), or the string labels of metadata.jsonl /
    # a dataset's label column, so that "cat" is a class index like a folder name is.
    classes = (folder_classes(Path(source), [i.key for i in inputs]) if labels == "folders"
               else None if streamed else label_classes(source, inputs, image_column, split))
    settings = {"resolution": resolution, "store": store, "latent_dtype": latent_dtype, "compute_dtype": dtype,
                "shard_size": shard_size, "seed": seed,
                **({"flip": True} if flip else {}),  # absent when off: jobs written before --flip still match
                **({"buckets": {"budget": buckets, "step": bucket_step}} if buckets is not None else {})}
    job = describe_job(codec_info, settings, classes, _input_set(source, inputs, shards, image_column, split))
    out = Path(output)
    num_chunks = len(shards) if streamed else math.ceil(len(inputs) / shard_size)
    pending = plan_chunks(out, job, num_chunks, rank == 0, barrier)
    mine = pending[rank::world]
    if streamed:
        dataset, total = ShardInputs(shards, mine, resolution, bucket_sizes), None
    else:
        indices = [i for c in mine for i in range(c * shard_size, min((c + 1) * shard_size, len(inputs)))]
        dataset, total = ImageInputs(inputs, indices, resolution, bucket_sizes, classes), len(indices)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=min(num_workers, len(mine)) if streamed else num_workers,
        collate_fn=as_list, prefetch_factor=4 if num_workers else None,
    )
    writer = ChunkWriter(codec, job, out, rank, streamed, batch_size, classes, labels == "folders")
    with tqdm(total=total, unit="img", disable=not (progress and rank == 0), dynamic_ncols=True,
              desc=f"encoding (rank 0 of {world})" if world > 1 else "encoding") as bar:
        writer.encode_all(loader, inputs, shard_size, bar)
    barrier()
    if rank != 0:
        return None
    source_dir = Path(source)
    found_orphans = (orphans(source_dir, [i.path for i in inputs if i.offset < 0], read_metadata_jsonl(source_dir))
                     if source_dir.is_dir() and not is_hf_dataset(source) else [])
    manifest = sh.merge_manifest(out, job, num_chunks, found_orphans)
    report(manifest, source, out, f"{len(pending)} of {num_chunks} chunks encoded by this run ({world} process(es))")
    return manifest["summary"]


def check_settings(store, latent_dtype, resolution, buckets, bucket_step, labels, shard_size, seed) -> list | None:
    """Refuse bad settings before any work; returns the aspect-ratio buckets (None: off)."""
    if store not in sh.STORES:
        raise ValueError(f"unknown store {store!r}; choose from {list(sh.STORES)}")
    if latent_dtype not in sh.LATENT_DTYPES:
        raise ValueError(f"unknown latent dtype {latent_dtype!r}; choose from {sorted(sh.LATENT_DTYPES)}")
    if resolution is not None and (resolution <= 0 or resolution % DOWNSAMPLE):
        raise ValueError(f"--resolution must be a positive multiple of {DOWNSAMPLE}, got {resolution}")
    if buckets is not None and resolution is not None:
        raise ValueError("--buckets and --resolution exclude each other (buckets choose each image's size)")
    if labels not in ("auto", "folders"):
        raise ValueError(f"unknown labels {labels!r}; choose from ['auto', 'folders']")
    if shard_size < 1 or seed < 0:
        raise ValueError("--shard-size must be >= 1 and --seed >= 0")
    return make_buckets(buckets, bucket_step) if buckets is not None else None


def describe_job(codec_info: dict, settings: dict, classes: list[str] | None, inputs: dict) -> dict:
    """What is being made (``job.json``): a rerun with anything else is another job, refused."""
    return {
        "format": sh.FORMAT,
        "version": sh.VERSION,
        "codec": codec_info,
        "settings": settings,
        # the class list (label i is classes[i]), in the job so a rerun with other classes is another job
        **({"classes": classes} if classes else {}),
        "inputs": inputs,
    }


def plan_chunks(out: Path, job: dict, num_chunks: int, is_main: bool, barrier) -> list[int]:
    """Check (every rank) and write (rank 0) the job; the chunks without a commit record, the same
    list on every rank before any rank commits one."""
    sh.check_or_write_job(out, job, write=False)  # every rank refuses before anyone writes
    if is_main:
        sh.check_or_write_job(out, job, write=True)
    barrier()
    pending = [c for c in range(num_chunks) if sh.load_record(out, c) is None]
    barrier()
    return pending


def report(manifest: dict, source, out: Path, work: str) -> None:
    """The summary a user reads: inputs = encoded + skipped, shards, conditioning, the first skips."""
    s = manifest["summary"]
    print(f"{source} -> {out}: {s['inputs']} inputs = {s['encoded']} encoded + {s['skipped']} skipped; "
          f"{s['shards']} shards, {s['bytes'] / 1e6:.2f} MB, latent shapes {s['latent_shapes']}; {work}")
    if "with_label" in s:
        print(f"  conditioning: {s['with_label']} with a label, {s['with_caption']} with a caption, "
              f"{s['with_meta']} with JSON meta (of {s['encoded']} encoded)")
    if manifest["orphans"]:
        print(f"  {len(manifest['orphans'])} side file(s) or metadata row(s) without an image, listed as "
              f"'orphans' in {out / sh.MANIFEST_FILE}")
    for item in manifest["skipped"][:10]:
        print(f"  skipped {item['key']}: {item['reason'].removeprefix(item['key'] + ': ')}")
    if len(manifest["skipped"]) > 10:
        print(f"  ... and {len(manifest['skipped']) - 10} more, all listed in {out / sh.MANIFEST_FILE}")


def _input_set(source, inputs: list, shards: list | None, image_column: str, split: str) -> dict:
    """The job's input set: the listed keys (count + hash), or a stream's shards (its keys are
    added to the manifest from the chunk records, once read)."""
    local = Path(str(source))
    where = str(local.resolve()) if local.exists() else str(source)  # absolute: verify lists it again later
    dataset = {"image_column": image_column, "split": split} if is_hf_dataset(source) else {}
    if shards is not None:
        return {"source": where, "shards": [s.where for s in shards], **dataset}
    return {"source": where, "count": len(inputs), "keys_sha256": sh.keys_digest(i.key for i in inputs), **dataset}


def label_classes(source, inputs: list, image_column: str, split: str) -> list[str] | None:
    """The class names of string labels (metadata.jsonl rows, a dataset's string label column),
    sorted; None when labels are indices or absent."""
    if is_hf_dataset(source):
        from codec.sources.hf import open_dataset
        from codec.sources.hf import string_classes as dataset_classes

        return dataset_classes(open_dataset(str(source), image_column, split))
    return string_classes(i.record for i in inputs)


# ------------------------------------------------------------------------- decompress
def codec_of_latents(manifest: dict, codec_path=None, force: bool = False, option: str = "--codec",
                     **kwargs) -> Codec:
    """The codec a compress job was made with (its recorded path unless ``codec_path``), refusing
    one of another latent space (:mod:`codec.latent_space`) unless ``force`` (then a warning);
    ``option`` is how the caller's user names the codec, for the message."""
    made_by = manifest["codec"]
    codec, info = load_codec(codec_path or made_by["path"], **kwargs)
    recorded = made_by.get("latent_space")
    if recorded is None:  # a job written before latent spaces were recorded: its whole-weights hash
        recorded = {**info["latent_space"], "codec": made_by["path"]}
        if info["weights_sha256"] != made_by["weights_sha256"]:
            recorded["encoder_sha256"] = f"weights {made_by['weights_sha256']}"
        recorded.update({k: made_by["config"].get(k) for k in ("latents_mean", "latents_std")},
                        scaling_factor=made_by["scaling_factor"], shift_factor=made_by["shift_factor"])
    warning = check_space(from_metadata(json.dumps(recorded), "the manifest's codec.latent_space"),
                          codec.latent_space, "these latents", force=force,
                          fix=f"pass the codec that made them with {option}"
                              + (" (or --force to decode anyway)" if option == "--codec" else ""))
    if warning:
        print(warning, file=sys.stderr)
    return codec


def decompress(
    latents_dir, output, codec_path=None, device=None, dtype="fp32", batch_size=8,
    tile_size=None, tile_overlap=None, tile_method=None, max_memory=None, force: bool = False,
    limit: int | None = None, keys: list[str] | None = None,
) -> int:
    """Decode shard rows to ``output/<key>.png`` (the suffix replaced): every row, the rows of
    ``keys`` (an unknown key is an error naming it), at most ``limit`` of them; returns the count."""
    from safetensors import safe_open

    out_dir, src = Path(output), Path(latents_dir)
    manifest = sh.load_manifest(src)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if keys is not None:
        missing = sorted(set(keys) - {k for shard in manifest["shards"] for k in shard["keys"]})
        if missing:
            raise ValueError(f"{src}: no latents for the key(s) {missing[:5]}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    codec = codec_of_latents(manifest, codec_path, force=force, device=device, dtype=dtype,
                             batch_size=batch_size, max_memory=max_memory)
    codec.tile_size, codec.tile_overlap = tile_size, tile_overlap
    codec.tile_method = codec.tile_method if tile_method is None else check_method(tile_method)
    wanted = None if keys is None else set(keys)
    used, count = set(), 0
    for shard in manifest["shards"]:
        rows = [i for i, k in enumerate(shard["keys"]) if wanted is None or k in wanted]
        rows = rows[: None if limit is None else limit - count]
        if not rows:
            continue
        with safe_open(str(src / shard["file"]), "pt") as f:
            latents = f.get_tensor("latents" if "latents" in shard["tensors"] else "mean")[rows]
        images = codec.decode(latents.float())
        for key, image in zip([shard["keys"][i] for i in rows], images):
            name = Path(key).with_suffix(".png").as_posix()
            if name in used:  # "a.jpg" and "a.png" both exist: keep both
                name = key + ".png"
            used.add(name)
            save_image(image, out_dir / name)
            count += 1
        if limit is not None and count >= limit:
            break
    return count
