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
from pathlib import Path

from codec.images import ImageLoadError
from codec.sources.sides import METADATA_FILE, SIDE_EXTENSIONS, Side

CAPTION_FIELDS, LABEL_FIELDS = ("caption", "text"), ("label", "cls")


def conditioning(key: str, sides: tuple[Side, ...], record: str | None, classes: list[str] | None = None) -> dict:
    """``{"label", "caption", "meta"}`` of one image (None where absent). An unreadable side file,
    or a label that is not a class index (a fraction, a list, a name outside ``classes``), raises
    :class:`ImageLoadError` naming the image, so it is skipped with the reason."""
    meta = json.loads(record) if record else {}
    label = caption = None
    for side in sides:
        try:
            text = side.read().decode("utf-8").strip()
            if side.ext == ".txt":
                caption = text
            elif side.ext == ".cls":
                label = int(text) if text.lstrip("-").isdigit() else text
            else:
                parsed = json.loads(text)
                if not isinstance(parsed, dict):
                    raise ValueError(f"a JSON {type(parsed).__name__}, not an object")
                meta.update(parsed)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ImageLoadError(f"{key}: its {side.ext} side data is unreadable ({exc})") from exc
    caption = caption if caption is not None else next((meta[f] for f in CAPTION_FIELDS if f in meta), None)
    label = label if label is not None else next((meta[f] for f in LABEL_FIELDS if f in meta), None)
    return {"label": class_index(key, label, classes), "caption": caption, "meta": meta or None}


def class_index(key: str, label, classes: list[str] | None) -> int | None:
    """A label as a class index: an integer (or a whole float) as it is, a class name by its place
    in ``classes``; anything else is an :class:`ImageLoadError` naming the image."""
    if label is None:
        return None
    if isinstance(label, bool) or not isinstance(label, (int, float, str)):
        raise ImageLoadError(f"{key}: label {label!r} is a {type(label).__name__}, not a class index or name")
    if isinstance(label, float):
        if not label.is_integer():
            raise ImageLoadError(f"{key}: label {label!r} is not a whole number (a class index)")
        return int(label)
    if isinstance(label, int):
        return label
    if classes is not None and label in classes:
        return classes.index(label)
    raise ImageLoadError(f"{key}: label {label!r} is a class name outside the class list "
                         f"({'none was found at the start' if classes is None else len(classes)} classes); class "
                         "names are read from metadata.jsonl, a Hugging Face dataset's label column or class "
                         "folders; use integer labels in .cls/.json side files")


def string_classes(records) -> list[str] | None:
    """The sorted class names of the string labels among ``records`` (metadata rows as JSON
    text), None when no label is a string."""
    names = set()
    for record in records:
        if record:
            row = json.loads(record)
            label = next((row[f] for f in LABEL_FIELDS if f in row), None)
            if isinstance(label, str):
                names.add(label)
    return sorted(names) or None


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
