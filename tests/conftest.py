"""Shared fixtures: one smoke data set per test session, generated into a temp folder."""
from __future__ import annotations

import os

import pytest

# Headless plotting everywhere in the tests (notebook kernels inherit it).
os.environ.setdefault("MPLBACKEND", "Agg")


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``make test`` runs ``-n 2``), each worker, and the notebook kernels and
    CLI runs it starts, gets its share of the cores, as ``run_rows``' workers do: most tests are
    small operators, whose time is Python's, so two one-thread workers beat one two-thread
    process. The learning tests' docstrings give their numbers at 1 and 2 threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        from fpnlib.experiments.tables import share_cores

        share_cores(workers)


_share_the_cores_between_workers()


@pytest.fixture(scope="session")
def smoke_root(tmp_path_factory):
    """The smoke preset's generated set (train + val), made once for the session."""
    from fpnlib.data.prepare import ensure_dataset

    return ensure_dataset("smoke", root=tmp_path_factory.mktemp("smoke_data"), progress=False)


def pytest_collection_modifyitems(config, items):
    """Files with slow or notebook tests first, each file's tests in their own order: with
    ``--dist loadfile`` the longest files start at once and the short ones fill in behind them."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("notebook")}
    items.sort(key=lambda item: item.path not in heavy)
