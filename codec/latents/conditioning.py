"""What conditions each image, carried from the inputs into the latent shards: a class label, a
caption and any per-sample JSON (``meta``).

Where they come from (the conventions of image folders, webdataset and Hugging Face):

* side files next to an image, or members of the same tar sample (same name, other extension):
  ``.txt`` (the caption), ``.cls`` (an integer label), ``.json`` (an object kept as ``meta``; its
  ``caption``/``text`` and ``label``/``cls`` fields also give the caption and the label);
* ``metadata.jsonl`` at the top of a folder (Hugging Face imagefolder): one JSON object per line
  with ``file_name`` (relative to the folder) and any other fields, treated like a ``.json``;
* ``compress --labels folders``: the first folder under the source is the class
  (``class_name/image.jpg``), the sorted class names are stored in the job (and manifest).

A side file that cannot be read (not UTF-8, not JSON, not an integer) makes its image a
recorded skip; side files and metadata rows without an image are listed as ``orphans``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from codec.images import ImageLoadError

SIDE_EXTENSIONS = (".txt", ".json", ".cls")
METADATA_FILE = "metadata.jsonl"
CAPTION_FIELDS, LABEL_FIELDS = ("caption", "text"), ("label", "cls")


def read_range(path: str, offset: int = -1, size: int = -1) -> bytes:
    """A whole file (``offset`` < 0), or ``size`` bytes from ``offset`` (a tar member)."""
    with open(path, "rb") as fh:
        if offset < 0:
            return fh.read()
        fh.seek(offset)
        return fh.read(size)


@dataclass(frozen=True)
class Side:
    """A side file, or a tar member (``offset``/``size`` >= 0), of one image. (The same byte
    range as an ``Input``'s, kept a type of its own: side data is never an input image.)"""

    ext: str
    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        return read_range(self.path, self.offset, self.size)


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


def conditioning(key: str, sides: tuple[Side, ...], record: str | None) -> dict:
    """``{"label", "caption", "meta"}`` of one image (None where absent); an unreadable side
    file raises :class:`ImageLoadError` naming it, so the image is skipped with the reason."""
    meta = json.loads(record) if record else {}
    label = caption = None
    for side in sides:
        try:
            text = side.read().decode("utf-8").strip()
            if side.ext == ".txt":
                caption = text
            elif side.ext == ".cls":
                label = int(text)
            else:
                parsed = json.loads(text)
                if not isinstance(parsed, dict):
                    raise ValueError(f"a JSON {type(parsed).__name__}, not an object")
                meta.update(parsed)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ImageLoadError(f"{key}: its {side.ext} side data is unreadable ({exc})") from exc
    caption = caption if caption is not None else next((meta[f] for f in CAPTION_FIELDS if f in meta), None)
    label = label if label is not None else next((meta[f] for f in LABEL_FIELDS if f in meta), None)
    return {"label": None if label is None else int(label), "caption": caption, "meta": meta or None}


def folder_classes(source: Path, keys: list[str]) -> list[str]:
    """The class names of ``--labels folders``: the first-level folders of ``source``; one
    without any image is an error (it would shift every label after it silently)."""
    with_images = {k.split("/", 1)[0] for k in keys if "/" in k}
    folders = sorted(p.name for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    empty = [f for f in folders if f not in with_images]
    if empty:
        raise ValueError(f"--labels folders: class folder(s) {empty} under {source} hold no images; "
                         "remove them or add images")
    if not folders:
        raise ValueError(f"--labels folders: {source} has no class folders (class_name/image.jpg)")
    return folders


def orphans(folder: Path, image_paths: list[str], metadata: dict[str, str]) -> list[dict]:
    """Side files and metadata rows of ``folder`` that belong to no image (recorded, not fatal)."""
    stems = {str(Path(p).with_suffix("")) for p in image_paths}
    found = [{"key": side.relative_to(folder).as_posix(), "reason": "a side file without its image"}
             for ext in SIDE_EXTENSIONS for side in sorted(folder.rglob(f"*{ext}"))
             if str(side.with_suffix("")) not in stems and side.name != METADATA_FILE]
    names = {Path(p).relative_to(folder).as_posix() for p in image_paths if Path(p).is_relative_to(folder)}
    found += [{"key": f"{METADATA_FILE}: {name}", "reason": "a metadata row without its image"}
              for name in sorted(metadata) if name not in names]
    return found
