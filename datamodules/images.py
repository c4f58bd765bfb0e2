"""Reading images and records from real data files: every failure names the file and the record.

Sources and benchmarks read images through `load_image`, and wrap each record they build in a
`BadRecords` guard: by default a bad record stops the run with an error that says where it is; with
`skip_bad` it is skipped, counted and listed, and the count is reported with the results.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from PIL import Image, UnidentifiedImageError

T = TypeVar("T")


class BadInput(ValueError):
    """A record that cannot be used (a missing or corrupt image, a malformed field, an empty caption).
    The message starts with where it is: `<file>:<record>`."""


def require_image_file(path: str | Path, where: str) -> Path:
    """The path, if a file is there; else the BadInput that load_image would raise (a cheap check, no decoding)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{where}: image not found: {path}")
    return path


def load_image(path: str | Path, where: str) -> Image.Image:
    """An RGB image, fully decoded, or a BadInput that names the file and the record that points at it."""
    path = require_image_file(path, where)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() decodes every pixel, so a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadInput(f"{where}: cannot read image {path}: {e}") from None


@dataclass
class BadRecords:
    """Applies the skip_bad policy: `guard(where, make)` returns make(), or None when the record is bad and
    skipping is on (the record is counted and kept in `skipped`); with skipping off a BadInput propagates."""

    skip_bad: bool = False
    skipped: list[str] = field(default_factory=list)  # the error messages of the skipped records

    def guard(self, make: Callable[[], T]) -> T | None:
        try:
            return make()
        except BadInput as e:
            if not self.skip_bad:
                raise
            self.skipped.append(str(e))
            return None

    @property
    def count(self) -> int:
        return len(self.skipped)

    def note(self, what: str) -> str | None:
        """A line for the results ("3 bad records skipped in VG-Relation; first: ..."), or None if none were."""
        if not self.skipped:
            return None
        return f"{self.count} bad record(s) skipped in {what} (skip_bad); first: {self.skipped[0]}"
