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

from codec.images import IMAGE_EXTENSIONS
from codec.sources.files import Input, input_record, list_inputs, read_input
from codec.sources.kinds import check_local, expand, is_hf_dataset, is_stream, is_url, unknown_source

__all__ = ["Input", "gather_inputs", "input_record", "is_hf_dataset", "is_stream", "is_url", "list_inputs",
           "list_source", "read_input", "skip"]


def skip(key: str, reason: str) -> dict:
    """One skip record: the input's full name and why it was not used (naming it)."""
    reason = str(reason)
    return {"key": key, "reason": reason if key in reason else f"{key}: {reason}"}


def list_source(source: str | os.PathLike, column: str = "image", split: str = "train") -> list[Input]:
    """The inputs of one indexed source (see :mod:`codec.sources.kinds` for the forms); a brace
    pattern gives the inputs of every source it names. Raises for a stream, a missing source or
    one without images."""
    if is_url(source):
        raise unknown_source(source, "a URL or pipe: command is a stream, not readable by index here")
    if is_hf_dataset(source):
        from codec.sources.hf import open_dataset

        data = open_dataset(str(source), column, split)
        return [Input(f"{source}[{i}]", str(source), row=i, column=column, split=split) for i in range(len(data))]
    check_local(source)
    items: list[Input] = []
    for path in expand(source):
        found = list_inputs(path)
        if not found:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards found in {path}")
        items += found
    return items


def gather_inputs(sources, column: str = "image", split: str = "train") -> list[Input]:
    """The inputs of several indexed sources, one after the other."""
    return [item for source in sources for item in list_source(source, column, split)]
