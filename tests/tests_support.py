"""Shared test settings and readers, written independently of the code under test."""
import errno
import re
from pathlib import Path

# The repository root, for tests that run its commands or read its files.
ROOT = Path(__file__).resolve().parents[1]

TINY_ARGS = [
    "trainer=debug",
    "data.options.train_size=64",
    "data.options.val_size=32",
    "data.options.test_size=40",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "optim.warmup_steps=2",
]


# Our own reading of the spec: predicate -> (caption phrase, converse predicate).
PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PREDICATE_OF_PHRASE = {v: k for k, v in PHRASE.items()}
_P = "|".join(re.escape(p) for p in sorted(PHRASE.values(), key=len, reverse=True))
# The three templates, in caption order: "a X <p> a Y", "there is a X <p> a Y", "the X is <p> the Y".
CLAUSE = [
    re.compile(rf"^(?P<da>an?) (?P<s>.+?) (?P<p>{_P}) (?P<db>an?) (?P<o>.+)$"),
    re.compile(rf"^there is (?P<da>an?) (?P<s>.+?) (?P<p>{_P}) (?P<db>an?) (?P<o>.+)$"),
    re.compile(rf"^the (?P<s>.+?) is (?P<p>{_P}) the (?P<o>.+)$"),
]


class FullDisk:
    """A file on a disk that fills up after `budget` bytes: a write past it puts out what fits, then raises ENOSPC."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(data[: self.budget])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
