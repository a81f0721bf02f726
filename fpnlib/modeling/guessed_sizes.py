"""Sizes guessed instead of read, every guess checked in one read at the end (not in the paper; speed).

On a GPU the host queues operators ahead of the device as long as it never needs a value the
device has not computed yet. Inference on the grouped-NMS path (``group_nms``) has such reads in
its middle:

* proposal selection reads how many proposals each image kept;
* post-processing reads which (image, class) groups have candidates and how many the widest holds;
* grouped NMS tests every two rounds whether it has converged.

The first of them stops the host until the backbone and the pyramid are done; from there on, the
GPU waits for the host to launch each operator of the heads. While :func:`with_guessed_sizes` is
active, each of these sizes is *guessed* instead:

* every image keeps ``post_nms_top_n`` proposals;
* no image has more class groups, and no group more candidates, than the most seen so far;
* NMS converges within the rounds it took before.

Each guess leaves its check on the device, and the one read inference makes anyway (how many
detections each image has, :meth:`Guessing.read`) reads the checks with it. If one failed, the
detector runs the heads again the plain way and the guesses learn from it (:class:`Guesses`):
the width or number of groups that was needed, the rounds that pass took, and, for a pyramid
shape whose images kept fewer proposals, to read those counts from then on (one wait in the
middle again). A wrong guess costs time, never a result: the outputs are the plain path's
either way (``tests/test_guessed_sizes.py``). ``FPNLIB_GUESS_SIZES=0`` turns guessing off (the
plain path, for A/B runs).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


@dataclass
class Guesses:
    """What the guesses have learned so far (process-wide)."""

    rounds: dict[str, int] = field(default_factory=dict)  # NMS rounds per site; absent: START_ROUNDS
    width: int = 64  # post-processing: candidates of the widest (image, class) group
    groups: int = 16  # post-processing: (image, class) groups with a candidate, most in one image
    counts_read: set = field(default_factory=set)  # proposal layouts whose counts are read, not guessed

    START_ROUNDS = 8

    def rounds_for(self, site: str) -> int:
        return self.rounds.get(site, self.START_ROUNDS)

    def snapshot(self) -> Hashable:
        """All that was learned, hashable: a pass captured under these guesses (``cuda_graphs``)
        is valid only while it is unchanged."""
        return tuple(sorted(self.rounds.items())), self.width, self.groups, frozenset(self.counts_read)

    def took_rounds(self, site: str, rounds: int) -> None:
        """NMS at ``site`` converged in ``rounds`` in a pass run again after a failed guess."""
        if getattr(_state, "learning", False):
            self.rounds[site] = max(self.rounds_for(site), rounds)

    def learn(self, failed: list[tuple[Hashable, int]]) -> None:
        """After failed checks (``((kind, key), needed)`` each): the width or number of groups
        that was needed (the largest seen so far: padding costs the GPU work, a wrong guess a
        second pass); the counts of that proposal layout read from then on. NMS's rounds are
        learned from the pass run again (:meth:`took_rounds`)."""
        for (kind, key), needed in failed:
            if kind in ("width", "groups"):
                setattr(self, kind, max(getattr(self, kind), needed))
            elif kind == "counts":
                self.counts_read.add(key)


LEARNED = Guesses()


class Misguessed(RuntimeError):
    """A guess's check failed; ``failed`` lists which (``((kind, key), needed)`` pairs)."""

    def __init__(self, failed: list[tuple[Hashable, int]]):
        super().__init__(f"guessed sizes were wrong: {failed}")
        self.failed = failed


class NotCapturable(RuntimeError):
    """A pass being captured (``cuda_graphs``) needed a size read from the device, e.g. the
    proposal counts of a pyramid shape whose images kept fewer than ``post_nms_top_n``."""


class Guessing:
    """The checks of one guessed pass, read with the pass's last read of the device."""

    def __init__(self, capturing: bool = False):
        self.checks: list[tuple[Hashable, Tensor, int]] = []
        self.capturing = capturing  # a CUDA graph's capture: a read would wait, so it is refused

    def check(self, what: Hashable, needed: Tensor, guessed: int) -> None:
        """Keep the largest of ``needed`` (integers) to compare, when read, with ``guessed``, the
        size the guess named ``what`` assumed; e.g. "not converged" as 1 against 0."""
        self.checks.append((what, needed.max().reshape(1).to(torch.int64), guessed))

    def read(self, values: Tensor | None = None) -> list[int]:
        """``values.tolist()`` (integers) and every check in one read; raises :class:`Misguessed`
        if a check failed, since then ``values`` came from a wrong guess."""
        if self.capturing:
            raise NotCapturable("a pass being captured reads a size from the device")
        parts = ([] if values is None else [values.reshape(-1).to(torch.int64)]) + [c for _, c, _ in self.checks]
        if not parts:
            return []
        read = torch.cat(parts).tolist()  # the pass's one wait
        n = 0 if values is None else values.numel()
        failed = [(what, needed) for (what, _, guessed), needed in zip(self.checks, read[n:]) if needed > guessed]
        if failed:
            raise Misguessed(failed)
        self.checks.clear()
        return read[:n]


_state = threading.local()


def active() -> Guessing | None:
    """The guessing pass running in this thread, if any."""
    return getattr(_state, "guessing", None)


def read(values: Tensor) -> list[int]:
    """``values.tolist()``; in a guessing pass, read with its checks: a size computed from a
    guess is only used once the guess is known to be right."""
    guessing = active()
    return values.tolist() if guessing is None else guessing.read(values)


@contextmanager
def guessing_pass(capturing: bool = False) -> Iterator[Guessing]:
    """A guessing pass in this thread whose checks the caller reads (``cuda_graphs``: a pass
    captured, or run to warm up for its capture, where ``capturing`` refuses every read)."""
    if active() is not None:
        raise RuntimeError("guessing_pass: a guessing pass is already active in this thread")
    _state.guessing = guessing = Guessing(capturing)
    try:
        yield guessing
    finally:
        _state.guessing = None


def guessing_enabled() -> bool:
    return os.environ.get("FPNLIB_GUESS_SIZES", "1") != "0"


def path_note() -> str:
    """For benchmark records of the grouped-NMS path's inference."""
    return ("sizes in the middle guessed, checked in the last read" if guessing_enabled()
            else "sizes read where needed (FPNLIB_GUESS_SIZES=0)")


def with_guessed_sizes(run: Callable[[], T], enabled: bool = True, guess: bool = True) -> T:
    """``run()`` with the sizes guessed (where ``enabled``, and guessing is not switched off);
    after a failed check, the guesses learn and ``run()`` runs again, reading each size.
    ``guess=False``: only that second pass (a caller that already knows a guess failed)."""
    if not enabled or not guessing_enabled() or active() is not None:
        return run()
    if guess:
        _state.guessing = guessing = Guessing()
        try:
            out = run()
            guessing.read()  # checks no read took along (none on fpnlib's detectors)
            return out
        except Misguessed as wrong:
            LEARNED.learn(wrong.failed)
        finally:
            _state.guessing = None
    _state.learning = True
    try:
        return run()
    finally:
        _state.learning = False
