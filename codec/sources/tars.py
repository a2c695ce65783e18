"""Tar shards (the webdataset layout): listing members by byte range, reading them as a stream,
and telling a complete archive from one that was cut short.

Python's ``tarfile`` takes a missing header for the end of the archive, so a shard cut at a
member boundary (a killed writer) would read as complete. :class:`_CheckedInfo` notes the
end-of-archive block when it is read; an archive that ends without one is *cut short*.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from codec.images import IMAGE_EXTENSIONS

SIDE_EXTENSIONS = (".txt", ".json", ".cls")


class TarCutShort(tarfile.ReadError):
    """An archive that ends without its end-of-archive blocks, or inside a member."""


class _CheckedInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # an all-zero block: the archive's proper end
            tf.properly_ended = True
            raise


def open_checked(name: str | None = None, fileobj=None, stream: bool = False) -> tarfile.TarFile:
    """A tar opened for reading whose :func:`members` raises :class:`TarCutShort` at a cut."""
    mode = "r|" if stream else "r:"
    # (Opening reads the first header already: an empty archive has ended by the time it returns.)
    return tarfile.open(name=name, fileobj=fileobj, mode=mode, tarinfo=_CheckedInfo)


def members(tf: tarfile.TarFile, where: str):
    """Every member of ``tf``, then a check that the archive ended properly."""
    try:
        yield from tf
    except tarfile.ReadError as exc:  # "unexpected end of data": cut inside a member
        raise TarCutShort(f"{where}: cut short inside a member ({exc})") from exc
    if not getattr(tf, "properly_ended", False):
        raise TarCutShort(f"{where}: cut short (it ends without the end-of-archive blocks)")


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def is_side(name: str) -> bool:
    return Path(name).suffix.lower() in SIDE_EXTENSIONS


def sample_name(name: str) -> str:
    """The webdataset sample a member belongs to: its name without the extension."""
    return str(Path(name).with_suffix(""))


def stream_samples(fileobj, where: str):
    """``(member name, image bytes, {ext: side bytes})`` of every image of a streamed tar, in
    archive order. The members of one sample are consecutive (webdataset's layout); sides are
    gathered until the sample ends. Raises :class:`TarCutShort` (or a ``tarfile`` error) at the
    point where the archive is damaged, after yielding what came before."""
    current, images, sides = None, [], {}
    try:
        with open_checked(fileobj=fileobj, stream=True) as tf:
            for member in members(tf, where):
                if not member.isfile() or not (is_image(member.name) or is_side(member.name)):
                    continue
                sample = sample_name(member.name)
                if sample != current:
                    yield from ((name, data, sides) for name, data in images)
                    current, images, sides = sample, [], {}
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise TarCutShort(f"{where}: cut short inside {member.name}")
                if is_image(member.name):
                    images.append((member.name, data))
                else:
                    sides[Path(member.name).suffix.lower()] = data
    except tarfile.TarError:
        yield from ((name, data, sides) for name, data in images)  # whole images read before the damage
        raise
    yield from ((name, data, sides) for name, data in images)

