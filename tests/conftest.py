"""Shared fixtures: one smoke data set per test session, generated into a temp folder."""
from __future__ import annotations

import os

import pytest

# Headless plotting everywhere in the tests (notebook kernels inherit it).
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    """The smoke preset's generated set (train + val), made once for the session."""
    from fpnlib.data.prepare import ensure_dataset

    return ensure_dataset("smoke", root=tmp_path_factory.mktemp("smoke_data"), progress=False)
