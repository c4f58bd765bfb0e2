"""Writing that never loses or overwrites anything: fresh folders and atomic files."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator


def new_folder(base: str | Path) -> Path:
    """Create `base`, or `base.1`, `base.2`, ... if it exists: a run or a report never reuses a folder."""
    base = Path(base)
    for k in range(1000):
        path = base if k == 0 else base.with_name(f"{base.name}.{k}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new folder next to {base}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it is flushed to disk and renamed over
    `path`, on any failure (a full disk, a crash mid-write) it is removed and `path` is left as it was.

    The temporary file is in the same folder, so the rename is atomic (a temporary file elsewhere, as in
    fsspec's transactions, is copied across file systems, and a kill mid-copy leaves half a file)."""
    path = Path(path)
    # a name of its own for each writer (process and thread): two writers of one file (DDP ranks filling one
    # cache) each rename a whole file, the last one wins, and neither finds its temporary file gone
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # name the file: "No space left on device" alone is not
            raise OSError(e.errno, f"{e.strerror}: writing {path} (nothing replaced; the previous file is intact)"
                          ) from e
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk with its folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Write then rename: a crash leaves the old file or the new one, never half of one."""
    with atomic_open(path, "w") as f:
        f.write(text)


def keep_aside(path: str | Path, why: str = "damaged") -> Path:
    """Rename a file (damaged, or superseded) to `<stem>.<why>-<k><suffix>` beside it, or a folder to
    `<name>.<why>-<k>`, the first k not taken (an earlier copy is never replaced), and return the new path."""
    path = Path(path)
    stem, suffix = (path.name, "") if path.is_dir() else (path.stem, path.suffix)
    k = 1
    while (aside := path.with_name(f"{stem}.{why}-{k}{suffix}")).exists():
        k += 1
    path.rename(aside)
    return aside
