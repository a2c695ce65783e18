"""``encode`` / ``decode`` of many files: a folder (recursive) or a glob, read ahead on threads,
coded in batches of files that fit together, every failure recorded in ``skipped.tsv``."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# A failure a user's file can cause: recorded against that file, and the job goes on.
FILE_ERRORS = (ValueError, OSError)


def inputs_of(source: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[Path, str]] | None:
    """A folder (recursive) or a glob pattern -> [(file, relative name)], sorted; None for one file.
    ``suffixes``: the files taken (default: images)."""
    import glob

    from codec.images import IMAGE_EXTENSIONS

    wanted = suffixes or tuple(IMAGE_EXTENSIONS)
    if Path(source).is_dir():
        root = Path(source)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in wanted and not p.is_dir())
        return [(p, p.relative_to(root).as_posix()) for p in files]
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix.lower() in wanted)
        if not files:
            raise FileNotFoundError(f"{source}: the pattern matches no {'/'.join(wanted)} file")
        return [(p, p.name) for p in files]
    return None


def read_ahead(load: Callable, items: list, ahead: int) -> Iterator[tuple[object, object]]:
    """(item, load(item) or the exception it raised), in order, with up to ``ahead`` loads running
    on threads while the caller codes (image decoding releases the GIL). Bounded: a folder of a
    million files never sits in memory."""
    def attempt(item):
        try:
            return load(item)
        except FILE_ERRORS as exc:
            return exc

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(attempt, item)))
            if len(pending) > ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()


def batches_of(loaded: Iterable, group: Callable, size: int) -> Iterator[list]:
    """Consecutive loaded inputs whose ``group(value)`` is equal (images of one size, latents of one
    shape), up to ``size`` per batch; a failed load comes alone, so it is recorded in its place."""
    batch, key = [], None
    for item, value in loaded:
        this = ("failed", id(value)) if isinstance(value, BaseException) else group(value)
        if batch and (this != key or len(batch) >= size or key[0] == "failed"):
            yield batch
            batch = []
        batch.append((item, value))
        key = this
    if batch:
        yield batch


def each(inputs: list[tuple[Path, str]], out_dir: Path, suffix: str, *, load: Callable, group: Callable,
         code: Callable, batch_size: int, what: str) -> int:
    """Code every input into ``out_dir`` (names kept, ``suffix`` set), ``batch_size`` files at a time.

    ``load(path)`` reads one file, ``group(loaded)`` says which files can share a batch, and
    ``code([(loaded, destination), ...])`` codes and writes one batch. A file that cannot be read
    or coded is skipped and recorded (``out_dir/skipped.tsv``), never lost: a batch that fails is
    retried file by file to find which.
    """
    from tqdm.auto import tqdm

    if not inputs:
        raise FileNotFoundError(f"no input files to {what.removesuffix('ing')}e")
    skipped: list[tuple[str, str]] = []

    def attempt(batch: list) -> None:
        try:
            code([(value, out_dir / Path(name).with_suffix(suffix)) for (_, name), value in batch])
        except FILE_ERRORS as exc:
            if len(batch) > 1:
                for one in batch:
                    attempt([one])
            else:
                skipped.append((batch[0][0][1], str(exc)))

    with tqdm(total=len(inputs), desc=what, unit="file") as progress:
        for batch in batches_of(read_ahead(lambda i: load(i[0]), inputs, 2 * batch_size), group, batch_size):
            failed = [((src, name), value) for (src, name), value in batch if isinstance(value, BaseException)]
            skipped += [(name, str(value)) for (_, name), value in failed]
            if not failed:
                attempt(batch)
            progress.update(len(batch))
    if skipped:
        (out_dir / "skipped.tsv").write_text("".join(f"{n}\t{r}\n" for n, r in sorted(skipped)))
    print(f"{len(inputs)} files -> {out_dir}: {len(inputs) - len(skipped)} done, {len(skipped)} skipped"
          + (f" (listed in {out_dir / 'skipped.tsv'})" if skipped else ""))
    for name, reason in skipped[:10]:
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    return 0
