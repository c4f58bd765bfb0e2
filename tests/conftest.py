"""Shared fixtures: the real configs, made small enough for a 2-core CPU."""
from __future__ import annotations

import pytest

from methods.train import compose_train

# A few-step version of the default job: same model and world, tiny splits.
TINY = [
    "trainer=debug",
    "data.options.train_size=64",
    "data.options.val_size=32",
    "data.options.test_size=40",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "optim.warmup_steps=2",
]


@pytest.fixture
def make_cfg(tmp_path):
    """compose_train with the tiny overrides and a runs folder inside the test's tmp_path."""

    def make(*argv: str):
        return compose_train([f"runs_dir={tmp_path / 'runs'}", *TINY, *argv])

    return make
