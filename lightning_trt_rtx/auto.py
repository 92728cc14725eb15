"""``cuda_graph_strategy="auto"``: try each way of running the engines on the run's own batches, keep the fastest.

Whether CUDA graphs pay depends on the model, the batch and what the job does with its outputs (H200,
Trainer.predict, ms per batch: a 32x256 MLP 0.73 default / 0.35 whole-graph capture; a ResNet-50
program at batch 32 3.39 / 4.44). So the session times the candidates on the batches it serves:

* ``"disabled"``: no graphs (the default);
* ``"whole_graph_capture"``: the engines capture themselves, addresses left to torch-tensorrt (as upstream);
* ``"whole_graph_capture, held addresses"``: the same with :mod:`lightning_trt_rtx.addresses` holding the
  engines' addresses still, where it can hold them.

Each candidate runs a few warm-up batches (a settings change drops the execution context: the next
call re-creates it from the kernel cache, and a graph is captured at the first calls), then
:data:`TIMED` batches are timed; then :func:`choose` keeps the one with the lowest median per-batch
time, and ``"disabled"`` unless a capture candidate beats it by :data:`MARGIN` (noise never makes
``"auto"`` slower than the default). Nothing is timed after the decision. A batch of a shape not seen
before starts a new trial (the kept candidate first, so nothing switches for a shape that runs only a
few batches), up to :data:`MAX_SHAPES` shapes.

This module is the decision alone, pure and testable on recorded timings; the session drives it
(:meth:`lightning_trt_rtx.session.ServingSession.batch_ended`)::

    trial = Trial([DISABLED, UPSTREAM, HELD])
    for batch in loader:
        run(batch, trial.candidate)
        if trial.batch_ended():              # this batch's end is stamped (a CUDA event)
            ...
        if trial.window_full:
            trial.record(per_batch_ms)       # the window's times; the next candidate or the decision
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Literal

DISABLED = "disabled"
UPSTREAM = "whole_graph_capture"
HELD = "whole_graph_capture, held addresses"
CANDIDATES: tuple[str, ...] = (DISABLED, UPSTREAM, HELD)

MARGIN = 0.03  # a capture candidate is kept over "disabled" only when its median is this much lower
TIMED = 8  # timed batches per candidate
# batches left out after switching to a candidate: the first re-creates the execution context, the next
# captures; held addresses need two more (the first held call makes the engine's kept outputs)
WARMUP: Mapping[str, int] = {DISABLED: 2, UPSTREAM: 3, HELD: 5}
# the first candidate of a trial also runs the loop's first batches, slower than steady ones (measured on
# H200: a conv net's "disabled" looked 0.96 ms per batch in its window against 0.71 ms steady, so auto
# kept a slower candidate): it warms up this many batches more
FIRST_EXTRA_WARMUP = 8
MAX_SHAPES = 8  # new input shapes that start a new trial; beyond, the last decision stands


def engine_strategy(candidate: str) -> Literal["disabled", "whole_graph_capture"]:
    """The engines' ``cuda_graph_strategy`` under ``candidate``."""
    return "disabled" if candidate == DISABLED else "whole_graph_capture"


def choose(per_batch_ms: Mapping[str, Sequence[float]], margin: float = MARGIN) -> str:
    """The candidate to keep: the lowest median per-batch time; ``"disabled"`` unless a capture candidate's
    median is more than ``margin`` below it. Candidates without times are left out."""
    medians = {name: statistics.median(times) for name, times in per_batch_ms.items() if times}
    if not medians:
        return DISABLED
    best = min(medians, key=lambda name: (medians[name], CANDIDATES.index(name) if name in CANDIDATES else 99))
    if best != DISABLED and DISABLED in medians and medians[best] > medians[DISABLED] * (1.0 - margin):
        return DISABLED
    return best


class Trial:
    """One trial of ``candidates`` (the first is running now), batch by batch; see the module docs."""

    def __init__(self, candidates: Sequence[str], timed: int = TIMED, warmup: Mapping[str, int] = WARMUP) -> None:
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ValueError(f"Invalid candidates {list(candidates)!r}. Valid choices: {list(CANDIDATES)}.")
        if timed < 1:
            raise ValueError(f"timed must be at least 1, got {timed}.")
        self.candidates = tuple(dict.fromkeys(candidates))
        self.timed = timed
        self.warmup = dict(warmup)
        self.per_batch_ms: dict[str, list[float]] = {}
        self.decided: str | None = None
        self._index = 0
        self._batches = 0  # batches of the current candidate since it started (or its window restarted)

    @property
    def candidate(self) -> str:
        """The candidate to run now: the one under trial, or the one kept."""
        return self.decided if self.decided is not None else self.candidates[self._index]

    @property
    def window_full(self) -> bool:
        return self.decided is None and self._batches >= self._warmup() + self.timed

    def _warmup(self) -> int:
        first = FIRST_EXTRA_WARMUP if self._index == 0 and not self.per_batch_ms else 0
        return max(1, self.warmup.get(self.candidate, 1)) + first  # at least one: its end is the first stamp

    def batch_ended(self) -> bool:
        """Count a batch of the current candidate; whether its end is to be stamped (the window's
        ``timed + 1`` stamps: the last warm-up batch's end, then each timed batch's)."""
        if self.decided is not None:
            return False
        self._batches += 1
        return self._batches >= self._warmup()

    def restart_window(self) -> None:
        """Warm up and time the current candidate again (e.g. a loop ended in the middle of its window)."""
        self._batches = 0

    def record(self, per_batch_ms: Sequence[float]) -> str:
        """The current candidate's timed per-batch times; returns the candidate to run next (after the
        last one: the one kept)."""
        if self.decided is not None:
            raise RuntimeError("This trial has decided already: nothing more to record.")
        self.per_batch_ms[self.candidate] = [float(t) for t in per_batch_ms]
        self._batches = 0
        if self._index + 1 < len(self.candidates):
            self._index += 1
        else:
            self.decided = choose(self.per_batch_ms)
        return self.candidate

    @property
    def medians_ms(self) -> dict[str, float]:
        return {name: statistics.median(times) for name, times in self.per_batch_ms.items() if times}

    def describe(self) -> str:
        """For the figures: what was kept and the median per-batch times that decided it."""
        medians = ", ".join(f"{name} {ms:.3f}" for name, ms in self.medians_ms.items())
        if self.decided is None:
            tried = f" (so far, median ms per batch: {medians})" if medians else ""
            return f"trial not finished, ran {self.candidate}{tried}"
        counts = {len(t) for t in self.per_batch_ms.values()}
        each = f"{counts.pop()} batches each" if len(counts) == 1 else "batches: " + ", ".join(
            f"{name} {len(t)}" for name, t in self.per_batch_ms.items()
        )
        return f"kept {self.decided} (median ms per batch: {medians}; {each})"
