"""Encoding the items of a compress job into chunks, and committing each chunk as its shards.

Items arrive from the loader in order; each belongs to one chunk (a slice of the input list, or a
stream's shard). Items are grouped by size and encoded a batch at a time; when a chunk is complete
(the next chunk starts, or a stream says its shard ended) its rows are written as one shard per
latent shape and then its commit record, the file that makes the chunk count as done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from codec.codec import DOWNSAMPLE, Codec
from codec.factors import scale_latents, scale_std
from codec.latents import shards as sh


@dataclass
class Chunk:
    """One chunk's encoded rows, grouped by latent shape, until its shards are written."""

    id: int
    pending: dict = field(default_factory=dict)  # (h, w) -> decoded items not yet encoded
    groups: dict = field(default_factory=dict)  # (h, w) -> {"tensors": {name: [..]}, row lists}
    skipped: list = field(default_factory=list)
    inputs: list = field(default_factory=list)  # the keys of every input read for this chunk


def noise_id(item: dict) -> list[int]:
    """What seeds an input's posterior noise: its index in the input list, or (shard, image) of a
    stream; independent of batching, ranks and resumes."""
    return [item["chunk"], item["index"], 0] if "chunk" in item else [item["index"]]


@dataclass
class ChunkWriter:
    """Encodes items the way the job says (store, flip, seed, storage dtype) and commits chunks."""

    codec: Codec
    job: dict
    out: Path
    rank: int
    streamed: bool
    batch_size: int
    classes: list[str] | None  # --labels folders: the class folders (else labels come with the items)
    folder_labels: bool

    @property
    def settings(self) -> dict:
        return self.job["settings"]

    def label_of(self, item: dict) -> int | None:
        if not self.folder_labels:
            return item["label"]
        key = item["key"]
        folder = key.split("/", 1)[0]
        return self.classes.index(folder) if "/" in key and folder in self.classes else None

    def add(self, chunk: Chunk, item: dict) -> None:
        """One decoded item (or its error) into its chunk; encodes a full batch of its size."""
        chunk.inputs.append(item["key"])
        if item["error"] is None and self.folder_labels and self.label_of(item) is None:
            item["error"] = "not in a class folder (--labels folders)"
        if item["error"] is not None:
            chunk.skipped.append({"key": item["key"], "reason": item["error"]})
            return
        hw = tuple(item["image"].shape[-2:])
        chunk.pending.setdefault(hw, []).append(item)
        if len(chunk.pending[hw]) >= self.batch_size:
            self.flush(chunk, hw)

    def encode(self, items: list[dict]) -> dict[str, torch.Tensor]:
        # uint8 travels to the device (4x fewer bytes than float), then [0, 255] -> [-1, 1].
        x = torch.stack([it["image"] for it in items]).to(self.codec.device)
        x = x.float().div_(127.5).sub_(1.0)
        tensors = self.encode_view(x, items, view=0)
        if self.settings.get("flip"):  # the mirrored image's latent (the encoder is not equivariant)
            tensors.update({f"{k}_flip": v for k, v in self.encode_view(x.flip(-1), items, view=1).items()})
        return tensors

    def encode_view(self, x: torch.Tensor, items: list[dict], view: int) -> dict[str, torch.Tensor]:
        codec, store = self.codec, self.settings["store"]
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
        seed = self.settings["seed"]
        noise = torch.from_numpy(np.stack([
            np.random.default_rng([seed, *noise_id(it)] + ([view] if view else [])).standard_normal(
                mean.shape[1:], dtype=np.float32)
            for it in items
        ]))
        return {"latents": mean_s + std_s * noise}

    def flush(self, chunk: Chunk, hw: tuple) -> None:
        items = chunk.pending.pop(hw, [])
        if not items:
            return
        group = chunk.groups.setdefault(hw, {"tensors": {}, "keys": [], "original_sizes": [], "crops_top_left": [],
                                             "labels": [], "captions": [], "metas": []})
        storage = sh.LATENT_DTYPES[self.settings["latent_dtype"]]
        for name, t in self.encode(items).items():
            group["tensors"].setdefault(name, []).append(t.to(storage))
        group["keys"] += [it["key"] for it in items]
        group["original_sizes"] += [it["original_size"] for it in items]
        group["crops_top_left"] += [it["crop_top_left"] for it in items]
        group["labels"] += [self.label_of(it) for it in items]
        group["captions"] += [it["caption"] for it in items]
        group["metas"] += [it["meta"] for it in items]

    def commit(self, chunk: Chunk) -> None:
        """Encode what is left, write one shard per latent shape, then the chunk's record."""
        for hw in list(chunk.pending):
            self.flush(chunk, hw)
        entries = []
        for hw, group in sorted(chunk.groups.items()):
            tensors = {name: torch.cat(parts) for name, parts in group.pop("tensors").items()}
            for name in sh.CONDITIONING_ROWS:  # stored only where some image has it
                if all(v is None for v in group[name]):
                    del group[name]
            for name, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise ValueError(f"{name} latents of chunk {chunk.id} overflow {self.settings['latent_dtype']}; "
                                     "use --latent-dtype fp32 (or bf16)")
            name = sh.shard_name(chunk.id, (hw[0] // DOWNSAMPLE, hw[1] // DOWNSAMPLE))
            entries.append(sh.write_shard(self.out, name, tensors, group, self.job))
        # The record is written last: it is what makes the chunk count as done.
        record = {"chunk": chunk.id, "rank": self.rank, "shards": entries, "skipped": chunk.skipped}
        if self.streamed:  # the shard's images are known now: its count and keys join the input set
            record["inputs"] = chunk.inputs
        sh.atomic_write_json(sh.record_path(self.out, chunk.id), record)

    def encode_all(self, loader, inputs: list, shard_size: int, bar) -> None:
        """Every item of ``loader`` into its chunk, each chunk committed once complete."""
        open_chunks: dict[int, Chunk] = {}  # a stream's workers each fill a chunk of their own
        for batch in loader:
            for item in batch:
                if "end" in item:  # a stream's shard was read to its end (or to its damage)
                    chunk = open_chunks.pop(item["end"], None) or Chunk(item["end"])
                    if item["problem"]:  # the shard itself, accounted for like an input
                        chunk.skipped.append(item["problem"])
                        chunk.inputs.append(item["problem"]["key"])
                    self.commit(chunk)
                    continue
                if not self.streamed:
                    item["key"] = inputs[item["index"]].key
                c = item["chunk"] if self.streamed else item["index"] // shard_size
                if c not in open_chunks and not self.streamed:  # an input list's chunks come one by one
                    for done in list(open_chunks):
                        self.commit(open_chunks.pop(done))
                self.add(open_chunks.setdefault(c, Chunk(c)), item)
            bar.update(sum("end" not in item for item in batch))
        for chunk in open_chunks.values():
            self.commit(chunk)
