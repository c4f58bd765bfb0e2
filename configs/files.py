"""Writing that never loses or overwrites anything: fresh folders and atomic files."""
from __future__ import annotations

import os
from contextlib import contextmanager
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


def write_atomic(path: str | Path, text: str) -> None:
    """Write then rename: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@contextmanager
def open_atomic(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file written under a name of its own (several processes may write the same cache at once), renamed
    into place only when the block ends without an error; a failed write leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
