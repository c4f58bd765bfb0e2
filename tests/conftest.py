"""Shared fixtures: the real configs, made small enough for a 2-core CPU."""
from __future__ import annotations

import pytest

from methods.train import compose_train

from tests_support import TINY_ARGS as TINY


@pytest.fixture
def make_cfg(tmp_path):
    """compose_train with the tiny overrides and a runs folder inside the test's tmp_path."""

    def make(*argv: str):
        return compose_train([f"runs_dir={tmp_path / 'runs'}", *TINY, *argv])

    return make
