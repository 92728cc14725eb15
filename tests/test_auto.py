"""``cuda_graph_strategy="auto"`` on CPU: the decision rule on recorded timings, the trial's windows, the
session driving it over engines faked at our boundary (a ``TorchTensorRTModule`` whose forward takes as
long as its strategy says), its figures, and bad values. ``tests/gpu`` runs it on real engines."""

from __future__ import annotations

import math
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule

from lightning_trt_rtx import (
    ServingSession,
    TRTRuntimePrecision,
    TRTRuntimeSettings,
    TRTSettings,
    addresses,
    auto,
    transfers,
)
from lightning_trt_rtx.auto import DISABLED, HELD, UPSTREAM, Trial, choose
from lightning_trt_rtx.report import RankFigures, table

# --- the decision rule, on recorded per-batch times (ms) -----------------------------------------------

# H200, Trainer.predict, 32x256 MLP: default 0.73, upstream capture 0.35, held addresses 0.56 ms per batch
GRAPHS_WIN = {DISABLED: [0.74, 0.73, 0.71, 0.90, 0.73], UPSTREAM: [0.35, 0.36, 0.34, 0.80, 0.35],
              HELD: [0.56, 0.55, 0.57, 0.56, 0.58]}  # fmt: skip
# a ResNet-50 program at batch 32: default 3.39, whole-graph capture 4.44 ms per batch
GRAPHS_LOSE = {DISABLED: [3.40, 3.39, 3.38, 3.41, 5.0], UPSTREAM: [4.44, 4.40, 4.46, 3.0, 4.45],
               HELD: [4.50, 4.42, 4.47, 4.44, 4.43]}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_first_extra_warmup(monkeypatch):
    """The windows these tests count start at the first batch (the extra warm-up has its own test); no
    decision of another test is remembered."""
    monkeypatch.setattr(auto, "FIRST_EXTRA_WARMUP", 0)
    auto.forget()
    yield
    auto.forget()


def test_the_first_candidate_warms_up_longer_than_the_others(monkeypatch):
    monkeypatch.setattr(auto, "FIRST_EXTRA_WARMUP", 8)
    trial = auto.Trial([auto.DISABLED, auto.UPSTREAM])
    stamped = [trial.batch_ended() for _ in range(auto.WARMUP[auto.DISABLED] + 8 + auto.TIMED)]
    assert stamped.index(True) == auto.WARMUP[auto.DISABLED] + 8 - 1 and trial.window_full
    trial.record([1.0] * auto.TIMED)
    stamped = [trial.batch_ended() for _ in range(auto.WARMUP[auto.UPSTREAM] + auto.TIMED)]
    assert stamped.index(True) == auto.WARMUP[auto.UPSTREAM] - 1 and trial.window_full


def test_the_fastest_median_is_kept_when_graphs_win():
    assert choose(GRAPHS_WIN) == UPSTREAM
    # with predictions kept on the GPU held addresses win (0.41 vs 0.76 ms)
    assert choose({DISABLED: [1.11] * 3, UPSTREAM: [0.76] * 3, HELD: [0.41, 0.40, 2.0]}) == HELD


def test_disabled_is_kept_when_graphs_lose_or_win_by_less_than_the_margin():
    assert choose(GRAPHS_LOSE) == DISABLED
    # 2% faster: noise, not a reason to leave the default
    assert choose({DISABLED: [1.00, 1.00, 1.01], UPSTREAM: [0.98, 0.98, 0.99]}) == DISABLED
    assert choose({DISABLED: [1.00, 1.00, 1.01], UPSTREAM: [0.96, 0.96, 0.97]}) == UPSTREAM
    assert choose({DISABLED: [1.0], UPSTREAM: [0.96]}, margin=0.05) == DISABLED
    assert choose({}) == DISABLED
    assert choose({UPSTREAM: [0.5], HELD: [0.5]}) == UPSTREAM  # a tie: the candidate without a wrapper


def test_a_switch_of_strategy_is_made_only_where_the_batches_left_win_it_back():
    losing = {DISABLED: [1.0] * 3, UPSTREAM: [1.2] * 3, HELD: [1.1] * 3}
    # graphs lose by 0.1 ms a batch: going back pays after 300 batches for a 30 ms switch
    assert choose(losing, current=HELD, remaining=100, switch_ms=30.0) == HELD
    assert choose(losing, current=HELD, remaining=1000, switch_ms=30.0) == DISABLED
    assert choose(losing, current=HELD) == DISABLED  # an endless loop: always worth it
    # capture faster than the default by less than the margin: already there, it stays
    assert choose({DISABLED: [1.0], UPSTREAM: [0.99]}, current=UPSTREAM, switch_ms=5.0) == UPSTREAM
    assert choose({DISABLED: [1.0], UPSTREAM: [0.99]}) == DISABLED
    # no switch needed among candidates of one engine strategy
    assert choose({UPSTREAM: [1.0], HELD: [0.5]}, current=UPSTREAM, remaining=1, switch_ms=1e9) == HELD
    # before trying: a loop that cannot win back two switches at WIN_BOUND of a batch tries nothing else
    assert auto.worth_switching(1.0, remaining=400, switch_ms=100.0)
    assert not auto.worth_switching(1.0, remaining=300, switch_ms=100.0)
    trial = Trial([DISABLED, UPSTREAM, HELD], timed=2)
    assert trial.record([2.0, 2.0], remaining=150, switch_ms=190.0) == DISABLED and trial.decided == DISABLED
    assert trial.describe().endswith(
        "whole_graph_capture, whole_graph_capture, held addresses not tried: the 150 batches left could not"
        " win back re-creating the execution contexts (about 190 ms), winning at most 1.000 ms a batch"
        " (50% of a batch)"
    )


def test_leaving_disabled_wins_at_most_the_steps_host_time():
    # graphs save launch work: a 2.6 ms batch whose step spends 0.3 ms on the host (the GPU or the data path
    # takes the rest; a ResNet-50 program at batch 32) can win 0.3 ms, not half of 2.6 ms
    assert auto.win_bound_ms(2.6) == pytest.approx(1.3)
    assert auto.win_bound_ms(2.6, host_ms=0.3) == pytest.approx(0.3)
    assert auto.win_bound_ms(0.7, host_ms=0.6) == pytest.approx(0.35)  # launch bound: half a batch still
    assert auto.worth_switching(2.6, remaining=200, switch_ms=100.0)
    assert not auto.worth_switching(2.6, remaining=200, switch_ms=100.0, host_ms=0.3)
    assert auto.worth_switching(2.6, remaining=math.inf, switch_ms=100.0, host_ms=0.0)  # a stream: always
    # a loop that waits for its data a tenth of a batch or more is paced by its data path: nothing to win
    assert auto.win_bound_ms(3.1, host_ms=1.9, waited_ms=0.9) == 0.0
    assert auto.win_bound_ms(3.1, host_ms=1.9, waited_ms=0.05) == pytest.approx(1.55)  # a jitter's wait
    assert not auto.worth_switching(3.1, remaining=400, switch_ms=1.0, waited_ms=0.9)
    trial = Trial([DISABLED, UPSTREAM, HELD], timed=2)
    decided = trial.record([2.6, 2.6], remaining=200, switch_ms=100.0, host_ms=[0.3, 0.31, 0.29])
    assert decided == DISABLED and trial.host_ms == {DISABLED: pytest.approx(0.3)}
    assert trial.describe().endswith(
        "could not win back re-creating the execution contexts (about 100 ms), winning at most 0.300 ms a batch"
        " (the steps' host time)"
    ), trial.describe()
    # under a capture strategy its host time says nothing of what "disabled" would win: half a batch counts
    trial = Trial([HELD, DISABLED], timed=2)
    assert trial.record([2.6, 2.6], remaining=200, switch_ms=100.0, host_ms=[0.05, 0.05]) == DISABLED
    assert not trial.not_tried and trial.decided is None


def test_what_a_later_loop_starts_with_is_the_fastest_of_a_complete_trial():
    # the loop kept disabled (going back to graphs did not pay over its last 50 batches); a later loop,
    # whose engines start under what is remembered, pays no switch: it starts with held addresses
    trial = Trial([HELD, UPSTREAM, DISABLED], timed=2)
    trial.record([0.79, 0.79], remaining=100, switch_ms=30.0)
    trial.record([0.89, 0.89], remaining=200, switch_ms=30.0)
    assert trial.record([0.98, 0.98], remaining=50, switch_ms=30.0) == DISABLED
    assert trial.fastest == HELD
    # a trial that left candidates out (a short loop) teaches nothing
    short = Trial([DISABLED, UPSTREAM, HELD], timed=2)
    short.record([1.4, 1.4], remaining=20, switch_ms=70.0)
    assert short.decided == DISABLED and short.fastest is None
    assert Trial([DISABLED, UPSTREAM]).fastest is None  # nor one not finished


def test_a_remembered_decision_is_checked_by_one_window_and_what_ran_faster_then_tried_again_when_slower():
    then = auto.Decision(HELD, {DISABLED: 1.0, UPSTREAM: 0.8, HELD: 0.5})
    kept = Trial([HELD, UPSTREAM, DISABLED], timed=2, recheck=then)
    assert kept.record([0.55, 0.6]) == HELD and kept.rechecked
    assert kept.describe() == (
        "kept whole_graph_capture, held addresses, decided earlier in this process (median ms per batch then:"
        " disabled 1.000, whole_graph_capture 0.800, whole_graph_capture, held addresses 0.500; now"
        " whole_graph_capture, held addresses 0.575)"
    )
    # 120% slower: a new trial of what ran 25% faster then than this runs now (upstream's 0.8 then; not
    # disabled's 1.0, whose switch of strategy costs most)
    slower = Trial([HELD, UPSTREAM, DISABLED], timed=2, recheck=then)
    assert slower.record([1.1, 1.1]) == UPSTREAM and not slower.rechecked
    assert slower.candidates == (HELD, UPSTREAM)
    assert slower.record([0.7, 0.7]) == UPSTREAM  # what the runs say now, not what they said then
    assert slower.fastest == UPSTREAM
    # 80% slower (e.g. a slower host): the others lost by more then, so nothing else is tried
    host = Trial([HELD, UPSTREAM, DISABLED], timed=2, recheck=then)
    assert host.record([0.9, 0.9]) == HELD and host.rechecked and host.slower_than_then
    assert host.fastest == HELD
    assert host.describe().endswith(
        "now whole_graph_capture, held addresses 0.900; over 25% slower, but none other ran as much faster then)"
    )
    assert Trial([DISABLED], recheck=then).recheck is None  # only for the remembered candidate first


def test_a_trial_times_each_candidate_after_its_warm_up_and_decides():
    trial = Trial([DISABLED, UPSTREAM, HELD], timed=4)
    stamped: list[tuple[str, int]] = []
    for candidate, times in GRAPHS_WIN.items():
        assert trial.candidate == candidate
        batches = 0
        while not trial.window_full:
            batches += 1
            if trial.batch_ended():
                stamped.append((candidate, batches))
        # the last warm-up batch's end, then each timed batch's: timed + 1 stamps
        warmup = auto.WARMUP[candidate]
        assert [b for c, b in stamped if c == candidate] == list(range(warmup, warmup + 5))
        trial.record(times[:4])
    assert trial.decided == UPSTREAM and trial.candidate == UPSTREAM
    assert not trial.batch_ended() and not trial.window_full  # nothing is timed after the decision
    assert trial.medians_ms == {DISABLED: pytest.approx(0.735), UPSTREAM: pytest.approx(0.355),
                                HELD: pytest.approx(0.56)}  # fmt: skip
    assert trial.describe() == (
        "kept whole_graph_capture (median ms per batch: disabled 0.735, whole_graph_capture 0.355,"
        " whole_graph_capture, held addresses 0.560; 4 batches each)"
    )
    with pytest.raises(RuntimeError, match="decided already"):
        trial.record([1.0])


def test_a_window_cut_short_is_timed_again_from_its_warm_up():
    trial = Trial([UPSTREAM, DISABLED], timed=2)
    for _ in range(4):
        trial.batch_ended()
    trial.restart_window()
    assert [trial.batch_ended() for _ in range(5)] == [False, False, True, True, True] and trial.window_full
    assert trial.describe() == "trial not finished, ran whole_graph_capture"


def test_batches_served_before_count_only_where_the_loop_can_still_finish_the_trial():
    assert auto.batches_to_come(40, served_before=1000, trial_left=31) == 1000
    assert auto.batches_to_come(20, served_before=1000, trial_left=31) == 20  # the trial would be cut
    assert auto.batches_to_come(500, served_before=100, trial_left=31) == 500
    after_the_first = sum(auto.WARMUP[c] + auto.TIMED for c in (UPSTREAM, HELD))
    assert Trial([DISABLED, UPSTREAM, HELD]).batches_left() == after_the_first
    # 40 batches of 1 ms left cannot win 2 x 60 ms back; 1000 served before can
    trial = Trial([DISABLED, UPSTREAM, HELD])
    assert trial.record([1.0] * 8, remaining=40, switch_ms=60.0, served_before=1000) == UPSTREAM
    trial = Trial([DISABLED, UPSTREAM, HELD])
    assert trial.record([1.0] * 8, remaining=40, switch_ms=60.0, served_before=100) == DISABLED
    assert "the 40 batches left (and the 100 served in earlier loops) could not win back" in trial.describe()


def test_a_trial_refuses_unknown_candidates_naming_the_valid_ones():
    valid = (
        "Valid choices: \\['disabled', 'call-site graphs', 'whole_graph_capture', 'whole_graph_capture, held"
        " addresses'\\]"
    )
    with pytest.raises(ValueError, match=valid):
        Trial(["fast"])
    with pytest.raises(ValueError, match="Valid choices"):
        Trial([])


# --- bad values, wherever a strategy is accepted -----------------------------------------------------


@pytest.mark.parametrize("value", ["Auto", "fast", "AUTO"])
def test_bad_strategies_are_refused_naming_the_valid_choices(value):
    valid = "Valid choices: 'disabled', 'whole_graph_capture', 'auto'"
    with pytest.raises(ValueError, match=valid):
        TRTSettings(cuda_graph_strategy=value)
    with pytest.raises(ValueError, match=valid):
        TRTRuntimeSettings(cuda_graph_strategy=value)
    with pytest.raises(ValueError, match=valid):
        TRTRuntimePrecision(cuda_graph_strategy=value)
    with pytest.raises(ValueError, match=valid):
        TRTSettings.from_yaml(f"cuda_graph_strategy: {value}")


def test_auto_is_accepted_everywhere_and_engines_start_without_graphs():
    settings = TRTSettings(cuda_graph_strategy="auto", runtime_cache=None)
    assert TRTSettings.from_yaml(settings.to_yaml()) == settings
    assert TRTRuntimeSettings(cuda_graph_strategy="auto").settings.cuda_graph_strategy == "auto"
    assert TRTRuntimePrecision(cuda_graph_strategy="auto").settings.cuda_graph_strategy == "auto"
    assert settings.to_runtime_settings().cuda_graph_strategy == "disabled"
    assert settings.to_runtime_settings(cuda_graph_strategy="whole_graph_capture").cuda_graph_strategy == (
        "whole_graph_capture"
    )


# --- the session driving a trial over engines faked at our boundary --------------------------------------


class EngineClock:
    """The clock the session and ``"auto"`` read: real time plus the time the fake engines took. A fake
    engine's call advances it instead of sleeping, so its pace is exact on a loaded host (a 1 ms sleep can
    take 3 ms on a busy CI machine, enough to turn a decision); everything else (the data path, the
    package's own work) still takes real time."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.ahead

    def advance(self, seconds: float) -> None:
        self.ahead += seconds

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def paced(trt, monkeypatch):
    """A real (engine-less) TorchTensorRTModule whose forward takes ``pace[strategy]`` ms on the clock the
    session and ``"auto"`` read: the engine is faked at our boundary; settings, the binding, the addresses
    wrapper and the session are real."""
    from lightning_trt_rtx import session as session_module

    engine_clock = EngineClock()
    monkeypatch.setattr(auto, "time", engine_clock)
    monkeypatch.setattr(session_module, "time", engine_clock)

    class Paced(trt.dynamo.runtime.TorchTensorRTModule):
        """``setup_ms``: the first call after a change of strategy re-creates the execution context."""

        clock = engine_clock

        def __init__(self, pace: dict[str, float], setup_ms: float = 0.0) -> None:
            super().__init__(name="paced")
            self.pace = pace
            self.setup_ms = setup_ms
            self.strategies: list[str] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            strategy = self.runtime_settings.cuda_graph_strategy
            setup = self.setup_ms if not self.strategies or self.strategies[-1] != strategy else 0.0
            self.strategies.append(strategy)
            self.clock.advance((self.pace[strategy] + setup) / 1e3)
            return x + 1

    return Paced


def _serve(session: ServingSession, engine, batches: list[torch.Tensor], known: bool = False) -> list[torch.Tensor]:
    """``known``: the loop says how many batches it runs."""
    outputs = []
    session.loop_started(batches=len(batches) if known else None)
    for x in batches:
        session.batch_started(x)
        outputs.append(engine(x))
        session.batch_ended()
    session.loop_ended()
    return outputs


def _session(**kwargs) -> ServingSession:
    trainer = SimpleNamespace(global_rank=0, local_rank=0, node_rank=0, world_size=1, strategy=SimpleNamespace())
    settings = TRTSettings(cuda_graph_strategy="auto", runtime_cache=None)
    return ServingSession.for_trainer(trainer, settings, loops_only=True)


class Served(LightningModule):
    """Runs one (paced) engine on each batch in ``predict_step``."""

    def __init__(self, engine) -> None:
        super().__init__()
        self.engine = engine

    def predict_step(self, batch, batch_idx):
        return self.engine(batch)


# batches of a first trial with held addresses (call-site graphs need a CUDA device: not a candidate here)
TRIAL = sum(auto.WARMUP[c] for c in (DISABLED, UPSTREAM, HELD)) + 3 * auto.TIMED


def test_auto_keeps_whole_graph_capture_where_graphs_win(paced, fake_gpu):
    engine = paced({"disabled": 6.0, "whole_graph_capture": 1.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    xs = [torch.full((4, 2), float(i)) for i in range(TRIAL + 6)]
    outputs = _serve(session, engine, xs)
    figures = session.close()
    assert all(torch.equal(y, x + 1) for x, y in zip(xs, outputs))
    # tried in order (the default first), then the kept one runs to the end of the loop
    d, u, h = (auto.WARMUP[c] + auto.TIMED for c in (DISABLED, UPSTREAM, HELD))
    assert engine.strategies[:d] == ["disabled"] * d
    assert engine.strategies[d:] == ["whole_graph_capture"] * (len(xs) - d)
    assert figures.auto.startswith("kept whole_graph_capture") or figures.auto.startswith(f"kept {HELD}")
    assert set(figures.auto_ms) == {DISABLED, UPSTREAM, HELD}
    assert figures.auto_ms[DISABLED] > 4.0 > 3.0 > figures.auto_ms[UPSTREAM]
    assert "8 batches each" in figures.auto
    assert engine.runtime_settings.cuda_graph_strategy == "disabled"  # given back on close
    assert "forward" not in vars(engine)  # the addresses wrapper too
    assert d + u + h == TRIAL


def test_auto_keeps_the_default_where_graphs_lose_and_switches_back_once(paced, fake_gpu):
    engine = paced({"disabled": 1.0, "whole_graph_capture": 5.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    xs = [torch.full((4, 2), float(i)) for i in range(TRIAL + 5)]
    _serve(session, engine, xs)
    figures = session.close()
    assert figures.auto.startswith("kept disabled (median ms per batch: disabled")
    assert engine.strategies[-5:] == ["disabled"] * 5
    switches = sum(a != b for a, b in zip(engine.strategies, engine.strategies[1:]))
    assert switches == 2  # to whole-graph capture for its two candidates, and back
    assert figures.capture == ""  # held addresses were not kept: nothing to say about them
    assert "auto" in table([figures]).splitlines()[0] and "kept disabled" in table([figures])


def test_only_steps_whose_engines_capture_hold_the_uploads_thread_back(paced, fake_gpu):
    """Under ``"auto"`` an uploads thread copies while the engines run without graphs (its overlap is the
    default's), and waits for the end of every step in which they may capture."""
    engine = paced({"disabled": 1.0, "whole_graph_capture": 5.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    session._step_gate.attached = True  # as a gated uploads thread sets it (no CUDA here for a real one)
    held = []
    session.loop_started()
    for x in [torch.zeros(4, 2)] * (TRIAL + 5):
        session.batch_started(x)
        held.append(session._step_gate.in_step)
        engine(x)
        session.batch_ended()
    session.loop_ended()
    session.close()
    assert held == [strategy == "whole_graph_capture" for strategy in engine.strategies]
    assert held[-5:] == [False] * 5 and any(held)  # kept "disabled" after trying graphs
    assert not session._step_gate.in_step


def test_a_new_input_shape_tries_again_starting_with_what_was_kept(paced, fake_gpu):
    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    first = [torch.zeros(4, 2)] * TRIAL
    _serve(session, engine, first)
    assert session.auto is not None and session.auto.trial is not None
    kept = session.auto.trial.decided
    assert kept in (UPSTREAM, HELD)
    # a loop later: a new shape starts a trial whose first candidate is the one in force (no switch)
    before = len(engine.strategies)
    seen = []
    session.loop_started()
    for x in [torch.zeros(2, 2)] * 3:
        session.batch_started(x)
        engine(x)
        session.batch_ended()
        seen.append((session.auto.trial.decided, session.auto.trial.candidates[0]))
    assert seen == [(None, kept)] * 3 and engine.strategies[before:] == ["whole_graph_capture"] * 3
    assert session.auto.describe().startswith(f"kept {kept} (median ms per batch: ")  # the decision that ran
    assert f"; a trial of a new input shape not finished (trial not finished, ran {kept}" in session.auto.describe()
    session.loop_ended()  # undecided at the loop's end: it goes on with batches of its shape in a later loop
    assert session.auto.trial.decided is None and session.auto.trial.candidates[0] == kept
    figures = session.close()
    assert figures.auto.startswith(f"kept {kept} (") and "2 trials (new input shapes)" in figures.auto
    assert "a trial of a new input shape not finished" in figures.auto
    assert set(figures.auto_ms) == {DISABLED, UPSTREAM, HELD}


def test_a_loops_last_smaller_batch_keeps_the_decision_in_the_figures(paced, fake_gpu, tmp_path):
    from tests.procs.lightning_models import make_trainer

    engine = paced({"disabled": 6.0, "whole_graph_capture": 1.0})
    callback = TRTRuntimeSettings(cuda_graph_strategy="auto", runtime_cache=None, print_table=False)
    loader = torch.utils.data.DataLoader(torch.zeros(4 * 100 + 2, 2), batch_size=4)
    make_trainer(tmp_path, callbacks=[callback]).predict(Served(engine), loader, return_predictions=False)
    (figures,) = callback.figures
    assert figures.auto.startswith(("kept whole_graph_capture", f"kept {HELD}")), figures.auto
    assert "trials" not in figures.auto and set(figures.auto_ms) == {DISABLED, UPSTREAM, HELD}


def test_a_trial_of_a_last_batch_does_not_time_the_next_loops_batches(paced, fake_gpu):
    """One session over several loops (loops=["validate"] inside fit): a stray shape at a loop's end (its
    length unknown) starts a trial that must not go on over the next loop's batches of the decided shape."""
    engine = paced({"disabled": 6.0, "whole_graph_capture": 1.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    loop = [torch.zeros(4, 2)] * 100 + [torch.zeros(2, 2)]
    _serve(session, engine, loop)
    before = len(engine.strategies)
    _serve(session, engine, loop)
    assert set(engine.strategies[before:]) == {"whole_graph_capture"}  # no switch to try "disabled" again
    assert session.close().auto.startswith(("kept whole_graph_capture", f"kept {HELD}"))


def test_a_second_shape_in_short_loops_of_unknown_length_decides_without_switching_every_loop(paced, fake_gpu):
    """A server's loops of unknown length (iterable data): a shape served 25 batches a loop goes on with its
    trial over the loops (its own batches only), so it decides, instead of starting over every loop."""
    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    a, b = torch.zeros(4, 2), torch.zeros(2, 2)
    _serve(session, engine, [a] * TRIAL)
    for _ in range(6):
        _serve(session, engine, [a] * 10 + [b] * 25)
    assert session.auto.trial.decided is not None and session.auto.trials == 2, session.auto.describe()
    switches = sum(1 for x, y in zip(engine.strategies, engine.strategies[1:]) if x != y)
    assert switches <= 4, engine.strategies
    session.close()


def test_a_remembered_candidate_that_the_loop_cannot_time_starts_no_trial(paced, fake_gpu):
    """A shape remembered with held addresses (12 warm-up batches and 8 timed) and 15 batches of it left: no
    switch to try what cannot be timed."""
    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    served = torch.nn.Sequential(engine)
    session = _session()
    session.serve(served)
    _serve(session, engine, [torch.zeros(4, 2)] * TRIAL)
    memory = auto._memory(session.auto._owner)
    assert memory is not None
    memory.decisions[(session.auto._engines, (16, 2))] = auto.Decision(HELD, {HELD: 1.0, DISABLED: 5.0})
    applied = len(engine.strategies)
    kept = session.auto.candidate
    _serve(session, engine, [torch.zeros(4, 2)] * 200 + [torch.zeros(16, 2)] * 15, known=True)
    assert session.auto.candidate == kept and session.auto.trials == 1
    assert len(set(engine.strategies[applied:])) == 1
    session.close()


@pytest.fixture
def by_shape(trt, fake_gpu, monkeypatch):
    """An engine whose pace depends on its input's batch size and strategy, on the session's clock."""
    from lightning_trt_rtx import session as session_module

    clock = EngineClock()
    monkeypatch.setattr(auto, "time", clock)
    monkeypatch.setattr(session_module, "time", clock)

    class ByShape(trt.dynamo.runtime.TorchTensorRTModule):
        def __init__(self, pace: dict[tuple[int, str], float]) -> None:
            super().__init__(name="by-shape")
            self.pace = pace
            self.ran: list[tuple[int, str]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ran = (x.shape[0], self.runtime_settings.cuda_graph_strategy)
            self.ran.append(ran)
            clock.advance(self.pace[ran] / 1e3)
            return x + 1

    return ByShape


# batch 4 loses from graphs, batch 64 gains a little, batch 16 gains much
PACE = {(4, "disabled"): 1.0, (4, "whole_graph_capture"): 5.0, (64, "disabled"): 3.0,
        (64, "whole_graph_capture"): 2.0, (16, "disabled"): 6.0, (16, "whole_graph_capture"): 1.0}  # fmt: skip


def _by_shape_session(engine) -> ServingSession:
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    _serve(session, engine, [torch.zeros(4, 2)] * (TRIAL + 5))  # batch 4 decides "disabled"
    assert session.auto.candidate == DISABLED
    return session


def test_a_new_shapes_trial_that_stops_seeing_its_shape_gives_the_main_shape_its_decision_back(by_shape):
    engine = by_shape(PACE)
    session = _by_shape_session(engine)
    a, b = torch.zeros(4, 2), torch.zeros(64, 2)
    _serve(session, engine, [b] * (auto.WARMUP[DISABLED] + auto.TIMED + 2))  # one window, then a switch
    for _ in range(5):
        _serve(session, engine, [a] * 100)
    assert [strategy for _, strategy in engine.ran[-100:]] == ["disabled"] * 100
    session.close()


def test_a_new_shape_mixed_into_the_decided_one_gives_its_trial_up(by_shape):
    """Batches 4 and 64 alternate, 64 remembered with upstream's capture: its windows never fill, so its trial
    is given up and the decided candidate runs again."""
    engine = by_shape(PACE)
    session = _by_shape_session(engine)
    memory = auto._memory(session.auto._owner)
    assert memory is not None
    memory.decisions[(session.auto._engines, (64, 2))] = auto.Decision(UPSTREAM, {UPSTREAM: 2.0, DISABLED: 3.0})
    _serve(session, engine, [torch.zeros(4, 2), torch.zeros(64, 2)] * 200)
    assert [strategy for size, strategy in engine.ran[-100:] if size == 4] == ["disabled"] * 50
    session.close()


def test_a_given_up_trial_lets_a_later_shape_have_its_own(by_shape):
    engine = by_shape(PACE)
    session = _by_shape_session(engine)
    a, b, c = torch.zeros(4, 2), torch.zeros(64, 2), torch.zeros(16, 2)
    _serve(session, engine, ([a] * 20 + [b] * 5) * 20)  # batch 64 in bursts shorter than a window
    _serve(session, engine, [c] * 500)
    assert [strategy for _, strategy in engine.ran[-100:]] == ["whole_graph_capture"] * 100
    session.close()


def test_other_shapes_between_a_switch_and_the_next_window_are_not_its_cost(by_shape):
    engine = by_shape({**PACE, (64, "whole_graph_capture"): 3.5})
    session = _by_shape_session(engine)
    a, b = torch.zeros(4, 2), torch.zeros(64, 2)
    first, rest = (auto.WARMUP[DISABLED] + auto.TIMED, auto.WARMUP[UPSTREAM] + auto.WARMUP[HELD] + 2 * auto.TIMED)
    _serve(session, engine, [b] * first + [a] * 20 + [b] * rest + [a] * 300, known=True)
    assert session.auto.switch_ms is not None and session.auto.switch_ms < 5.0, session.auto.describe()
    assert [strategy for _, strategy in engine.ran[-300:]] == ["disabled"] * 300
    session.close()


def test_a_new_shapes_trial_cut_short_by_a_burst_ending_gives_the_main_shape_its_decision_back(by_shape):
    """A shape that comes in one burst (its trial switched candidate after its first window), then the traffic
    goes back: after ABANDON_AFTER batches of the decided shape its candidate runs again, not the trial's."""
    engine = by_shape({(64, "disabled"): 1.0, (64, "whole_graph_capture"): 5.0, (4, "disabled"): 6.0,
                       (4, "whole_graph_capture"): 1.0})  # fmt: skip
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    a, b = torch.zeros(64, 2), torch.zeros(4, 2)
    _serve(session, engine, [a] * TRIAL)
    assert session.auto.candidate == DISABLED
    _serve(session, engine, [b] * 25 + [a] * 200)
    assert engine.ran[TRIAL + 24][1] == "whole_graph_capture"  # the burst's trial tried graphs
    assert engine.ran[-150:] == [(64, "disabled")] * 150
    assert session.close().auto.startswith("kept disabled")


def test_a_shape_first_seen_during_a_trial_gets_its_own_trial_after_the_decision(by_shape):
    """Batches of 4 win from graphs, batches of 64 lose: a batch of 64 that came during the first trial
    starts its own trial when batches of 64 come again, which keeps "disabled" for them."""
    engine = by_shape({(4, "disabled"): 6.0, (4, "whole_graph_capture"): 1.0, (64, "disabled"): 1.0,
                       (64, "whole_graph_capture"): 5.0})  # fmt: skip
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    a, b = torch.zeros(4, 2), torch.zeros(64, 2)
    _serve(session, engine, [a] * 20 + [b] + [a] * (TRIAL + 20) + [b] * 200)
    assert [strategy for _, strategy in engine.ran[-50:]] == ["disabled"] * 50
    session.close()




def test_auto_without_held_addresses_tries_two_candidates_and_says_why(paced, fake_gpu, monkeypatch):
    monkeypatch.setenv(addresses.ENABLED_ENV, "0")
    engine = paced({"disabled": 4.0, "whole_graph_capture": 1.0})
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    _serve(session, engine, [torch.zeros(4, 2)] * (auto.WARMUP[DISABLED] + auto.WARMUP[UPSTREAM] + 2 * auto.TIMED))
    figures = session.close()
    assert figures.auto.startswith("kept whole_graph_capture (")
    assert set(figures.auto_ms) == {DISABLED, UPSTREAM}
    assert figures.auto.endswith("held addresses and call-site graphs not tried: $LIGHTNING_TRT_RTX_STABLE_ADDRESSES=0")


def test_auto_without_batches_or_engines_says_so(paced, fake_gpu):
    session = _session()
    session.serve(torch.nn.Sequential(paced({"disabled": 0.0, "whole_graph_capture": 0.0})))
    assert session.close().auto == "disabled (not tried: no batch ran between batch_started and batch_ended)"
    session = _session()
    session.serve(torch.nn.Linear(2, 2), warn_if_none=False)
    session.batch_started(torch.zeros(1, 2))
    session.batch_ended()
    assert session.close().auto == "disabled (not tried: no TensorRT-RTX engines to time)"


def test_figures_carry_the_decision_through_a_gather():
    figures = RankFigures(auto="kept disabled (...)", auto_ms={DISABLED: 1.0, UPSTREAM: 2.0})
    from dataclasses import asdict

    assert RankFigures.from_dict(asdict(figures)) == figures
    assert "auto graphs: kept disabled" in figures.summary()


def test_lightning_cli_accepts_auto_for_the_callback_and_the_plugin(tmp_path, monkeypatch):
    import sys

    from tests.test_lightning_cli import VALID, build

    monkeypatch.setattr(sys, "argv", ["trainer.py"])
    config = tmp_path / "auto.yaml"
    with open(VALID, encoding="utf-8") as f:
        config.write_text(f.read().replace("whole_graph_capture", "auto"))
    cli = build(str(config), f"--trainer.default_root_dir={tmp_path}")
    assert cli.trainer.callbacks[0].settings.cuda_graph_strategy == "auto"
    assert cli.trainer.precision_plugin.settings.cuda_graph_strategy == "auto"


def test_the_plugin_alone_times_its_predict_steps_and_keeps_the_fastest(paced, fake_gpu, tmp_path, messages):
    from tests.procs.lightning_models import make_trainer

    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    plugin = TRTRuntimePrecision(cuda_graph_strategy="auto", runtime_cache=None)
    loader = torch.utils.data.DataLoader(torch.zeros(TRIAL + 4, 2), batch_size=1)
    out = make_trainer(tmp_path, plugins=[plugin]).predict(Served(engine), loader)
    assert len(out) == TRIAL + 4 and all(torch.equal(y, torch.ones(1, 2)) for y in out)
    assert engine.strategies[-4:] == ["whole_graph_capture"] * 4
    (summary,) = [r.getMessage() for r in messages.records if r.getMessage().startswith("TensorRT-RTX serving")]
    assert "auto graphs: kept whole_graph_capture" in summary, summary


class ServedEval(Served):
    """Runs its engine in validation, test and (an engine-free) training steps too."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def validation_step(self, batch, batch_idx):
        self.engine(batch)

    def test_step(self, batch, batch_idx):
        self.engine(batch)

    def training_step(self, batch, batch_idx):
        return (self.weight * batch.sum()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_the_plugin_alone_tells_auto_how_long_a_validation_or_test_loop_is(paced, fake_gpu, tmp_path, stage):
    from tests.procs.lightning_models import make_trainer

    engine = paced({"disabled": 1.0, "whole_graph_capture": 0.2}, setup_ms=60.0)
    plugin = TRTRuntimePrecision(cuda_graph_strategy="auto", runtime_cache=None)
    loader = torch.utils.data.DataLoader(torch.zeros(40, 2), batch_size=1)
    trainer = make_trainer(tmp_path, plugins=[plugin])
    getattr(trainer, stage)(ServedEval(engine), loader, verbose=False)
    assert set(engine.strategies) == {"disabled"}  # 40 batches cannot win back a 60 ms switch twice
    assert plugin.session is None  # closed at teardown


def test_the_plugin_alone_tells_auto_how_long_the_sanity_check_is(paced, fake_gpu, tmp_path):
    from tests.procs.lightning_models import make_trainer

    engine = paced({"disabled": 1.0, "whole_graph_capture": 0.2}, setup_ms=60.0)
    plugin = TRTRuntimePrecision(cuda_graph_strategy="auto", runtime_cache=None)
    loader = torch.utils.data.DataLoader(torch.zeros(40, 2), batch_size=1)
    trainer = make_trainer(tmp_path, plugins=[plugin], max_epochs=1, num_sanity_val_steps=-1, limit_train_batches=1)
    trainer.fit(ServedEval(engine), loader, loader)
    # the 40 sanity batches (then the epoch's 40) cannot win back a 60 ms switch twice
    assert len(engine.strategies) == 80 and set(engine.strategies) == {"disabled"}


def test_the_plugin_alone_ends_a_validation_loop_when_training_steps_again(paced, fake_gpu, tmp_path, monkeypatch):
    from tests.procs.lightning_models import make_trainer

    ended: list[int] = []
    real_loop_ended = ServingSession.loop_ended

    def loop_ended(self):
        ended.append(self.figures.batches)
        real_loop_ended(self)

    monkeypatch.setattr(ServingSession, "loop_ended", loop_ended)
    engine = paced({"disabled": 1.0, "whole_graph_capture": 0.2}, setup_ms=60.0)
    plugin = TRTRuntimePrecision(cuda_graph_strategy="auto", runtime_cache=None)
    data = torch.utils.data.DataLoader(torch.zeros(6, 2), batch_size=1)
    trainer = make_trainer(tmp_path, plugins=[plugin], max_epochs=2, num_sanity_val_steps=0)
    trainer.fit(ServedEval(engine), data, data)
    # each epoch's validation loop (6 batches) ended: the first at the next training step, the last at teardown
    assert ended == [6, 6], ended


def _decided_once(engine) -> tuple[torch.nn.Module, str]:
    """A first loop over ``engine`` that runs a whole trial: the served module, and what its figures say."""
    served = torch.nn.Sequential(engine)
    first = _session()
    first.serve(served)
    _serve(first, engine, [torch.zeros(4, 2)] * TRIAL)
    return served, first.close().auto


def test_a_later_loop_starts_with_the_decision_and_only_checks_it(paced, fake_gpu):
    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    served, decided = _decided_once(engine)
    kept = decided.removeprefix("kept ").split(" (")[0]
    assert kept in (UPSTREAM, HELD)
    before = len(engine.strategies)
    second = _session()  # a new Trainer.predict over the same engines (another wrapper), in the same process
    second.serve(torch.nn.Sequential(engine))
    outputs = _serve(second, engine, [torch.zeros(4, 2)] * (auto.WARMUP[kept] + auto.TIMED + 3))
    assert all(torch.equal(y, torch.ones(4, 2)) for y in outputs)
    assert engine.strategies[before:] == ["whole_graph_capture"] * len(outputs)  # no switch at all
    figures = second.close()
    assert figures.auto.startswith(f"kept {kept}, decided earlier in this process"), figures.auto
    auto.forget(served)
    third = _session()
    third.serve(served)
    _serve(third, engine, [torch.zeros(4, 2)] * 4)
    assert third.close().auto.startswith("trial not finished, ran disabled")


def test_a_later_loop_on_a_slower_host_does_not_switch_back_to_what_lost_by_more(paced, fake_gpu):
    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    served, _ = _decided_once(engine)
    engine.pace = {"disabled": 15.0, "whole_graph_capture": 3.0}  # everything three times slower
    before = len(engine.strategies)
    second = _session()
    second.serve(served)
    _serve(second, engine, [torch.zeros(4, 2)] * TRIAL)
    figures = second.close()
    # the other capture candidate (1 ms then) is tried again, under the same engine strategy; not disabled (5 ms)
    assert engine.strategies[before:] == ["whole_graph_capture"] * TRIAL, figures.auto
    assert DISABLED not in figures.auto_ms and set(figures.auto_ms) == {UPSTREAM, HELD}, figures.auto


def test_a_short_loop_with_a_costly_switch_stays_with_the_default_and_says_why(paced, fake_gpu):
    # each change of strategy costs 60 ms (the first call too): 40 batches of 1 ms cannot win 2 x 60 ms back
    engine = paced({"disabled": 1.0, "whole_graph_capture": 0.2}, setup_ms=60.0)
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    _serve(session, engine, [torch.zeros(4, 2)] * 40, known=True)
    figures = session.close()
    assert set(engine.strategies) == {"disabled"}
    assert "not tried: the 30 batches left could not win back re-creating the execution contexts" in figures.auto
    # a long loop tries, measures the switch, and keeps graphs
    engine = paced({"disabled": 1.0, "whole_graph_capture": 0.2}, setup_ms=60.0)
    session = _session()
    session.serve(torch.nn.Sequential(engine))
    _serve(session, engine, [torch.zeros(4, 2)] * 400, known=True)
    figures = session.close()
    assert figures.auto.startswith(("kept whole_graph_capture", f"kept {HELD}")), figures.auto
    cost = float(figures.auto.split("a strategy switch cost ")[1].split(" ms")[0])
    assert 50.0 <= cost <= 120.0, figures.auto


def test_short_loops_of_a_long_running_process_try_graphs_once_enough_batches_were_served(paced, fake_gpu):
    """A server's short loops: each alone too short to win a switch back, together long enough."""
    engine = paced({"disabled": 6.0, "whole_graph_capture": 3.0}, setup_ms=60.0)
    model = torch.nn.Sequential(engine)
    said = []
    for _ in range(6):  # a session each, as each Trainer.predict has
        session = _session()
        session.serve(model)
        session.loop_started(batches=80)
        for i in range(80):
            x = torch.zeros(4, 2)
            session.batch_started(x)
            engine.clock.advance(0.2 if i == 0 else 0.0)  # a loop's first batch: what a switch is estimated to cost
            engine(x)
            session.batch_ended()
        session.loop_ended()
        said.append(session.close().auto)
    assert "not tried: the 70 batches left could not win back" in said[0], said[0]
    assert "(and the 80 served in earlier loops)" in said[1], said[1]
    tried = next(i for i, text in enumerate(said) if "could not win back" not in text)
    assert tried == 2, said  # 80 x 6 ms at half a batch < 2 x 200 ms <= 160 x 6 ms
    assert said[tried].startswith(("kept whole_graph_capture", f"kept {HELD}")), said[tried]
    assert all("decided earlier in this process" in text for text in said[tried + 1 :]), said
    assert not any("could not win back" in text for text in said[tried:])


def test_the_callback_tells_auto_how_long_the_loop_is(paced, fake_gpu, tmp_path):
    from tests.procs.lightning_models import make_trainer

    engine = paced({"disabled": 1.0, "whole_graph_capture": 0.2}, setup_ms=60.0)
    callback = TRTRuntimeSettings(cuda_graph_strategy="auto", runtime_cache=None, print_table=False)
    loader = torch.utils.data.DataLoader(torch.zeros(40, 2), batch_size=1)
    make_trainer(tmp_path, callbacks=[callback]).predict(Served(engine), loader, return_predictions=False)
    assert "not tried: the 30 batches left" in callback.figures[0].auto, callback.figures[0].auto
    assert set(engine.strategies) == {"disabled"}


def test_a_remembered_candidate_that_no_longer_applies_is_not_tried(monkeypatch):
    """The driver alone (its windows' times recorded): held addresses were kept, then cannot be held."""
    per_batch = {DISABLED: 3.0, UPSTREAM: 2.0, HELD: 1.0}
    monkeypatch.setattr(auto.AutoGraphs, "_window", lambda self: ([per_batch[self.candidate]] * auto.TIMED, None))
    owner, x = torch.nn.Linear(1, 1), torch.zeros(2)
    applied: list[str] = []
    first = auto.AutoGraphs(applied.append)
    first.bind(owner, [7])
    while first.trial is None or first.trial.decided is None:
        first.batch_started(x, lambda: auto.Options((DISABLED, UPSTREAM, HELD)))
        first.batch_ended()
    assert first.trial.decided == HELD and applied == [UPSTREAM, HELD]
    second = auto.AutoGraphs(applied.append)
    second.bind(owner, [7])
    assert second.candidate == HELD  # where the engines start: what was decided
    second.batch_started(x, lambda: auto.Options((DISABLED, UPSTREAM), held_left_out="off"))
    assert applied[-1] == DISABLED and second.trial is not None and second.trial.candidates == (DISABLED, UPSTREAM)


@pytest.mark.parametrize("batches", [-1, "200", True, float("nan"), 2.5])
def test_a_loop_length_that_is_not_a_count_is_refused(batches):
    session = _session()
    with pytest.raises(ValueError, match="batches must be a whole number >= 0"):
        session.loop_started(batches=batches)
    with pytest.raises(TypeError, match="cuda must be True or False"):
        session.loop_started(cuda="no", batches=10)
    session.loop_started(batches=float("inf"))  # a loop of unknown length
    session.loop_ended()
    session.loop_started(batches=200.0)  # a count given as a float (Lightning's batch counts can be)
    session.loop_ended()


def test_forget_names_what_it_takes():
    with pytest.raises(TypeError, match=r"forget takes the served module \(or None for every decision\); got 'model'"):
        auto.forget("model")
    auto.forget(torch.nn.Linear(2, 2))  # a module nothing was remembered for: nothing to drop


def test_upload_ahead_arguments_are_checked_on_every_host():
    for kwargs in (dict(steps_marked="yes"), dict(small_on_host="yes")):
        with pytest.raises(TypeError, match="must be True or False"):
            _session().upload_ahead([torch.zeros(2)], "cpu", **kwargs)
    for batches in (None, 5, "batches"):
        with pytest.raises(TypeError, match="batches must be an iterable of batches"):
            _session().upload_ahead(batches, "cpu")


def test_a_separate_memory_keeps_a_first_loop_from_wiping_a_later_loops_decision(paced, fake_gpu):
    engine = paced({"disabled": 5.0, "whole_graph_capture": 1.0})
    served = torch.nn.Sequential(engine)

    def loop(batches: int) -> str:
        session = _session()
        session.serve(served)
        _serve(session, engine, [torch.zeros(4, 2)] * batches)
        return session.close().auto

    later = weakref.WeakKeyDictionary()
    with auto.separate_memory(later) as store:
        assert store is later
        kept = loop(TRIAL).removeprefix("kept ").split(" (")[0]
    assert kept in (UPSTREAM, HELD) and len(later) == 1
    assert loop(4).startswith("trial not finished, ran disabled")  # outside: the process remembered nothing
    with auto.separate_memory():  # a first loop: nothing remembered, and what it decides stays inside
        assert loop(TRIAL).startswith("kept ")
    assert loop(4).startswith("trial not finished, ran disabled")
    with auto.separate_memory(later):  # the later loop still starts with its own decision
        assert loop(auto.WARMUP[kept] + auto.TIMED + 1).startswith(f"kept {kept}, decided earlier in this process")
    with pytest.raises(TypeError, match="WeakKeyDictionary"):
        with auto.separate_memory({}):  # type: ignore[arg-type]
            pass


def _until_decided(session: ServingSession, engine, batches) -> str:
    """Serves ``batches`` until ``"auto"`` decides, ends the loop and the session: the figures' text."""
    for x in batches:
        session.batch_started(x)
        engine(x)
        session.batch_ended()
        if session.auto is not None and session.auto.trial is not None and session.auto.trial.decided:
            break
    session.loop_ended()
    return session.close().auto


def test_a_loop_bound_by_its_data_path_does_not_try_graphs_that_cannot_win(paced, fake_gpu):
    # the engine's step takes 0.2 ms on the host (a little more with the session's hooks), the
    # loader 4 ms between steps: graphs could win that much a batch at most, and 190 batches cannot win back
    # 2 x 120 ms (at half a batch they could); an engine whose step is the batch's time tries
    def loop(engine, between_s: float) -> str:
        def batches():
            for _ in range(200):
                time.sleep(between_s)  # the data path (a loader, collation) outside the step
                yield torch.zeros(4, 2)

        session = _session()
        session.serve(torch.nn.Sequential(engine))
        session.loop_started(batches=200)
        return _until_decided(session, engine, batches())

    data_bound = loop(paced({"disabled": 0.2, "whole_graph_capture": 0.1}, setup_ms=120.0), between_s=0.004)
    assert data_bound.startswith("kept disabled") and "(the steps' host time)" in data_bound, data_bound
    step_bound = loop(paced({"disabled": 4.0, "whole_graph_capture": 0.1}, setup_ms=120.0), between_s=0.0)
    assert step_bound.startswith(("kept whole_graph_capture", f"kept {HELD}")), step_bound


def test_a_loop_waiting_for_its_uploads_does_not_try_graphs_and_says_why(paced, fake_gpu):
    # uploads ahead from a data path that takes 6 ms a batch, a step of 3 ms: the loop waits about 3 ms a
    # batch for its data, so no strategy can win (without the wait, 190 batches at half a 3 ms batch could
    # win back 2 x 120 ms); the same loop fed at once tries
    from tests.test_transfers import RecordingOps

    def loop(read_s: float) -> str:
        def source():
            for _ in range(200):
                time.sleep(read_s)
                yield torch.zeros(4, 2)

        engine = paced({"disabled": 3.0, "whole_graph_capture": 0.1}, setup_ms=120.0)
        session = _session()
        session.serve(torch.nn.Sequential(engine))
        session.loop_started(batches=200)
        session.uploads = transfers.UploadsAhead(source(), "cpu", ops=RecordingOps())
        session.uploads.THREAD_MIN_BYTES = 0  # read by its thread, as batches of 1 MiB and more are
        return _until_decided(session, engine, session.uploads)

    waiting = loop(read_s=0.006)
    assert waiting.startswith("kept disabled") and "the loop waited" in waiting, waiting
    assert "waited for data, median ms: disabled" in waiting, waiting
    fed = loop(read_s=0.0)
    assert fed.startswith(("kept whole_graph_capture", f"kept {HELD}")), fed
