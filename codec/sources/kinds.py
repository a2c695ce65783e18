"""What a source string names, and its expansion into concrete sources.

The accepted forms, the same for ``python -m train`` (``data.train``), ``vae-codec compress``,
``scale`` and ``eval`` (``--input`` / ``--data``):

* an image folder (images found recursively, and the members of every ``.tar`` in it);
* a file list (``.txt``, one image path per line) or a single image;
* a local ``.tar`` shard, or a brace pattern of them (``train-{000000..000099}.tar``);
* a URL or command of a streamed shard (``https://…/train-{000..099}.tar``, ``pipe:curl …``,
  ``s3://``, ``gs://``; opened by ``webdataset.gopen``);
* a Hugging Face dataset: ``hf:NAME`` on the Hub (or its cache), or a ``save_to_disk`` folder;
  read by index, or streamed where ``streaming`` is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

STREAM_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
FORMS = ("an image folder", "a file list (.txt)", "an image file", "a .tar shard or a brace pattern of them",
         "a URL or pipe: command of .tar shards", "hf:NAME (a Hugging Face dataset)",
         "a Hugging Face save_to_disk folder")


def is_url(source: str | os.PathLike) -> bool:
    """A URL or ``pipe:`` command: read as a stream, never by index."""
    return str(source).startswith(STREAM_PREFIXES)


def is_hf_dataset(source: str | os.PathLike) -> bool:
    """``hf:NAME`` or a folder written by ``datasets``' ``save_to_disk``."""
    path = Path(source)
    return str(source).startswith("hf:") or (path.is_dir() and any((path / f).exists() for f in HF_MARKERS))


def is_stream(source: str | os.PathLike, streaming: bool = False) -> bool:
    """A source read as a stream: a URL or ``pipe:``, or a Hugging Face dataset with ``streaming``."""
    return is_url(source) or (streaming and is_hf_dataset(source))


def hf_name(source: str | os.PathLike) -> str:
    return str(source).removeprefix("hf:")


def expand(pattern: str | os.PathLike) -> list[str]:
    """A brace pattern's sources (``a-{0..2}.tar`` -> three), as webdataset expands them."""
    text = str(pattern)
    if "{" not in text:
        return [text]
    try:
        from braceexpand import braceexpand
    except ImportError as exc:
        raise ImportError(f"{text}: brace patterns need `pip install braceexpand` "
                          "(or vae-codec[train])") from exc
    return list(braceexpand(text))


def unknown_source(source: str | os.PathLike, why: str) -> ValueError:
    """The error for a source that names nothing readable, listing the accepted forms."""
    return ValueError(f"{source}: {why}; a source is one of: {'; '.join(FORMS)}")


def check_local(source: str | os.PathLike) -> None:
    """Raise a clear error for a local source that does not exist (missing files of a brace
    pattern are counted)."""
    paths = expand(source)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(paths)} it names)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data source {missing[0]} does not exist{more} (a source is one of: "
                                f"{'; '.join(FORMS)})")
