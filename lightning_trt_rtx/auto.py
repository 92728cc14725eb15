"""``cuda_graph_strategy="auto"``: try each way of running the engines on the run's own batches, keep the fastest.

Whether CUDA graphs pay depends on the model, the batch and what the job does with its outputs (H200,
Trainer.predict, ms per batch: a 32x256 MLP 0.73 default / 0.35 whole-graph capture; a ResNet-50
program at batch 32 3.39 / 4.44). So the session times the candidates on the batches it serves:

* ``"disabled"``: no graphs (the default);
* ``"call-site graphs"``: the engines without their own capture, each call site (the module that runs
  them) captured by :mod:`lightning_trt_rtx.addresses` in a CUDA graph of its own, where it can be: one
  replay per call, without torch-tensorrt's per-call host work (the engines' strategy stays
  ``"disabled"``, so trying it costs no switch);
* ``"whole_graph_capture"``: the engines capture themselves, addresses left to torch-tensorrt (as upstream);
* ``"whole_graph_capture, held addresses"``: the same with :mod:`lightning_trt_rtx.addresses` holding the
  engines' addresses still, where it can hold them.

The last two (the engines' own capture) are tried only where call-site graphs cannot capture every
engine's call site (:data:`SITE_GRAPHS_COVER_ALL`): where they can, the trial is ``"disabled"`` against
call-site graphs, under one engine strategy, and never switches, unless the call-site graphs' window ran
calls outside a graph after all (a non-tensor input, autograd, a failed capture: :meth:`Trial.widen`;
the process remembers it, and later trials of those engines offer the engines' own capture from the
start). A decision is remembered with the candidates it was chosen among; a later loop that offers one
more runs a whole trial.

Each candidate runs a few warm-up batches, then :data:`TIMED` batches are timed; :func:`choose` keeps
the one with the lowest median per-batch time, and ``"disabled"`` unless a capture candidate beats it
by :data:`MARGIN` (noise never makes ``"auto"`` slower than the default). Nothing is timed after the
decision. A batch of a shape not seen before starts a new trial once the running one has decided (the
kept candidate first, so nothing switches for a shape that runs only a few batches), up to
:data:`MAX_SHAPES` shapes, where the loop has batches enough left to time one candidate; a trial of a new
shape times only batches of that shape, and is given up after :data:`ABANDON_AFTER` batches of other
shapes before its next window (the decision before it stands again).

**What a trial costs.** Changing the engines' strategy re-creates their execution contexts (and their
kernels, from the runtime cache): about what the loop's first batch took, 10 ms to 200 ms on H200. A
trial pays that once to try graphs and, if they lose, once more to go back. So it is cost-aware:

* it leaves the engines' strategy only when the batches to come could win that back twice at
  :data:`WIN_BOUND` of a batch's time (the most graphs were measured to win), and, leaving
  ``"disabled"``, at no more than the steps' own host time: graphs save the host's launch work, so a
  step that spends 0.3 ms on the host of a 2.6 ms batch (the GPU or the data path is what takes the
  time) gains at most 0.3 ms; and it wins nothing where the loop waits :data:`DATA_BOUND` of a batch or
  more for its data (uploads ahead, whose thread reads and stages the batches: the data path sets the
  pace, and a faster step only waits longer). Until the first switch the cost is estimated by the loop's
  first batch, then it is the one measured. The batches to come:
  those left in the loop, or, where more, as many as these engines served under ``"auto"`` in earlier
  loops of this process (a process that has served N batches is taken to serve about N more: short
  loops in a long-running server), if the loop's batches left can still finish the trial (what a
  complete trial decides, later loops start with);
* it goes back only when what going back wins over the batches left exceeds the switch's cost;
* the fastest candidate of a trial that timed them all (without the cost of getting there, which a
  later loop does not pay) is remembered for the engines and the input shape, for the rest of the
  process (as long as the engines live): a later loop (a new ``Trainer.predict``, a new session)
  starts with it and times one window to check it; only a candidate running :data:`RECHECK` slower
  than when it was chosen starts a new trial, of the candidates that ran as much faster then than it
  runs now (a slower host slows them all: one that lost by more then cannot win now; a change in the job,
  e.g. predictions now kept on the GPU, can make one win). :func:`forget` drops what was remembered;
  :func:`separate_memory` keeps what runs inside a block apart from the rest of the process.

The decision (:func:`choose`, :class:`Trial`) is pure and testable on recorded timings;
:class:`AutoGraphs` drives it for a :class:`~lightning_trt_rtx.session.ServingSession`: it stamps the
ends of a window's batches with CUDA events on the current stream and synchronises once per window.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

DISABLED = "disabled"
SITE_GRAPHS = "call-site graphs"
UPSTREAM = "whole_graph_capture"
HELD = "whole_graph_capture, held addresses"
CANDIDATES: tuple[str, ...] = (DISABLED, SITE_GRAPHS, UPSTREAM, HELD)

MARGIN = 0.03  # a capture candidate is kept over "disabled" only when its median is this much lower
TIMED = 8  # timed batches per candidate
# batches left out after switching to a candidate: the first re-creates the execution context, the next
# captures; held addresses take longer to settle (measured on H200 with 5: their window ran 25-40% slower
# than their steady state on two MLPs, 0.94 vs 0.75 ms and 0.76 vs 0.57 ms, against a window after 13
# batches that matched it; auto then kept a slower candidate)
# call-site graphs: GRAPH_AFTER (2) calls as they are, the capture, then one replay more
WARMUP: Mapping[str, int] = {DISABLED: 2, SITE_GRAPHS: 4, UPSTREAM: 3, HELD: 12}
# the first candidate of a trial also runs the loop's first batches, slower than steady ones (measured on
# H200: a conv net's "disabled" looked 0.96 ms per batch in its window against 0.71 ms steady, so auto
# kept a slower candidate): it warms up this many batches more
FIRST_EXTRA_WARMUP = 8
MAX_SHAPES = 8  # new input shapes that start a new trial; beyond, the last decision stands
# a new shape's trial that this many batches of other shapes interrupt before it times its next window is
# given up: the decision before it (and its candidate) stands again (the shape came in a burst and the
# traffic went back, or it comes mixed with the decided shape, where its windows never fill)
ABANDON_AFTER = 32
# the largest share of a batch's time graphs were measured to win (H200, a 32x256 MLP: 0.73 -> 0.35 ms)
WIN_BOUND = 0.5
RECHECK = 0.25  # a remembered decision is tried again when its window is this much slower than when chosen
# a loop that waits this share of a batch for its data (uploads ahead, from their thread) is bound by its data
# path: no strategy wins there (measured on H200: a loaded ResNet-50 at batch 32 waited about 0.9 ms of its
# 3.1 ms batches, and ran 3.20 / 3.93 / 3.23 ms per batch without graphs / upstream capture / held addresses)
DATA_BOUND = 0.1
# where call-site graphs can capture every engine's call site, the engines' own capture is not tried: it replays
# the same engine work behind torch-tensorrt's per-call host work (H200, one call in a bare loop: 44 us against
# 52, 78 against 82), and ran at most 5% faster per batch in Trainer.predict (six models, predictions dropped and
# kept: benchmarks/results/site-graphs-h200 and auto-two-candidates-h200), while trying it costs two strategy
# switches (10-200 ms each)
SITE_GRAPHS_COVER_ALL = (
    "call-site graphs capture every engine's call site: the same replay without torch-tensorrt's per-call work,"
    " and no strategy switch"
)


def engine_strategy(candidate: str) -> Literal["disabled", "whole_graph_capture"]:
    """The engines' ``cuda_graph_strategy`` under ``candidate``."""
    return "disabled" if candidate in (DISABLED, SITE_GRAPHS) else "whole_graph_capture"


def _order(name: str) -> int:
    return CANDIDATES.index(name) if name in CANDIDATES else len(CANDIDATES)


def choose(
    per_batch_ms: Mapping[str, Sequence[float]],
    margin: float = MARGIN,
    current: str | None = None,
    remaining: float = math.inf,
    switch_ms: float = 0.0,
) -> str:
    """The candidate to keep: the lowest median per-batch time; ``"disabled"`` unless a capture candidate's
    median is more than ``margin`` below it. Candidates without times are left out.

    ``current``: the candidate running now. When the one chosen needs another engine strategy (a switch of
    about ``switch_ms``), the fastest under the current strategy is kept instead unless what the switch
    wins over the ``remaining`` batches exceeds its cost."""
    medians = {name: statistics.median(times) for name, times in per_batch_ms.items() if times}
    if not medians:
        return DISABLED
    best = min(medians, key=lambda name: (medians[name], _order(name)))
    if best != DISABLED and DISABLED in medians and medians[best] > medians[DISABLED] * (1.0 - margin):
        best = DISABLED
    if current in medians and engine_strategy(best) != engine_strategy(current):
        strategy = engine_strategy(current)
        stay = min((n for n in medians if engine_strategy(n) == strategy), key=lambda n: (medians[n], _order(n)))
        gain = medians[stay] - medians[best]
        if gain <= 0 or gain * remaining <= switch_ms:
            best = stay
    return best


def paced_by_data(median_ms: float, waited_ms: float) -> bool:
    """Whether a loop of ``median_ms`` batches that waited ``waited_ms`` a batch for its data is paced by its
    data path (:data:`DATA_BOUND` of a batch or more): a faster step only waits longer."""
    return waited_ms >= DATA_BOUND * median_ms


def win_bound_ms(median_ms: float, host_ms: float = math.inf, waited_ms: float = 0.0) -> float:
    """The most a batch of ``median_ms`` can win from another strategy: :data:`WIN_BOUND` of it, and no more
    than ``host_ms``, the steps' own host time without graphs (the launch work graphs save); nothing where
    the loop is :func:`paced_by_data`."""
    if paced_by_data(median_ms, waited_ms):
        return 0.0
    return min(median_ms * WIN_BOUND, host_ms)


def worth_switching(
    median_ms: float, remaining: float, switch_ms: float, host_ms: float = math.inf, waited_ms: float = 0.0
) -> bool:
    """Whether a trial should change the engines' strategy (a switch of about ``switch_ms``, and maybe one
    back): only if the ``remaining`` batches could win twice that at :func:`win_bound_ms` a batch."""
    if math.isinf(remaining):  # an endless loop wins back any switch (and 0 x inf is no number)
        return True
    return remaining * win_bound_ms(median_ms, host_ms, waited_ms) >= 2.0 * switch_ms


def batches_to_come(remaining: float, served_before: int, trial_left: int) -> float:
    """The batches a switch of strategy can pay off over: the loop's ``remaining`` ones, or, where more, as
    many as were ``served_before`` (earlier loops of this process), if ``remaining`` can still run the
    ``trial_left`` batches of the trial (a trial cut by the loop's end is lost with its session)."""
    return max(remaining, served_before) if remaining >= trial_left else remaining


@dataclass
class Decision:
    """What a trial kept, the medians that decided it, and what a switch of strategy cost then."""

    candidate: str
    medians_ms: dict[str, float]
    switch_ms: float = 0.0
    candidates: tuple[str, ...] = CANDIDATES  # what it was chosen among (a later loop offering more tries them)


class Trial:
    """One trial of ``candidates`` (the first is running now), batch by batch; see the module docs.

    ``recheck``: a decision remembered from an earlier loop, its candidate first: one window checks it."""

    def __init__(
        self,
        candidates: Sequence[str],
        timed: int = TIMED,
        warmup: Mapping[str, int] = WARMUP,
        recheck: Decision | None = None,
        options: Options | None = None,
    ) -> None:
        unknown = [c for c in candidates if c not in CANDIDATES]
        if unknown or not candidates:
            raise ValueError(f"Invalid candidates {list(candidates)!r}. Valid choices: {list(CANDIDATES)}.")
        if timed < 1:
            raise ValueError(f"timed must be at least 1, got {timed}.")
        self.candidates = tuple(dict.fromkeys(candidates))
        self.timed = timed
        self.warmup = dict(warmup)
        self.recheck = recheck if recheck is not None and recheck.candidate == self.candidates[0] else None
        self.per_batch_ms: dict[str, list[float]] = {}
        self.host_ms: dict[str, float] = {}  # each candidate's median host time of a step (where measured)
        self.waited_ms: dict[str, float] = {}  # each candidate's median wait for its batch (where measured)
        # what the session offered it (why others are left out)
        self.options = options if options is not None else Options(self.candidates)
        self.decided: str | None = None
        self.rechecked = False  # decided by checking a remembered decision
        self.slower_than_then = False  # rechecked, over RECHECK slower than then, and nothing else ran as fast then
        self.not_tried = ""  # candidates left out because switching could not pay, and why
        self._index = 0
        self._batches = 0  # batches of the current candidate since it started (or its window restarted)

    @property
    def candidate(self) -> str:
        """The candidate to run now: the one under trial, or the one kept."""
        return self.decided if self.decided is not None else self.candidates[self._index]

    @property
    def window_full(self) -> bool:
        return self.decided is None and self._batches >= self.warmup_batches() + self.timed

    def warmup_batches(self) -> int:
        """Batches the current candidate runs before it is timed."""
        first = FIRST_EXTRA_WARMUP if self._index == 0 and not self.per_batch_ms else 0
        return self._warmup_of(self.candidate) + first

    def _warmup_of(self, candidate: str) -> int:
        return max(1, self.warmup.get(candidate, 1))  # at least one: its end is the window's first stamp

    def batch_ended(self) -> bool:
        """Count a batch of the current candidate; whether its end is to be stamped (the window's
        ``timed + 1`` stamps: the last warm-up batch's end, then each timed batch's)."""
        if self.decided is not None:
            return False
        self._batches += 1
        return self._batches >= self.warmup_batches()

    def batches_left(self) -> int:
        """Batches the candidates after the current one need (warm-up and window)."""
        return sum(self._warmup_of(c) + self.timed for c in self.candidates[self._index + 1 :])

    def widen(self, options: Options) -> None:
        """Try the candidates of ``options`` too, after the ones there are (e.g. the engines' own capture, once
        call-site graphs turn out to leave calls outside a graph); a remembered decision being checked is
        tried again among them all (it was chosen among fewer)."""
        self.candidates = tuple(dict.fromkeys((*self.candidates, *options.candidates)))
        self.options = options
        self.recheck = None

    def restart_window(self) -> None:
        """Warm up and time the current candidate again (e.g. a loop ended in the middle of its window)."""
        self._batches = 0

    def record(
        self,
        per_batch_ms: Sequence[float],
        remaining: float = math.inf,
        switch_ms: float = 0.0,
        served_before: int = 0,
        host_ms: Sequence[float] = (),
        waited_ms: Sequence[float] = (),
    ) -> str:
        """The current candidate's timed per-batch times; returns the candidate to run next (after the
        last one: the one kept). ``remaining``: batches left in the loop; ``switch_ms``: what changing
        the engines' strategy costs (measured, or estimated); ``served_before``: batches these engines
        served in earlier loops of this process (see :func:`batches_to_come`); ``host_ms``: the host time
        of the same steps (from the step's start to its end, not waiting for the GPU), and ``waited_ms``: how
        long the loop waited for each of those batches (uploads ahead), where measured."""
        if self.decided is not None:
            raise RuntimeError("This trial has decided already: nothing more to record.")
        current = self.candidate
        self.per_batch_ms[current] = [float(t) for t in per_batch_ms]
        if host_ms:
            self.host_ms[current] = statistics.median(host_ms)
        if waited_ms:
            self.waited_ms[current] = statistics.median(waited_ms)
        self._batches = 0
        median = statistics.median(self.per_batch_ms[current]) if per_batch_ms else math.inf
        # leaving "disabled", graphs can win at most the launch work its steps do on the host
        host = self.host_ms.get(current, math.inf) if engine_strategy(current) == DISABLED else math.inf
        waited = self.waited_ms.get(current, 0.0)
        if self.recheck is not None and len(self.per_batch_ms) == 1 and current in self.recheck.medians_ms:
            then = self.recheck.medians_ms
            # slower than then: only what ran faster then, by as much, than this runs now is tried again (a
            # slower host slows every candidate, so what lost then by more cannot win now; a change in the job
            # can make it win)
            faster = [c for c in self.candidates[1:] if then.get(c, 0.0) * (1.0 + RECHECK) < median]
            slower = median > then[current] * (1.0 + RECHECK)
            if not slower or not faster:
                self.decided, self.rechecked, self.slower_than_then = current, True, slower
                return current
            self.candidates = (current, *faster)
        if self._index + 1 < len(self.candidates):
            upcoming = self.candidates[self._index + 1]
            to_come = batches_to_come(remaining, served_before, self.batches_left())
            left = ", ".join(self.candidates[self._index + 1 :])
            same_strategy = engine_strategy(upcoming) == engine_strategy(current)
            if (remaining >= self._warmup_of(upcoming) + self.timed) if same_strategy else worth_switching(
                median, to_come, switch_ms, host, waited
            ):
                self._index += 1  # under the same strategy it costs its warm-up batches only
                return self.candidate
            if same_strategy:
                self.not_tried = f"{left} not tried: the {remaining:.0f} batches left could not time them"
            else:
                earlier = f" (and the {served_before} served in earlier loops)" if served_before else ""
                bound = win_bound_ms(median, host, waited)
                why = (
                    f"the loop waited {waited:.3f} ms a batch for its data" if paced_by_data(median, waited)
                    else "the steps' host time" if bound == host
                    else f"{WIN_BOUND:.0%} of a batch"
                )  # fmt: skip
                self.not_tried = (
                    f"{left} not tried: the {remaining:.0f} batches left{earlier} could not win back re-creating the"
                    f" execution contexts (about {switch_ms:.0f} ms), winning at most {bound:.3f} ms a batch ({why})"
                )
        self.decided = choose(self.per_batch_ms, current=current, remaining=remaining, switch_ms=switch_ms)
        return self.decided

    @property
    def fastest(self) -> str | None:
        """What a later loop should start with: the fastest of a trial that timed every candidate
        (:func:`choose` without the cost of getting there: a later loop's engines start under it); None
        for a trial that left candidates out (nothing is learnt)."""
        if self.rechecked:
            return self.decided
        if self.decided is None or len(self.per_batch_ms) < len(self.candidates):  # e.g. some not tried
            return None
        return choose(self.per_batch_ms)

    @property
    def medians_ms(self) -> dict[str, float]:
        return {name: statistics.median(times) for name, times in self.per_batch_ms.items() if times}

    def describe(self) -> str:
        """For the figures: what was kept and the median per-batch times that decided it."""
        medians = ", ".join(f"{name} {ms:.3f}" for name, ms in self.medians_ms.items())
        if self.decided is None:
            tried = f" (so far, median ms per batch: {medians})" if medians else ""
            return f"trial not finished, ran {self.candidate}{tried}"
        if self.rechecked and self.recheck is not None:
            then = ", ".join(f"{name} {ms:.3f}" for name, ms in self.recheck.medians_ms.items())
            slower = f"; over {RECHECK:.0%} slower, but none other ran as much faster then"
            slower = slower if self.slower_than_then else ""
            return (
                f"kept {self.decided}, decided earlier in this process (median ms per batch then: {then};"
                f" now {medians}{slower})"
            )
        counts = {len(t) for t in self.per_batch_ms.values()}
        each = f"{counts.pop()} batches each" if len(counts) == 1 else "batches: " + ", ".join(
            f"{name} {len(t)}" for name, t in self.per_batch_ms.items()
        )
        host = ", ".join(f"{name} {ms:.3f}" for name, ms in self.host_ms.items())
        also = f"; the steps' median host ms: {host}" if host else ""
        if any(self.waited_ms.values()):
            also += "; waited for data, median ms: " + ", ".join(f"{n} {ms:.3f}" for n, ms in self.waited_ms.items())
        text = f"kept {self.decided} (median ms per batch: {medians}; {each}{also})"
        return f"{text}; {self.not_tried}" if self.not_tried else text


# --- what this process remembers ----------------------------------------------------------------------


@dataclass
class _Memory:
    """The decisions made for one served module: by engines and input shape, and the latest."""

    decisions: dict[tuple, Decision] = field(default_factory=dict)
    latest: dict[tuple[int, ...], str] = field(default_factory=dict)
    served: dict[tuple[int, ...], int] = field(default_factory=dict)  # batches served under "auto", by engines
    # engines whose call-site graphs ran calls outside a graph (their trials offer the engines' own capture too)
    outside_graphs: set[tuple[int, ...]] = field(default_factory=set)


_REMEMBERED: weakref.WeakKeyDictionary[Any, _Memory] = weakref.WeakKeyDictionary()


def forget(module: Any = None) -> None:
    """Drop the decisions remembered for the engines under ``module`` (default: every decision): their
    next loop under ``"auto"`` runs a whole trial again."""
    if module is None:
        _REMEMBERED.clear()
        return
    try:
        weakref.ref(module)
    except TypeError:  # nothing that cannot be referenced weakly is ever remembered: a str, a number
        raise TypeError(f"forget takes the served module (or None for every decision); got {module!r}.") from None
    for holder in [module, *module.modules()] if isinstance(module, torch.nn.Module) else [module]:
        _REMEMBERED.pop(holder, None)


@contextmanager
def separate_memory(store: weakref.WeakKeyDictionary | None = None) -> Iterator[weakref.WeakKeyDictionary]:
    """Inside the block, ``"auto"`` remembers decisions in ``store`` and recalls them from it alone (a new
    store: nothing is remembered, as in a new process); afterwards what the process remembered before is back
    and ``store`` holds what was decided inside. For comparing ways of serving in one process, e.g. a
    process's first loop and its later ones (``benchmarks/graphs.py``), without one run deciding for another."""
    global _REMEMBERED
    if store is None:
        store = weakref.WeakKeyDictionary()
    elif not isinstance(store, weakref.WeakKeyDictionary):
        raise TypeError(f"store must be a weakref.WeakKeyDictionary (from an earlier block) or None; got {store!r}.")
    outer, _REMEMBERED = _REMEMBERED, store
    try:
        yield store
    finally:
        _REMEMBERED = outer


@dataclass(frozen=True)
class Options:
    """What the session offers a trial: the candidates that apply, or why none does."""

    candidates: tuple[str, ...] = ()
    off: str = ""  # why nothing is tried (then "disabled" stays)
    held_left_out: str = ""  # why held addresses are not a candidate
    graphs_left_out: str = ""  # why call-site graphs are not a candidate
    own_capture_left_out: str = ""  # why the engines' own capture (upstream's, or with held addresses) is not one


# --- the driver ----------------------------------------------------------------------------------------


class AutoGraphs:
    """Drives ``"auto"`` for one session: ``apply(candidate)`` puts the engines under a candidate (the
    session re-applies the settings and holds or lets go of the addresses); after the decision nothing is
    timed."""

    def __init__(self, apply: Callable[[str], None]) -> None:
        self._apply = apply
        self.candidate = DISABLED  # in force now: engines start without graphs
        self.trial: Trial | None = None  # the latest trial
        self.trials = 0
        self.shapes: set[Any] = set()  # the input shapes trials were started for
        self._decided: tuple[Trial, Any] | None = None  # the latest trial that decided, and its input shapes
        self._batch_key: Any = None  # the input shapes of the current batch
        self._others = 0  # batches of other shapes since a new shape's trial started or timed a window
        self.off = ""  # why nothing is tried (then "disabled" stays)
        self.switch_ms: float | None = None  # what changing the engines' strategy cost, once measured
        self._owner: Any = None  # the served module, and its engines' ids: the key of what is remembered
        self._engines: tuple[int, ...] = ()
        self._trial_key: Any = None  # the input shapes of the latest trial
        self._options: Callable[[], Options] | None = None  # what the session offers (asked again to widen)
        self._cuda = torch.cuda.is_available()
        self._stamps: list[Any] = []  # this window's: CUDA events, or perf_counter seconds
        self._host_ms: list[float] = []  # this window's timed steps' host time (start to end, no GPU wait)
        self._waited_ms: list[float] = []  # this window's timed batches' wait for their data
        self._step_started = 0.0  # perf_counter at the current step's start
        # the loop's total wait for data at the last batch's start, and at the one before (None: not measured)
        self._waited_s: tuple[float | None, float | None] = (None, None)
        self._switched_at: Any = None  # the stamp before the engines' strategy changed (its cost is measured)
        self._last_stamp: Any = None  # the last window's last stamp

    def bind(self, owner: Any, engine_ids: Sequence[int]) -> None:
        """The engines served (before the settings are applied) and a module that holds them (what is
        decided is remembered on it, weakly): they start under the candidate decided last for them in this
        process, so a later loop (even through another LightningModule) does not switch at all."""
        self._owner, self._engines = owner, tuple(engine_ids)
        memory = _memory(owner)
        latest = memory.latest.get(self._engines) if memory is not None else None
        if latest is not None and self.trial is None and not self.off:
            self.candidate = latest

    # --- per batch ---------------------------------------------------------------------------------

    def batch_started(
        self, batch: Any, options: Callable[[], Options], waited_s: float | None = None, left: float = math.inf
    ) -> None:
        """Before each batch: ``waited_s``, how long the loop has waited for its data so far (uploads ahead;
        None: not measured); ``left``: the loop's batches from this one on (``inf``: unknown).

        A batch of an input shape no trial was started for starts one once the running trial has decided
        (seen during an undecided trial, it waits for its next batch after the decision), the kept candidate
        (or the one remembered for the shape) first, where the loop has batches enough left to time that
        candidate once: a loop's last, smaller batch starts none. Such a trial times only batches of its
        own shape."""
        self._step_started = time.perf_counter()
        self._options = options
        self._waited_s = (waited_s, self._waited_s[0])
        self._batch_key = key = shape_key(batch)
        if self.off or len(self.shapes) >= MAX_SHAPES:
            return
        if self.trial is None:
            self.shapes.add(key)
            self._start(key, options())
        elif key not in self.shapes and key is not None and self.trial.decided is not None:
            if self._start(key, options(), left):  # a new input shape: try again, the kept candidate first
                self.shapes.add(key)

    def batch_ended(self, remaining: float = math.inf, first_batch_ms: float = 0.0) -> None:
        """After each batch: ``remaining`` batches in the loop (``inf``: unknown), and the loop's first
        batch's time (what a switch is estimated to cost until one is measured)."""
        trial = self.trial
        if trial is None or trial.decided is not None:
            return
        if self._decided is not None and self._batch_key != self._trial_key:
            # a new shape's trial times its own batches only (and contiguous ones: its window starts again)
            trial.restart_window()
            self._clear_window()
            self._switched_at = None  # other batches since a switch: its cost is not measured
            self._others += 1
            if self._others >= ABANDON_AFTER:  # the traffic went back: the decision before stands again
                self.trial, self._trial_key = self._decided
                assert self.trial.decided is not None
                self._switch(self.trial.decided)
            return
        if trial.batch_ended():
            step_ms = (time.perf_counter() - self._step_started) * 1e3
            self._stamp()
            if len(self._stamps) > 1:  # a timed batch (the window's first stamp ends its warm-up)
                self._host_ms.append(step_ms)
                now, before = self._waited_s
                if now is not None:  # a new loop's uploads count from 0
                    self._waited_ms.append(max(0.0, now - (before or 0.0)) * 1e3)
        if not trial.window_full:
            return
        warmup = trial.warmup_batches()
        host_ms, waited_ms = self._host_ms, self._waited_ms  # the window's (cleared below)
        times, since_switch = self._window()
        if since_switch is not None and times:  # the switch: the warm-up's time beyond steady batches
            self.switch_ms = max(0.0, since_switch - warmup * statistics.median(times))
        estimate = self.switch_ms if self.switch_ms is not None else first_batch_ms
        memory = _memory(self._owner)
        served = memory.served.get(self._engines, 0) if memory is not None else 0
        self._others = 0  # the trial timed a window
        if trial.candidate == SITE_GRAPHS and trial.options.own_capture_left_out:
            self._widen(trial)
        self._switch(trial.record(times, remaining, estimate, served, host_ms, waited_ms))
        if trial.decided is not None:
            self._decided = (trial, self._trial_key)
            self._remember(trial)

    def loop_ended(self, batches: int = 0) -> None:
        """A window cut by the loop's end is timed again from its warm-up in the next loop (a trial of a new
        input shape goes on with that shape's batches only). ``batches``: the loop's batches (later loops
        count them as served before them)."""
        if self.trial is not None and self.trial.decided is None:
            self.trial.restart_window()
        memory = self._own_memory() if batches else None
        if memory is not None:
            memory.served[self._engines] = memory.served.get(self._engines, 0) + batches
        self._clear_window()
        self._switched_at = self._last_stamp = None
        self._waited_s = (None, None)

    def stop(self, why: str) -> None:
        """Try nothing (any more): the engines run without graphs; the figures say ``why``."""
        self.off = why
        self.trial = None
        self._clear_window()
        self._switch(DISABLED)

    # --- trials ------------------------------------------------------------------------------------

    def _start(self, key: Any, options: Options, left: float = math.inf) -> bool:
        """Start a trial for input shapes ``key``; whether it started: not where the loop's ``left`` batches
        cannot time its first candidate once (nor where ``options`` say nothing applies)."""
        if options.off:
            self.off = options.off
            return False
        memory = _memory(self._owner)
        if options.own_capture_left_out and memory is not None and self._engines in memory.outside_graphs:
            # these engines' call-site graphs ran calls outside a graph earlier in this process
            own = (*options.candidates, UPSTREAM, HELD)
            options = replace(options, candidates=tuple(dict.fromkeys(own)), own_capture_left_out="")
        remembered = memory.decisions.get((self._engines, key)) if memory is not None else None
        if remembered is not None and (
            remembered.candidate not in options.candidates or not set(options.candidates) <= set(remembered.candidates)
        ):
            remembered = None  # decided among other candidates: one no longer offered, or without one offered now
        # the trial's first candidate: the one remembered for these shapes, else the one in force where it applies
        first = remembered.candidate if remembered is not None else (
            self.candidate if self.candidate in options.candidates else DISABLED
        )
        if left < Trial([first]).warmup_batches() + TIMED:  # the loop cannot time it once
            return False
        self._last_stamp = None  # a switch now is timed from nothing earlier
        self._switch(first)
        if remembered is not None and remembered.switch_ms and self.switch_ms is None:
            self.switch_ms = remembered.switch_ms
        # the candidate in force first, then those under the same engine strategy (no switch), then the rest
        strategy = engine_strategy(self.candidate)
        rest = [c for c in options.candidates if c != self.candidate]
        ordered = [self.candidate, *sorted(rest, key=lambda c: engine_strategy(c) != strategy)]
        self.trial = Trial(ordered, recheck=remembered, options=options)
        self._trial_key = key
        self._others = 0
        self.trials += 1
        self._clear_window()
        self._switched_at = None
        return True

    def _widen(self, trial: Trial) -> None:
        """Call-site graphs were offered as covering every engine: where their window ran calls outside a
        graph after all (a non-tensor input, autograd, a failed capture), the engines' own capture joins."""
        assert self._options is not None
        options = self._options()
        if not options.own_capture_left_out and not options.off:
            trial.widen(options)
            memory = self._own_memory()
            if memory is not None:  # later trials of these engines offer them all from the start
                memory.outside_graphs.add(self._engines)

    def _switch(self, candidate: str) -> None:
        if candidate == self.candidate:
            return
        if engine_strategy(candidate) != engine_strategy(self.candidate):
            self._switched_at = self._last_stamp  # the end of the window just timed (None: none was)
        self._clear_window()
        self.candidate = candidate
        self._apply(candidate)  # a strategy change drops the execution contexts

    def _remember(self, trial: Trial) -> None:
        fastest = trial.fastest
        if fastest is None:  # a trial that left candidates out teaches nothing
            return
        memory = self._own_memory()
        if memory is None:
            return
        assert trial.decided is not None
        medians = dict(trial.recheck.medians_ms) if trial.rechecked and trial.recheck else {}
        if not trial.slower_than_then:  # a slow window of its own is no yardstick for the next check
            medians.update(trial.medians_ms)
        # a recheck's candidates are among the remembered decision's (a trial offering more is no recheck)
        among = trial.candidates if trial.recheck is None else trial.recheck.candidates
        memory.decisions[(self._engines, self._trial_key)] = Decision(fastest, medians, self.switch_ms or 0.0, among)
        memory.latest[self._engines] = fastest

    def _own_memory(self) -> _Memory | None:
        """What this process remembers for the served module (made on first use; None: nothing can be)."""
        if self._owner is None:
            return None
        try:
            return _REMEMBERED.setdefault(self._owner, _Memory())
        except TypeError:  # a module that cannot be referenced weakly: nothing is remembered
            return None

    # --- timing ------------------------------------------------------------------------------------

    def _clear_window(self) -> None:
        self._stamps, self._host_ms, self._waited_ms = [], [], []

    def _stamp(self) -> None:
        if not self._cuda:
            self._stamps.append(time.perf_counter())
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()  # on the current stream: where the batch's work was queued
        self._stamps.append(event)

    def _window(self) -> tuple[list[float], float | None]:
        """The window's per-batch ms, and the ms from the last stamp before a strategy switch to the
        window's first stamp (None without a switch): one synchronisation."""
        stamps = self._stamps
        self._clear_window()
        switched_at, self._switched_at = self._switched_at, None
        if not stamps:
            return [], None
        self._last_stamp = stamps[-1]
        if not self._cuda:
            since = (stamps[0] - switched_at) * 1e3 if switched_at is not None else None
            return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], since
        stamps[-1].synchronize()  # the window's one synchronisation
        since = switched_at.elapsed_time(stamps[0]) if switched_at is not None else None
        return [a.elapsed_time(b) for a, b in zip(stamps, stamps[1:])], since

    # --- figures -----------------------------------------------------------------------------------

    def _reported(self) -> Trial | None:
        """The trial the figures report: the latest, or, while a trial of a new input shape runs, the
        latest that decided (what runs for the shapes served most)."""
        if self.trial is not None and self.trial.decided is None and self._decided is not None:
            return self._decided[0]
        return self.trial

    def medians_ms(self) -> dict[str, float]:
        trial = self._reported()
        return trial.medians_ms if trial is not None else {}

    def describe(self) -> str:
        if self.off:
            return f"disabled (not tried: {self.off})"
        trial = self._reported()
        if trial is None:
            return "disabled (not tried: no batch ran between batch_started and batch_ended)"
        text = trial.describe()
        if trial is not self.trial and self.trial is not None:
            text += f"; a trial of a new input shape not finished ({self.trial.describe()})"
        if self.switch_ms is not None and not trial.rechecked:
            text += f"; a strategy switch cost {self.switch_ms:.1f} ms"
        if self.trials > 1:
            text += f"; {self.trials} trials (new input shapes)"
        options = trial.options
        if options.held_left_out and options.held_left_out == options.graphs_left_out:
            text += f"; held addresses and call-site graphs not tried: {options.held_left_out}"
        else:
            text += f"; held addresses not tried: {options.held_left_out}" if options.held_left_out else ""
            text += f"; call-site graphs not tried: {options.graphs_left_out}" if options.graphs_left_out else ""
        if options.own_capture_left_out:
            text += f"; {UPSTREAM} and {HELD} not tried: {options.own_capture_left_out}"
        return text


def _memory(module: Any) -> _Memory | None:
    try:
        return _REMEMBERED.get(module) if module is not None else None
    except TypeError:
        return None


def shape_key(batch: Any) -> Any:
    """A batch's input shapes, cheaply: a tensor, or the tensors of a list, tuple or dict (one level)."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape)
    if isinstance(batch, (list, tuple)):
        return tuple(tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__ for b in batch)
    if isinstance(batch, dict):
        return tuple((k, tuple(v.shape)) for k, v in batch.items() if isinstance(v, torch.Tensor))
    return None
