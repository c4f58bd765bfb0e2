"""Reading the elements of a very large JSON array one at a time (Visual Genome's files run to hundreds of MB
each, Karpathy's dataset_coco.json to 400 MB): memory holds one element, not the whole document.

A file that is not JSON, or ends inside an element (a truncated download), is a BadInput that names the
file, the element and the character where reading stopped; no skip_bad can skip it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from datamodules.images import BadInput

CHUNK = 1 << 20
_WS = " \t\n\r"


class _Reader:
    """A growing text buffer over a file, with a read position."""

    def __init__(self, f: Any, path: Path) -> None:
        self.f, self.path, self.buf, self.pos, self.base, self.eof = f, path, "", 0, 0, False

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(CHUNK)
        if not data:
            self.eof = True
            return False
        if self.pos > CHUNK:  # drop what has been consumed
            self.base += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += data
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def value(self, decoder: json.JSONDecoder, what: str) -> Any:
        """Decode the next JSON value, reading more of the file until it is complete."""
        self.peek()
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof or not self.more():
                    self.pos = end
                    return value
            except json.JSONDecodeError as e:
                if not self.more():
                    ended = "the file ends inside it (truncated?)" if e.pos >= len(self.buf) - 1 else e.msg
                    raise BadInput(f"{self.path}: {what}: malformed JSON at character {self.base + e.pos}: "
                                   f"{ended}") from None

    def expect(self, chars: str, what: str) -> str:
        c = self.peek()
        if c == "" or c not in chars:
            found = "the end of the file (truncated?)" if c == "" else repr(c)
            raise BadInput(f"{self.path}: {what}: malformed JSON at character {self.base + self.pos}: expected "
                           f"{' or '.join(repr(x) for x in chars)}, found {found}")
        self.pos += 1
        return c


def iter_json_array(path: str | Path, key: str | None = None) -> Iterator[tuple[int, Any]]:
    """(index, element) for each element of the file's top-level array, or of the array under `key` in its
    top-level object (`{"images": [...]}`); other keys of that object are read past."""
    path = Path(path)
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        r = _Reader(f, path)
        if key is not None:
            r.expect("{", "the top level")
            while True:
                name = r.value(decoder, "a top-level key")
                r.expect(":", f"key {name!r}")
                if name == key:
                    break
                r.value(decoder, f"the value of {name!r}")
                if r.expect(",}", f"after {name!r}") == "}":
                    raise BadInput(f"{path}: no top-level key {key!r}")
        where = f"[{key}]" if key else "the top-level array"
        r.expect("[", where)
        if r.peek() == "]":
            return
        index = 0
        while True:
            yield index, r.value(decoder, f"{key or ''}[{index}]")
            if r.expect(",]", f"after {key or ''}[{index}]") == "]":
                return
            index += 1
