"""Hugging Face datasets as image sources: ``hf:NAME`` (the Hub, or its cache) or a
``save_to_disk`` folder, read by row (:func:`hf_inputs`) or streamed (:mod:`codec.sources.stream`).

Images are taken from ``column`` as bytes and decoded by our loader (same conversions and
errors as files); the row's other columns are its side data (``label``, ``text``, ...). A
``ClassLabel`` column gives the label index; a column of strings gives class indices by the
sorted list of its values, kept with the job.
"""

from __future__ import annotations

import functools
import io
import json

from PIL import Image

from codec.images import ImageLoadError, load_image
from codec.sources.kinds import hf_name


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("reading Hugging Face datasets needs `pip install vae-codec[hf]` "
                          "(the datasets library)") from exc
    return datasets


@functools.lru_cache(maxsize=8)
def open_dataset(source: str, column: str = "image", split: str = "train", streaming: bool = False):
    """The split of a dataset with ``column`` holding undecoded image bytes (cached per process:
    DataLoader workers open it once)."""
    from pathlib import Path

    datasets = _datasets()
    name, local = hf_name(source), Path(hf_name(source))
    if local.is_dir():
        data = datasets.load_from_disk(str(local))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{source}: no split {split!r} (it has {sorted(data)}); set data.hf_split / --split")
            data = data[split]
        if streaming:
            data = data.to_iterable_dataset(num_shards=min(len(data), 64))  # shards to share between readers
    else:
        try:
            data = datasets.load_dataset(name, split=split, streaming=streaming)
        except ValueError as exc:  # an unknown split names the ones there are
            raise ValueError(f"{source}: {exc}") from exc
    columns = data.column_names or [column]
    if column not in columns:
        raise ValueError(f"{source}: no column {column!r} (columns: {columns}); set data.image_column / --column")
    if isinstance((data.features or {}).get(column), datasets.Image):
        data = data.cast_column(column, datasets.Image(decode=False))  # bytes: decoded by load_image
    return data


def image_of(value, key: str, column: str) -> Image.Image:
    """A row's image cell (bytes, a path or a PIL image) as an RGB image; anything else is an
    :class:`ImageLoadError` naming the row."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return load_image(io.BytesIO(value["bytes"]), name=key)
    if isinstance(value, dict) and value.get("path"):
        return load_image(value["path"])
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        buf.seek(0)
        return load_image(buf, name=key)
    raise ImageLoadError(f"{key}: column {column!r} holds {type(value).__name__}, not an image")


def row_record(row: dict, column: str) -> str | None:
    """The row's other columns as JSON text (its side data); ``ClassLabel`` values stay indices."""
    rest = {k: v for k, v in row.items() if k != column and _jsonable(v)}
    return json.dumps(rest) if rest else None


def _jsonable(value) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def string_classes(data) -> list[str] | None:
    """The sorted values of a string ``label`` column (the class list), None if there is none."""
    for field in ("label", "cls"):
        feature = (data.features or {}).get(field)
        if feature is not None and getattr(feature, "dtype", None) == "string":
            return sorted({str(v) for v in data.unique(field)})
    return None
