"""``vae-codec compress | verify | decompress | scale``: image datasets <-> latent shards.

Compressing: the inputs (image files found recursively, and the image members of webdataset
``.tar`` shards) are sorted by key and cut into chunks of ``--shard-size``. Chunk ``i`` becomes
``shards/{i:06d}-{h}x{w}.safetensors`` (one shard per latent shape) plus the commit record
``parts/chunk-{i:06d}.json``; see :mod:`codec.shards` for the format. A rerun skips the chunks
whose record exists, so a killed job continues where it stopped and every input ends up in
exactly one shard row or in the skipped list. Under ``accelerate launch`` (or torchrun) rank
``r`` of ``W`` encodes every ``W``-th pending chunk, and rank 0 merges ``manifest.json``.
Because work is divided by chunk (not by rank), a rerun may use a different number of processes.

Images are decoded, resized and cropped in DataLoader workers (``--num-workers``) while the main
process encodes; memory holds at most one chunk of latents plus the loader's prefetched batches,
whatever the dataset size.

Sizes: ``--resolution R`` resizes the short side to R (bicubic, antialiased) and centre-crops
R x R (smaller images are upscaled). Without it images keep their size, centre-cropped down to
multiples of 8 (at most 7 pixels per side; images under 8 x 8 are skipped).

``python -m codec.compress ...`` (and ``accelerate launch -m codec.compress ...``) is the same
as ``vae-codec compress ...``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import shards as sh
from . import single_file
from .codec import DOWNSAMPLE, Codec
from .factors import scale_latents, scale_std
from .images import IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image, save_image
from .models import load_autoencoder
from .tiling import check_method

COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


# ------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Input:
    """One input image: a file, or a member of an uncompressed tar (``offset``/``size`` >= 0)."""

    key: str
    path: str
    offset: int = -1
    size: int = -1


def list_inputs(source: str | os.PathLike) -> list[Input]:
    """Every input image under ``source``, sorted by key; keys are unique.

    ``source`` is a folder (images found recursively, keyed by relative path, plus every
    ``.tar`` in it, whose images are keyed ``relative/shard.tar/member``), a single ``.tar``
    (keyed by member name), a file list (.txt) or one image.
    """
    source = Path(source)
    if source.is_file() and source.name.endswith(".tar"):
        return _sorted_unique(_tar_members(source, prefix=""))
    if source.is_dir():
        items = [Input(p.relative_to(source).as_posix(), str(p)) for p in list_images(source)]
        for archive in sorted(source.rglob("*")):
            name = archive.name.lower()
            if name.endswith(COMPRESSED_TARS):
                raise ValueError(
                    f"{archive}: compressed tar archives cannot be read by random access; "
                    "decompress it (e.g. `gunzip`) to a plain .tar, or extract it"
                )
            if name.endswith(".tar") and archive.is_file():
                items += _tar_members(archive, prefix=archive.relative_to(source).as_posix() + "/")
        return _sorted_unique(items)
    files = list_images(source)  # a file list or one image; raises FileNotFoundError otherwise
    base = source.parent
    return _sorted_unique(
        Input(p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p), str(p))
        for p in files
    )


def _tar_members(path: Path, prefix: str) -> list[Input]:
    """Image members of an uncompressed tar with their byte ranges (webdataset layout)."""
    items = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS:
                    items.append(Input(prefix + m.name, str(path), m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise ValueError(f"{path}: cannot list this tar ({exc}); repair or remove it") from exc
    return items


def _sorted_unique(items) -> list[Input]:
    items = sorted(items, key=lambda it: it.key)
    for a, b in zip(items, items[1:]):
        if a.key == b.key:
            raise ValueError(f"two inputs share the key {a.key!r} ({a.path}, {b.path}); rename one")
    return items


def read_input(item: Input) -> Image.Image:
    if item.offset < 0:
        return load_image(item.path)
    try:
        with open(item.path, "rb") as fh:
            fh.seek(item.offset)
            data = fh.read(item.size)
    except OSError as exc:
        raise ImageLoadError(f"{item.key}: cannot read {item.path} ({exc})") from exc
    if len(data) != item.size:
        raise ImageLoadError(f"{item.key}: tar member cut short ({len(data)} of {item.size} bytes)")
    return load_image(io.BytesIO(data), name=item.key)


def fit(img: Image.Image, resolution: int | None) -> tuple[torch.Tensor, list[int], list[int]]:
    """RGB image -> ((3, h, w) uint8 tensor, original [h, w], crop top-left [top, left]).

    The crop's corner is in the resized image (what SDXL-style size conditioning wants).
    """
    w, h = img.size
    if resolution:
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        th = tw = resolution
    else:
        if w < DOWNSAMPLE or h < DOWNSAMPLE:
            raise ImageLoadError(
                f"{w}x{h} is smaller than {DOWNSAMPLE}x{DOWNSAMPLE} pixels; "
                "pass --resolution to upscale it"
            )
        nw, nh, th, tw = w, h, h - h % DOWNSAMPLE, w - w % DOWNSAMPLE
    top, left = (nh - th) // 2, (nw - tw) // 2
    arr = np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1), [h, w], [top, left]


class ImageInputs(Dataset):
    """Decoded, fitted images of ``inputs[indices]``; a bad file gives an item with ``error``."""

    def __init__(self, inputs: list[Input], indices: list[int], resolution: int | None):
        self.inputs, self.indices, self.resolution = inputs, indices, resolution

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        item = {"index": index, "image": None, "error": None}
        try:
            image, size, crop = fit(read_input(self.inputs[index]), self.resolution)
        except ImageLoadError as exc:
            item["error"] = str(exc)
            return item
        item.update(image=image, original_size=size, crop_top_left=crop)
        return item


def as_list(batch: list) -> list:
    """collate_fn: keep items apart (sizes differ; the encoder groups them by shape)."""
    return batch


# ------------------------------------------------------------------------- the job
def weights_sha256(vae) -> str:
    """Fingerprint of a model's weights (names, dtypes and bytes), independent of its folder."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_codec(path, device=None, dtype="fp32", batch_size=8) -> tuple[Codec, dict]:
    """The codec and its description for a manifest (config, factors, weight hash, metadata)."""
    vae = load_autoencoder(path).float()  # hashed in fp32 on the CPU, whatever --dtype is
    meta_path = Path(path) / "vae_codec.json"
    meta = sh.read_json(meta_path) if meta_path.exists() else {}
    if single_file.is_single_file(path):  # metadata lives in the file's header
        meta = json.loads(single_file.read_header(path).get(single_file.META_KEY, "{}"))
    info = {
        # Absolute when local, so decompress finds it from any folder (else a hub id).
        "path": str(Path(path).resolve()) if Path(path).exists() else str(path),
        "weights_sha256": weights_sha256(vae),
        # JSON round trip: tuples become lists, as they read back from job.json.
        "config": json.loads(json.dumps(
            {k: v for k, v in vae.config.items() if not k.startswith("_")}, default=str
        )),
    }
    codec = Codec(vae, device=device, dtype=dtype, batch_size=batch_size, meta=meta)
    info.update(scaling_factor=codec.scaling_factor, shift_factor=codec.shift_factor, meta=meta)
    return codec, info


def _distributed_state():
    """accelerate's PartialState when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # Imported only here: encoding on one process must not need (or pay for) accelerate.
    from accelerate import PartialState

    # Without a GPU, torchrun workers must be told they are CPU (gloo) processes.
    return PartialState(cpu=not torch.cuda.is_available())


class _Chunk:
    """One chunk's encoded rows, grouped by latent shape, until its shards are written."""

    def __init__(self, chunk: int):
        self.id = chunk
        self.pending: dict[tuple, list[dict]] = {}  # (h, w) -> decoded items not yet encoded
        self.groups: dict[tuple, dict] = {}  # (h, w) -> {"tensors": {name: [..]}, row lists}
        self.skipped: list[dict] = []


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
) -> dict | None:
    """Encode every image of ``source`` into shards under ``output``; returns the manifest's
    summary on the main process (None on the others). See the module docstring."""
    from tqdm.auto import tqdm

    if store not in sh.STORES:
        raise ValueError(f"unknown store {store!r}; choose from {list(sh.STORES)}")
    if latent_dtype not in sh.LATENT_DTYPES:
        raise ValueError(
            f"unknown latent dtype {latent_dtype!r}; choose from {sorted(sh.LATENT_DTYPES)}"
        )
    if resolution is not None and (resolution <= 0 or resolution % DOWNSAMPLE):
        raise ValueError(
            f"--resolution must be a positive multiple of {DOWNSAMPLE}, got {resolution}"
        )
    if shard_size < 1 or seed < 0:
        raise ValueError("--shard-size must be >= 1 and --seed >= 0")

    state = _distributed_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    barrier = state.wait_for_everyone if state else (lambda: None)
    is_main = rank == 0
    inputs = list_inputs(source)
    if not inputs:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards found in {source}"
        )
    device = device or (state.device if state else None)
    codec, codec_info = load_codec(codec_path, device=device, dtype=dtype, batch_size=batch_size)
    job = {
        "format": sh.FORMAT,
        "version": sh.VERSION,
        "codec": codec_info,
        "settings": {
            "resolution": resolution, "store": store, "latent_dtype": latent_dtype,
            "compute_dtype": dtype, "shard_size": shard_size, "seed": seed,
        },
        "inputs": {
            "source": str(Path(source).resolve()),  # absolute: verify lists it again later
            "count": len(inputs),
            "keys_sha256": sh.keys_digest(i.key for i in inputs),
        },
    }
    out = Path(output)
    sh.check_or_write_job(out, job, write=False)  # every rank refuses before anyone writes
    if is_main:
        sh.check_or_write_job(out, job, write=True)
    barrier()
    num_chunks = math.ceil(len(inputs) / shard_size)
    pending = [c for c in range(num_chunks) if sh.load_record(out, c) is None]
    barrier()  # all ranks list the same pending chunks before any rank commits one
    mine = pending[rank::world]
    indices = [
        i for c in mine for i in range(c * shard_size, min((c + 1) * shard_size, len(inputs)))
    ]

    loader = DataLoader(
        ImageInputs(inputs, indices, resolution), batch_size=batch_size, num_workers=num_workers,
        collate_fn=as_list, prefetch_factor=4 if num_workers else None,
    )
    storage = sh.LATENT_DTYPES[latent_dtype]

    def encode(items: list[dict]) -> dict[str, torch.Tensor]:
        # uint8 travels to the device (4x fewer bytes than float), then [0, 255] -> [-1, 1].
        x = torch.stack([it["image"] for it in items]).to(codec.device)
        x = x.float().div_(127.5).sub_(1.0)
        mean, logvar = codec.posterior(x)  # (B, C, h, w) unscaled, float32 on the CPU
        # The factors exactly as Codec.encode / diffusers pipelines apply them (codec.factors).
        mean_s = scale_latents(mean, codec.vae.config)
        std_s = scale_std(torch.exp(0.5 * logvar), codec.vae.config)
        if store == "mean":
            return {"latents": mean_s}
        if store == "mean_std":
            return {"mean": mean_s, "std": std_s}
        # One random stream per (seed, input): the sample does not depend on batching, ranks or
        # resumes. numpy's SeedSequence takes both numbers (torch's CPU seed keeps only 32 bits).
        noise = torch.from_numpy(np.stack([
            np.random.default_rng([seed, it["index"]]).standard_normal(
                mean.shape[1:], dtype=np.float32
            )
            for it in items
        ]))
        return {"latents": mean_s + std_s * noise}

    def flush(chunk: _Chunk, hw: tuple) -> None:
        items = chunk.pending.pop(hw, [])
        if not items:
            return
        group = chunk.groups.setdefault(
            hw, {"tensors": {}, "keys": [], "original_sizes": [], "crops_top_left": []}
        )
        for name, t in encode(items).items():
            group["tensors"].setdefault(name, []).append(t.to(storage))
        group["keys"] += [inputs[it["index"]].key for it in items]
        group["original_sizes"] += [it["original_size"] for it in items]
        group["crops_top_left"] += [it["crop_top_left"] for it in items]

    def commit(chunk: _Chunk) -> None:
        for hw in list(chunk.pending):
            flush(chunk, hw)
        entries = []
        for hw, group in sorted(chunk.groups.items()):
            tensors = {name: torch.cat(parts) for name, parts in group.pop("tensors").items()}
            for name, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise ValueError(
                        f"{name} latents of chunk {chunk.id} overflow {latent_dtype}; "
                        "use --latent-dtype fp32 (or bf16)"
                    )
            name = sh.shard_name(chunk.id, (hw[0] // DOWNSAMPLE, hw[1] // DOWNSAMPLE))
            entries.append(sh.write_shard(out, name, tensors, group, job))
        # The record is written last: it is what makes the chunk count as done.
        record = {"chunk": chunk.id, "rank": rank, "shards": entries, "skipped": chunk.skipped}
        sh.atomic_write_json(sh.record_path(out, chunk.id), record)

    bar = tqdm(
        total=len(indices), unit="img", disable=not (progress and is_main), dynamic_ncols=True,
        desc=f"encoding (rank 0 of {world})" if world > 1 else "encoding",
    )
    chunk = None
    with bar:
        for batch in loader:
            for item in batch:
                c = item["index"] // shard_size
                if chunk is None or chunk.id != c:
                    if chunk is not None:
                        commit(chunk)
                    chunk = _Chunk(c)
                if item["error"] is not None:
                    key = inputs[item["index"]].key
                    chunk.skipped.append({"key": key, "reason": item["error"]})
                    continue
                hw = tuple(item["image"].shape[-2:])
                chunk.pending.setdefault(hw, []).append(item)
                if len(chunk.pending[hw]) >= batch_size:
                    flush(chunk, hw)
            bar.update(len(batch))
        if chunk is not None:
            commit(chunk)
    barrier()
    if not is_main:
        return None
    manifest = sh.merge_manifest(out, job, num_chunks)
    s = manifest["summary"]
    print(
        f"{source} -> {out}: {s['inputs']} inputs = {s['encoded']} encoded + "
        f"{s['skipped']} skipped; "
        f"{s['shards']} shards, {s['bytes'] / 1e6:.2f} MB, latent shapes {s['latent_shapes']}; "
        f"{len(pending)} of {num_chunks} chunks encoded by this run ({world} process(es))"
    )
    for item in manifest["skipped"][:10]:
        print(f"  skipped {item['key']}: {item['reason']}")
    if len(manifest["skipped"]) > 10:
        more = len(manifest["skipped"]) - 10
        print(f"  ... and {more} more, all listed in {out / sh.MANIFEST_FILE}")
    return s


# ------------------------------------------------------------------------- decompress
def codec_of_latents(manifest: dict, codec_path=None, **kwargs) -> Codec:
    """The codec a compress job was made with (its recorded path unless ``codec_path``),
    refusing any other: latents decode only with the weights and factors that made them."""
    made_by = manifest["codec"]
    codec, info = load_codec(codec_path or made_by["path"], **kwargs)
    per_channel = ("latents_mean", "latents_std")
    if (info["weights_sha256"], info["scaling_factor"], info["shift_factor"]) != (
        made_by["weights_sha256"], made_by["scaling_factor"], made_by["shift_factor"]
    ) or [info["config"].get(k) for k in per_channel] != [made_by["config"].get(k) for k in per_channel]:
        raise ValueError(
            f"{codec_path or made_by['path']} is not the codec these latents were made with "
            f"(weights {made_by['weights_sha256'][:12]}, "
            f"scaling_factor {made_by['scaling_factor']}); "
            "pass that codec with --codec"
        )
    return codec


def decompress(
    latents_dir, output, codec_path=None, device=None, dtype="fp32", batch_size=8,
    tile_size=None, tile_overlap=None, tile_method=None,
) -> int:
    """Decode every shard row to ``output/<key>.png`` (the suffix replaced); returns the count."""
    from safetensors import safe_open

    out_dir, src = Path(output), Path(latents_dir)
    manifest = sh.load_manifest(src)
    codec = codec_of_latents(manifest, codec_path, device=device, dtype=dtype, batch_size=batch_size)
    codec.tile_size, codec.tile_overlap = tile_size, tile_overlap
    codec.tile_method = codec.tile_method if tile_method is None else check_method(tile_method)
    used, count = set(), 0
    for shard in manifest["shards"]:
        with safe_open(str(src / shard["file"]), "pt") as f:
            latents = f.get_tensor("latents" if "latents" in shard["tensors"] else "mean")
        images = codec.decode(latents.float())
        for key, image in zip(shard["keys"], images):
            name = Path(key).with_suffix(".png").as_posix()
            if name in used:  # "a.jpg" and "a.png" both exist: keep both
                name = key + ".png"
            used.add(name)
            save_image(image, out_dir / name)
            count += 1
    return count


# ------------------------------------------------------------------------- scale
def measure_scale(
    codec: Codec, source, resolution: int, samples: int, num_workers: int, seed: int
) -> dict:
    """Latent statistics (``Codec.measure_factors``) of up to ``samples`` images spread over
    ``source``, centre-cropped to ``resolution``; unreadable files are listed in "skipped"."""
    inputs = list_inputs(source)
    if not inputs:
        raise ValueError(f"no images found in {source}")
    step = max(1, len(inputs) // samples)
    indices = list(range(0, len(inputs), step))[:samples]
    loader = DataLoader(
        ImageInputs(inputs, indices, resolution), batch_size=codec.batch_size,
        num_workers=num_workers, collate_fn=as_list,
    )
    skipped = []

    def batches():
        for batch in loader:
            skipped.extend(it["error"] for it in batch if it["error"] is not None)
            good = [it["image"] for it in batch if it["error"] is None]
            if good:
                yield torch.stack(good).float().div_(127.5).sub_(1.0)

    stats = codec.measure_factors(batches(), generator=torch.Generator().manual_seed(seed))
    stats["skipped"] = skipped
    return stats


# ------------------------------------------------------------------------- CLI
def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def register(sub, codec_args) -> None:
    """Add compress / verify / decompress / scale to the ``vae-codec`` parser."""
    p = sub.add_parser("compress", help="image folder / tar shards -> latent shards (resumable)")
    codec_args(p)
    p.add_argument("--input", required=True,
                   help="image folder (recursive, .tar shards included), a .tar, or a file list")
    p.add_argument("--output", required=True, help="folder for shards/ and manifest.json")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize the short side and centre-crop to this square "
                   "(default: native size, cropped to multiples of 8)")
    p.add_argument("--store", default="mean", choices=list(sh.STORES),
                   help="posterior mean, one posterior sample, or mean and std "
                   "(fresh samples every epoch)")
    p.add_argument("--latent-dtype", default="fp16", choices=sorted(sh.LATENT_DTYPES))
    p.add_argument("--shard-size", type=int, default=1000,
                   help="inputs per chunk (one shard per latent shape)")
    p.add_argument("--num-workers", type=int, default=_default_workers(),
                   help="image decoding processes")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the posterior samples of --store sample")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("verify",
                       help="check latent shards: checksums, manifest vs shards vs inputs")
    p.add_argument("latents", help="a folder written by `vae-codec compress`")
    p.add_argument("--input", default=None, help="list these inputs again and compare "
                   "(default: the job's input, if it still exists)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("decompress", help="latent shards -> PNG images (decoded)")
    p.add_argument("latents")
    p.add_argument("output")
    p.add_argument("--codec", default=None,
                   help="codec folder (default: the one named in the manifest)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=int, default=8)
    from .cli import tile_args
    tile_args(p)
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("scale",
                       help="measure scaling_factor (and shift) on images, write it into the codec")
    codec_args(p)
    p.add_argument("--input", required=True, help="image folder, .tar or file list")
    p.add_argument("--resolution", type=int, default=256,
                   help="centre crop the statistics are measured on")
    p.add_argument("--samples", type=int, default=512, help="images used, spread over the input")
    p.add_argument("--shift", action="store_true",
                   help="also set shift_factor to the latent mean (SD3/Flux style)")
    p.add_argument("--per-channel", action="store_true",
                   help="set latents_mean/latents_std per channel instead (SDXL style; "
                        "scaling_factor becomes 1)")
    p.add_argument("--output", default=None,
                   help="write the codec here instead of updating --codec in place")
    p.add_argument("--num-workers", type=int, default=_default_workers())
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scale)


def cmd_compress(args) -> int:
    compress(
        args.codec, args.input, args.output, resolution=args.resolution, store=args.store,
        latent_dtype=args.latent_dtype, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, dtype=args.dtype, seed=args.seed,
        progress=not args.no_progress,
    )
    return 0


def cmd_verify(args) -> int:
    manifest = sh.load_manifest(args.latents)
    source = args.input or manifest["inputs"]["source"]
    keys = None
    if Path(source).exists():
        keys = [i.key for i in list_inputs(source)]
    else:
        print(f"note: input {source} is not reachable; checked the manifest's own input list only")
    problems, s = sh.verify(args.latents, keys)
    for p in problems:
        print(f"problem: {p}")
    if problems:
        print(f"{args.latents}: {len(problems)} problem(s)")
        return 1
    print(
        f"{args.latents}: OK, {s['inputs']} inputs = {s['encoded']} in {s['shards']} shards "
        f"+ {s['skipped']} skipped; checksums match"
        + ("; inputs match" if keys is not None else "")
    )
    return 0


def cmd_decompress(args) -> int:
    n = decompress(
        args.latents, args.output, args.codec, args.device, args.dtype, args.batch_size,
        args.tile_size, args.tile_overlap, args.tile_method,
    )
    print(f"decoded {n} images into {args.output}")
    return 0


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def cmd_scale(args) -> int:
    if args.shift and args.per_channel:
        raise ValueError("--shift and --per-channel exclude each other (no pipeline applies both)")
    target = Path(args.output or args.codec)
    if args.output is None and not (target / "config.json").exists():
        raise ValueError(
            f"{target} has no config.json to update (a pipeline folder?); pass --output DIR"
        )
    if args.resolution <= 0 or args.resolution % DOWNSAMPLE:
        raise ValueError(f"--resolution must be a positive multiple of {DOWNSAMPLE}")
    codec = Codec.from_pretrained(
        args.codec, device=args.device, dtype=args.dtype, batch_size=args.batch_size
    )
    before = codec.scaling_factor
    stats = measure_scale(
        codec, args.input, args.resolution, args.samples, args.num_workers, args.seed
    )
    if args.per_channel:  # latents_mean/std carry the scale; scaling_factor 1 keeps it unit
        codec.set_factors(1.0, None, stats["channel_mean"], stats["channel_std"])
    else:
        codec.set_factors(stats["scaling_factor"], stats["mean"] if args.shift else None)
    codec.meta["latent_stats"] = {k: v for k, v in stats.items() if k != "skipped"}
    # Saved beside and renamed in: the weights being overwritten may still be memory-mapped.
    tmp = target.parent / f"{target.name}{sh.TMP_MARK}scale"
    codec.save_pretrained(tmp)
    target.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, target / f.name)
    tmp.rmdir()
    shift = f", shift_factor {codec.shift_factor:.5f}" if args.shift else ""
    if args.per_channel:
        shift = f", latents_mean {_fmt(stats['channel_mean'])}, latents_std {_fmt(stats['channel_std'])}"
    print(
        f"scaling_factor {before:.5f} -> {codec.scaling_factor:.5f}{shift} (1 / std of posterior "
        f"samples over {stats['num_images']} images, {len(stats['skipped'])} unreadable); "
        f"written to {target}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m codec.compress ARGS`` == ``vae-codec compress ARGS``."""
    from .cli import main as cli_main
    from .launch import relaunch_if_needed

    argv = sys.argv[1:] if argv is None else argv
    relaunched = relaunch_if_needed("codec.compress", argv)
    return relaunched if relaunched is not None else cli_main(["compress", *argv])


if __name__ == "__main__":
    sys.exit(main())
