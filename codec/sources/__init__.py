"""Every kind of image input, for every command: :func:`list_source` / :func:`gather_inputs`
read folders, file lists, local tar shards and Hugging Face datasets by index (as
:class:`Input`), :mod:`codec.sources.stream` reads URLs, ``pipe:`` shards and streamed datasets.

One key scheme (:attr:`Input.where` and the stream keys: the file, the shard plus the member,
or the dataset plus the row) and one skip record (:func:`skip`) serve training, ``compress``,
``scale`` and ``eval``. Heavy packages (``datasets``, ``webdataset``) are imported only when a
source of their kind is read.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from codec.images import IMAGE_EXTENSIONS
from codec.sources.files import Input, input_record, list_inputs, read_input
from codec.sources.kinds import check_local, expand, is_hf_dataset, is_stream, is_url

__all__ = ["Input", "gather_inputs", "input_record", "is_hf_dataset", "is_stream", "is_url", "list_inputs",
           "list_source", "read_input", "skip"]


def skip(key: str, reason: str) -> dict:
    """One skip record: the input's full name and why it was not used (naming it)."""
    reason = str(reason)
    return {"key": key, "reason": reason if key in reason else f"{key}: {reason}"}


def list_source(source: str | os.PathLike, column: str = "image", split: str = "train", streaming: bool = False,
                limit: int | None = None, problems: list | None = None) -> list[Input]:
    """The inputs of one source (see :mod:`codec.sources.kinds` for the forms); a brace pattern
    gives the inputs of every source it names, keyed ``shard.tar/member``. A stream is read once,
    in order, up to ``limit`` images, which are held in memory still encoded (what ``eval`` and
    ``scale`` need; ``compress`` reads streams shard by shard instead); a shard that cannot be read
    to its end adds a skip record to ``problems`` (printed as a warning without it). Raises for a
    missing source or one without images."""
    if is_stream(source, streaming):
        found: list[dict] = []
        items = _read_stream(source, column, split, limit, found)
        if problems is None:
            print("".join(f"warning: {p['reason']}\n" for p in found), end="")
        else:
            problems += found
        return items
    if is_hf_dataset(source):
        from codec.sources.hf import open_dataset

        data = open_dataset(str(source), column, split)
        return [Input(f"{source}[{i}]", str(source), row=i, column=column, split=split) for i in range(len(data))]
    check_local(source)
    items: list[Input] = []
    paths = expand(source)
    for path in paths:
        found = list_inputs(path)
        if not found:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards found in {path}")
        if len(paths) > 1:  # members of different shards may share names
            found = [replace(item, key=f"{Path(path).name}/{item.key}") for item in found]
        items += found
    return items[:limit] if limit else items


def _read_stream(source, column: str, split: str, limit: int | None, problems: list) -> list[Input]:
    import tarfile

    from codec.sources.stream import shard_problem, stream_shards

    items: list[Input] = []
    for shard in stream_shards([source], column, split):
        try:
            for key, _, _, data in shard.samples():
                items.append(Input(key, shard.name, data=data if data is not None else b""))
                if limit and len(items) >= limit:
                    return items
        except (OSError, tarfile.TarError, EOFError) as exc:  # named, and the rest is used
            problems.append(skip(shard.where, shard_problem(exc)))
    if not items:
        raise ValueError(f"no images in the stream {source}" + (f" ({problems[0]['reason']})" if problems else ""))
    return items


def gather_inputs(sources, column: str = "image", split: str = "train") -> list[Input]:
    """The inputs of several indexed sources, one after the other."""
    return [item for source in sources for item in list_source(source, column, split)]
