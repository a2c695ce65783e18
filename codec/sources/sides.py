"""Side data of an image: the caption / label / JSON files next to it, the other members of its
tar sample, and its row of ``metadata.jsonl`` (the Hugging Face imagefolder convention). Read
here, interpreted by :mod:`codec.latents.conditioning`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from codec.sources.tars import SIDE_EXTENSIONS

METADATA_FILE = "metadata.jsonl"

__all__ = ["METADATA_FILE", "SIDE_EXTENSIONS", "Side", "read_metadata_jsonl", "read_range", "side_files"]


def read_range(path: str, offset: int = -1, size: int = -1) -> bytes:
    """A whole file (``offset`` < 0), or ``size`` bytes from ``offset`` (a tar member)."""
    with open(path, "rb") as fh:
        if offset < 0:
            return fh.read()
        fh.seek(offset)
        return fh.read(size)


@dataclass(frozen=True)
class Side:
    """A side file, a tar member (``offset``/``size`` >= 0), or bytes already read from a stream
    (``data``), of one image. Kept a type of its own: side data is never an input image."""

    ext: str
    path: str
    offset: int = -1
    size: int = -1
    data: bytes | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else read_range(self.path, self.offset, self.size)


def side_files(image: Path) -> tuple[Side, ...]:
    return tuple(Side(ext, str(image.with_suffix(ext))) for ext in SIDE_EXTENSIONS if image.with_suffix(ext).is_file())


def read_metadata_jsonl(folder: Path) -> dict[str, str]:
    """``file_name`` -> the row's other fields (as JSON text) of ``folder/metadata.jsonl``."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.pop("file_name")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a JSON object with a file_name ({exc})") from exc
        rows[Path(name).as_posix()] = json.dumps(row)
    return rows
