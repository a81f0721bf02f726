"""Shared fixtures: one smoke data set per test session, generated into a temp folder."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

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


@pytest.fixture
def h100_ptx():
    """``ptx(kernel, signature, constants)``: Triton compiles ``kernel`` for sm_90 (an H100) here,
    no GPU needed, as it is launched (no FMA contraction but the ones asked for), and returns its
    PTX; ``signature`` names each argument's type, ``constants`` the constexpr values. A kernel
    that would not compile on the GPU fails here. Skips where Triton is not installed."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def ptx(kernel, signature: dict, constants: dict) -> str:
        sig = dict(signature, **dict.fromkeys(constants, "constexpr"))
        source = ASTSource(fn=kernel, signature=sig, constexprs={(list(sig).index(k),): v for k, v in constants.items()})
        out = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        assert out.asm["cubin"]
        return out.asm["ptx"]

    return ptx


@pytest.fixture
def in_triton_interpreter():
    """``run(script)``: runs ``script`` in a fresh Python where Triton executes its kernels on
    the CPU (``TRITON_INTERPRET=1``, read when Triton is imported), the tests folder importable,
    and fails with its stderr. Skips where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    tests = os.path.dirname(__file__)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")]))

    def run(script: str) -> None:
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]

    return run


def pytest_collection_modifyitems(config, items):
    """Files with slow or notebook tests first, each file's tests in their own order: with
    ``--dist loadfile`` the longest files start at once and the short ones fill in behind them.
    (``make test`` passes ``--no-loadscope-reorder``: by default pytest-xdist hands the files
    out by their number of tests, which put the longest file, five slow tests, last.)"""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("notebook")}
    items.sort(key=lambda item: item.path not in heavy)


@pytest.fixture
def fresh_learned_guesses(monkeypatch):
    """``guessed_sizes.LEARNED`` as a new process starts with it, restored afterwards (the
    guesses are process-wide: a test should not depend on what earlier tests taught them)."""
    from fpnlib.modeling.guessed_sizes import LEARNED, Guesses

    for name, value in vars(Guesses()).items():
        monkeypatch.setattr(LEARNED, name, value)
    return LEARNED
