"""Reading the elements of a very large JSON array one at a time (Visual Genome's files run to hundreds of MB
each, Karpathy's dataset_coco.json to 400 MB): memory holds one element, not the whole document.

A file that is not JSON, or ends inside an element (a truncated download), is a BadInput that names the
file, the element and the character where reading stopped; one that is not UTF-8 text names the byte; no skip_bad
can skip either.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from datamodules.images import BadInput

CHUNK = 1 << 20
_WS = " \t\n\r"


def not_utf8(path: str | Path, offset: int, reason: str) -> BadInput:
    """The error for a file that is not UTF-8 text, naming the file and the first byte that is not."""
    return BadInput(f"{path}: byte {offset}: not UTF-8 text ({reason}); a JSON or TSV annotation file must be UTF-8")


def read_text(path: str | Path) -> str:
    """A whole file as UTF-8 text; bytes that are not UTF-8 are a BadInput naming the file and the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start, e.reason) from None


class _Reader:
    """A growing text buffer over a file (opened in binary, decoded here as UTF-8), with a read position."""

    def __init__(self, f: Any, path: Path) -> None:
        self.f, self.path, self.buf, self.pos, self.base, self.eof = f, path, "", 0, 0, False
        self.decoder, self.read_bytes = codecs.getincrementaldecoder("utf-8")(), 0

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(CHUNK)
        pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:  # e.start counts from the pending bytes, then this chunk's
            raise not_utf8(self.path, self.read_bytes - pending + e.start, e.reason) from None
        self.read_bytes += len(data)
        if not data:
            self.eof = True
            return False
        if self.pos > CHUNK:  # drop what has been consumed
            self.base += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += text
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
    with open(path, "rb") as f:
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
