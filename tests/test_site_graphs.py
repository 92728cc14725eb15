"""Call-site graphs (``$LIGHTNING_TRT_RTX_STABLE_ADDRESSES=graphs``, and ``"auto"``'s candidate), on CPU.

A CUDA graph cannot be captured here, so the capture is faked at our own boundary
(``addresses._capture_call``, ``addresses._side_stream``): the "capture" runs the call once, as a real
capture runs its Python, and each replay runs it again on the graph's input buffers and writes the
result into the outputs the capture returned, as a real replay writes into the graph's memory. The
engine is the runtime-like fake of ``tests/test_addresses.py``. ``tests/gpu`` captures real engines.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_trt_rtx import ServingSession, TRTSettings, addresses, auto
from lightning_trt_rtx.addresses import GRAPH_AFTER, StableAddresses
from lightning_trt_rtx.engines import Engine
from tests.test_addresses import BareEngine, RuntimeLikeEngine, batches, program
from tests.test_auto import paced as paced_engines
from tests.test_session import engine_tree


class FakeGraph:
    def __init__(self, call, outputs) -> None:
        self.call, self.outputs, self.replays = call, outputs, 0

    def replay(self) -> None:
        self.replays += 1
        fresh = self.call()
        for kept, new in zip(addresses._tensors(self.outputs), addresses._tensors(fresh)):
            kept.copy_(new)


@pytest.fixture
def captured(monkeypatch):
    """Every fake graph captured, in order."""
    graphs: list[FakeGraph] = []

    def capture(call, stream):
        graph = FakeGraph(call, call())
        graphs.append(graph)
        return graph, graph.outputs

    monkeypatch.setattr(addresses, "_capture_call", capture)
    monkeypatch.setattr(addresses, "_side_stream", lambda device: object())
    monkeypatch.setattr(addresses, "why_no_site_graphs", lambda: "")  # as on a GPU host
    return graphs


def graphed(engine: nn.Module) -> StableAddresses:
    stable = StableAddresses([Engine("engine", "module", engine)], graphs=True)
    stable.install()
    return stable


def test_a_signature_is_captured_after_its_first_calls_and_every_caller_keeps_its_own_output(settings, captured):
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    xs = batches(*[8] * 10)
    kept = [engine(x) for x in xs]  # every output kept alive, as a writer keeping predictions would
    assert all(torch.equal(y, 2 * x + 1) for x, y in zip(xs, kept))  # never overwritten by a later replay
    assert len(captured) == 1 and captured[0].replays == len(xs) - GRAPH_AFTER
    site = stable.sites[0]
    assert (site.captures, site.replays, site.eager) == (1, len(xs) - GRAPH_AFTER, GRAPH_AFTER)
    assert stable.describe() == f"call-site graphs: 1 call site(s), 1 capture(s), 8 of {len(xs)} call(s) replayed"
    stable.uninstall()
    assert "forward" not in vars(engine) and site.graph is None


def test_each_input_signature_has_its_own_graph_and_a_smaller_last_batch_is_right(settings, captured):
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    xs = batches(8, 8, 8, 8, 3, 3, 3, 3, 8, 3)
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)
    assert len(captured) == 2  # one per shape, each after GRAPH_AFTER calls of its own
    with torch.inference_mode():  # inference mode is part of the signature: its buffers are its own
        x = batches(8)[0]
        assert all(torch.equal(engine(x), 2 * x + 1) for _ in range(GRAPH_AFTER + 2))
    assert len(captured) == 3
    stable.uninstall()


def test_one_graph_at_a_time_and_a_call_at_other_shapes_frees_it(settings, captured):
    """TensorRT ties a captured graph to its context's input shapes: a call at other shapes runs as it is
    (and sets them), so the graph before it is never replayed again; calls in a row at a shape capture it."""
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    site = stable.sites[0]
    for x in batches(8, 8, 8, 16, 8, 16, 8, 8, 8):
        assert torch.equal(engine(x), 2 * x + 1)
    assert [g.replays for g in captured] == [1, 1]  # batch 8 captured, freed by 16, captured again after 2 in a row
    assert site.graph is not None and site.graph[0][3][0][0] == 8
    assert (site.captures, site.replays, site.eager) == (2, 2, 7)
    stable.uninstall()


def test_engines_that_capture_themselves_are_never_captured_again(settings, captured):
    """A capture inside ours fails in CUDA: engines holding whole_graph_capture run as they are."""
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = graphed(engine)
    xs = batches(*[8] * 6)
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)
    assert not captured and stable.sites[0].eager == len(xs)
    stable.uninstall()


def test_a_capture_that_fails_leaves_the_site_running_as_it_is_and_says_why(settings, monkeypatch):
    def fail(call, stream):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(addresses, "_capture_call", fail)
    monkeypatch.setattr(addresses, "_side_stream", lambda device: object())
    monkeypatch.setattr(addresses, "why_no_site_graphs", lambda: "")
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    xs = batches(*[8] * 6)
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)
    assert stable.describe() == (
        "call-site graphs: 1 call site(s), 0 capture(s), 0 of 6 call(s) replayed; NOT captured at 1 call site(s):"
        " its call could not be captured in a CUDA graph (RuntimeError: operation not permitted when stream is"
        " capturing)"
    )
    stable.uninstall()


def test_an_engine_that_cannot_be_captured_is_named_with_why(settings, captured, monkeypatch):
    why = "it runs collectives (NCCL)"
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: why)
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    assert all(torch.equal(engine(x), 2 * x + 1) for x in batches(*[8] * 5))
    assert not captured
    assert stable.describe().endswith(f"NOT captured at 1 call site(s): engine engine: {why}")
    stable.uninstall()


def test_the_blocker_reads_what_upstream_says(trt):
    from lightning_trt_rtx import _backend

    class Engine_:
        requires_output_allocator = False

        def __init__(self, capturable: bool) -> None:
            self.capturable = capturable

        def _is_monolithic_capturable(self, stream) -> bool:
            return self.capturable

    assert _backend.graph_capture_blocker(Engine_(True), None) == ""
    assert "lazy kernel specialization" in _backend.graph_capture_blocker(Engine_(False), None)
    dynamic = Engine_(True)
    dynamic.requires_output_allocator = True
    assert "output allocator" in _backend.graph_capture_blocker(dynamic, None)
    module = trt.dynamo.runtime.TorchTensorRTModule()  # no engine set up yet
    assert _backend.graph_capture_blocker(module, None) == "the engine is not set up yet"
    # torch-tensorrt's C++ runtime: the compiled module holds the flags, its torchbind engine does not
    module.engine = Engine_(True)
    module.requires_output_allocator = True
    assert "output allocator" in _backend.graph_capture_blocker(module, None)
    module.requires_output_allocator, module.requires_native_multidevice = False, True
    assert _backend.graph_capture_blocker(module, None) == "it runs collectives (NCCL)"


def test_a_number_input_or_autograd_runs_the_call_as_it_is(settings, captured):
    class Scaled(RuntimeLikeEngine):
        def forward(self, x, scale=None):  # a number a graph would fix at its capture
            return super().forward(x) * (1 if scale is None else scale)

    engine = Scaled(settings["disabled"])
    stable = graphed(engine)
    x = batches(8)[0]
    assert all(torch.equal(engine(x, 3), (2 * x + 1) * 3) for _ in range(5))
    assert not captured and stable.sites[0].eager == 5
    w = x.clone().requires_grad_()
    for _ in range(GRAPH_AFTER + 2):
        engine(w)
    assert not captured  # a replay records no autograd history
    stable.uninstall()


def test_a_pause_between_loops_frees_the_graphs_and_the_next_loop_captures_again(settings, captured):
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    xs = batches(*[8] * 4)
    [engine(x) for x in xs]
    stable.pause()  # the engines' settings (so their execution contexts) may change before the next loop
    assert stable.sites[0].graph is None
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)  # between loops: as they are
    stable.resume()
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)
    assert len(captured) == 2
    stable.uninstall()


def test_a_program_whose_inputs_cannot_be_copied_is_left_alone(settings, captured, monkeypatch):
    monkeypatch.setattr(addresses, "_inputs_written", lambda module: None)  # a graph whose effects cannot be read
    module, engines = program(settings["disabled"], BareEngine(settings["disabled"]))
    stable = StableAddresses(engines, graphs=True)
    assert stable.holdable and stable.why_not_graphed() == (
        "no call site's inputs can be copied (its program may write into them)"
    )
    stable.install()
    assert not stable.sites
    assert "their program may write into its inputs" in stable.describe()


def test_a_program_is_captured_whole_with_every_engine_in_it(settings, captured, monkeypatch):
    monkeypatch.setattr(addresses, "_inputs_written", lambda module: [])  # provably writes into no input
    module, engines = program(settings["disabled"], BareEngine(settings["disabled"]), BareEngine(settings["disabled"]))
    stable = StableAddresses(engines, graphs=True)
    stable.install()
    xs = batches(*[8] * 5)
    for x in xs:
        a, b = module(x, torch.tensor(True))  # every input a tensor (a bool would be fixed at the capture)
        assert torch.equal(a, 2 * x + 1) and torch.equal(b, 2 * x + 1)
    assert len(captured) == 1 and stable.sites[0].replays == 5 - GRAPH_AFTER
    stable.uninstall()


def test_the_mode_is_named_among_the_choices(monkeypatch):
    monkeypatch.setenv(addresses.ENABLED_ENV, "graph")
    with pytest.raises(ValueError, match="or graphs \\(a CUDA graph of each call site"):
        addresses.mode()
    monkeypatch.setenv(addresses.ENABLED_ENV, "Graphs")
    assert addresses.mode() == "graphs"


def test_a_session_under_graphs_runs_the_engines_without_their_own_capture(trt, fake_gpu, monkeypatch):
    monkeypatch.setenv(addresses.ENABLED_ENV, "graphs")
    model, engines = engine_tree(trt.dynamo.runtime.TorchTensorRTModule)
    with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)) as session:
        assert {e.runtime_settings.cuda_graph_strategy for e in engines} == {"disabled"}
        assert session.stable is not None and session.stable.graphs
        assert all("forward" in vars(e) for e in engines)
    assert not any("forward" in vars(e) for e in engines)
    # engine-less modules on a CPU host: nothing to capture, and the figures say why
    assert session.figures.capture.startswith(
        "call-site graphs: 4 call site(s), 0 capture(s), 0 of 0 call(s) replayed; NOT captured at 4 call site(s): "
    ), session.figures.capture


paced = paced_engines  # the fixture, by its name


def _auto_loop(model: nn.Module, batches: int, known: bool) -> tuple[list, list, ServingSession]:
    """``batches`` batches through ``model`` in a session under ``"auto"`` (``known``: the loop says how many):
    the inputs, the outputs and the session, open."""
    from tests.test_auto import _serve, _session

    session = _session()
    session.serve(model)
    xs = [torch.full((4, 2), float(i)) for i in range(batches)]
    return xs, _serve(session, model, xs, known=known), session


def test_auto_keeps_call_site_graphs_without_a_switch_of_strategy(fake_gpu, monkeypatch, captured, paced):
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "")
    # a switch of strategy re-creates the execution context (60 ms): graphs leave it too little to win back
    engine = paced({"disabled": 3.0, "whole_graph_capture": 2.0}, setup_ms=60.0)
    steady, replay = engine.pace, FakeGraph.replay

    def graphed_pace(graph: FakeGraph) -> None:  # a replay runs at the graph's pace
        engine.pace = {"disabled": 0.5, "whole_graph_capture": 0.5}
        try:
            replay(graph)
        finally:
            engine.pace = steady

    monkeypatch.setattr(FakeGraph, "replay", graphed_pace)
    xs, outputs, session = _auto_loop(nn.Sequential(engine), 60, known=True)
    figures = session.close()
    assert all(torch.equal(y, x + 1) for x, y in zip(xs, outputs))
    assert figures.auto.startswith(f"kept {auto.SITE_GRAPHS} (median ms per batch: disabled 3.0"), figures.auto
    assert "whole_graph_capture" not in engine.strategies, figures.auto
    assert figures.capture.startswith("call-site graphs: 1 call site(s), 1 capture(s)"), figures.capture
    assert figures.auto_ms[auto.SITE_GRAPHS] == pytest.approx(0.5, abs=0.2)


def test_auto_never_tries_the_engines_own_capture_where_call_site_graphs_cover_every_engine(
    fake_gpu, monkeypatch, captured, paced
):
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "")
    # an endless loop and a cheap switch, where the engines' own capture would be tried
    engine = paced({"disabled": 3.0, "whole_graph_capture": 2.0}, setup_ms=1.0)
    xs, outputs, session = _auto_loop(nn.Sequential(engine), 60, known=False)
    figures = session.close()
    assert all(torch.equal(y, x + 1) for x, y in zip(xs, outputs))
    assert set(engine.strategies) == {"disabled"}, figures.auto
    assert set(figures.auto_ms) == {auto.DISABLED, auto.SITE_GRAPHS}, figures.auto
    assert figures.auto.endswith(
        f"; {auto.UPSTREAM} and {auto.HELD} not tried: {auto.SITE_GRAPHS_COVER_ALL}"
    ), figures.auto


def test_auto_tries_every_candidate_where_one_engine_would_run_outside_a_graph(fake_gpu, monkeypatch, captured, paced):
    # two engines, the second's site cannot be captured: call-site graphs would leave it without any graph
    blocked = "it runs collectives (NCCL)"
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: blocked if obj is b else "")
    a = paced({"disabled": 3.0, "whole_graph_capture": 1.0}, setup_ms=1.0)
    b = paced({"disabled": 3.0, "whole_graph_capture": 1.0}, setup_ms=1.0)
    xs, outputs, session = _auto_loop(nn.Sequential(a, b), 120, known=False)
    assert session.stable is not None
    assert session.stable.why_not_every_engine_graphed() == "engine 1: it runs collectives (NCCL)"
    figures = session.close()
    assert all(torch.equal(y, x + 2) for x, y in zip(xs, outputs))
    assert set(figures.auto_ms) == set(auto.CANDIDATES), figures.auto
    assert "whole_graph_capture" in a.strategies and "not tried" not in figures.auto, figures.auto


class _Scaled(nn.Module):
    """Calls its engine with a number besides the batch: no call can be replayed from a graph of ours."""

    def __init__(self, engine: nn.Module) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.engine(x, 2)


def _scaled(paced, pace: dict[str, float]) -> tuple[nn.Module, _Scaled]:
    """A paced engine that takes a number (a scale) too, and a model that always passes one."""

    class WithScale(paced):
        def forward(self, x: torch.Tensor, scale: int = 1) -> torch.Tensor:
            return super().forward(x) * scale

    engine = WithScale(pace, setup_ms=1.0)
    return engine, _Scaled(engine)


def test_auto_tries_the_engines_own_capture_where_call_site_graphs_ran_calls_outside_a_graph(
    fake_gpu, monkeypatch, captured, paced
):
    """Every site can be captured on paper, but each call passes a number: no call replays, so call-site graphs
    are "disabled" in disguise; their window says so and the engines' own capture joins the trial. A later
    session of the same engines offers it from the start, and checks the decision in one window."""
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "")
    engine, model = _scaled(paced, {"disabled": 3.0, "whole_graph_capture": 1.0})
    xs, outputs, session = _auto_loop(model, 120, known=False)
    figures = session.close()
    assert all(torch.equal(y, 2 * (x + 1)) for x, y in zip(xs, outputs))
    assert not captured and set(figures.auto_ms) == set(auto.CANDIDATES), figures.auto
    assert figures.auto.startswith(("kept whole_graph_capture", f"kept {auto.HELD}")), figures.auto
    assert "not tried" not in figures.auto, figures.auto
    kept = figures.auto.removeprefix("kept ").split(" (")[0]
    switches = len([1 for a, b in zip(engine.strategies, engine.strategies[1:]) if a != b])
    xs, outputs, session = _auto_loop(model, 60, known=False)
    again = session.close().auto
    assert again.startswith(f"kept {kept}, decided earlier in this process"), again
    assert len([1 for a, b in zip(engine.strategies, engine.strategies[1:]) if a != b]) <= switches + 2, again


def test_a_new_shapes_trial_keeps_a_widened_decision_running_and_its_figures_true(
    fake_gpu, monkeypatch, captured, paced
):
    """After a widened trial kept the engines' own capture, a burst of another shape starts a trial that
    offers it too: the main shape's batches keep running under the kept strategy, and the figures never say
    the engines' own capture was left out."""
    from tests.test_auto import _session

    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "")
    engine, model = _scaled(paced, {"disabled": 3.0, "whole_graph_capture": 1.0})
    session = _session()
    session.serve(model)
    session.loop_started(batches=None)

    def step(shape: tuple[int, int]) -> None:
        x = torch.ones(shape)
        session.batch_started(x)
        assert torch.equal(model(x), 2 * (x + 1))
        session.batch_ended()

    for _ in range(120):
        step((4, 2))
    assert session.auto is not None
    kept = session.auto.candidate
    assert kept in (auto.UPSTREAM, auto.HELD), session.auto.describe()
    step((8, 2))
    ran = len(engine.strategies)
    for _ in range(auto.ABANDON_AFTER + 2):
        step((4, 2))
    session.loop_ended()
    figures = session.close()
    assert set(engine.strategies[ran:]) == {"whole_graph_capture"}, figures.auto
    assert auto.SITE_GRAPHS_COVER_ALL not in figures.auto, figures.auto


def test_after_call_site_graphs_auto_leaves_the_strategy_only_where_a_switch_pays(
    fake_gpu, monkeypatch, captured, paced
):
    """Four candidates (engine b's site cannot be captured): after "disabled" and call-site graphs, a 60 ms
    switch of strategy cannot be won back over the 60-batch loop's last batches, so it is not made."""
    monkeypatch.setattr(
        addresses._backend, "graph_capture_blocker", lambda obj, stream: "it runs collectives" if obj is b else ""
    )
    a = paced({"disabled": 3.0, "whole_graph_capture": 2.0}, setup_ms=60.0)
    b = paced({"disabled": 0.1, "whole_graph_capture": 0.1}, setup_ms=60.0)
    xs, outputs, session = _auto_loop(nn.Sequential(a, b), 60, known=True)
    figures = session.close()
    assert all(torch.equal(y, x + 2) for x, y in zip(xs, outputs))
    assert set(figures.auto_ms) == {auto.DISABLED, auto.SITE_GRAPHS}, figures.auto
    assert set(a.strategies) == {"disabled"}, figures.auto
    assert (
        f"{auto.UPSTREAM}, {auto.HELD} not tried: the 30 batches left could not win back re-creating the execution"
        " contexts" in figures.auto
    ), figures.auto


def test_a_decision_among_two_candidates_is_not_reused_where_four_are_offered(fake_gpu, monkeypatch, captured, paced):
    """Engine b's site becomes uncapturable between two sessions: the second offers the engines' own capture,
    which the first never timed, so it runs a whole trial instead of checking the first one's decision."""
    from tests.test_auto import _serve, _session

    blocked = {"b": ""}
    monkeypatch.setattr(
        addresses._backend, "graph_capture_blocker", lambda obj, stream: blocked["b"] if obj is b else ""
    )
    a = paced({"disabled": 3.0, "whole_graph_capture": 0.5}, setup_ms=1.0)
    b = paced({"disabled": 0.1, "whole_graph_capture": 0.1}, setup_ms=1.0)
    model = nn.Sequential(a, b)
    xs = [torch.full((4, 2), float(i)) for i in range(120)]
    first = _session()
    first.serve(model)
    _serve(first, model, xs)
    assert set(first.close().auto_ms) == {auto.DISABLED, auto.SITE_GRAPHS}
    blocked["b"] = "it runs collectives (NCCL)"
    second = _session()
    second.serve(model)
    outputs = _serve(second, model, xs)
    figures = second.close()
    assert all(torch.equal(y, x + 2) for x, y in zip(xs, outputs))
    assert "decided earlier in this process" not in figures.auto, figures.auto
    assert set(figures.auto_ms) == set(auto.CANDIDATES), figures.auto
    assert figures.auto.startswith(("kept whole_graph_capture", f"kept {auto.HELD}")), figures.auto


def test_every_engine_graphed_names_a_site_left_alone_or_a_program_that_writes(settings, captured, monkeypatch):
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "")
    compiled = StableAddresses([Engine("engine", "module", RuntimeLikeEngine(settings["disabled"]))], graphs=True)
    assert compiled.why_not_every_engine_graphed() == ""
    monkeypatch.setattr(addresses, "_inputs_written", lambda module: None)  # its effects cannot be read
    _, engines = program(settings["disabled"], BareEngine(settings["disabled"]))
    assert StableAddresses(engines, graphs=True).why_not_every_engine_graphed() == (
        "its program may write into its inputs"
    )
    monkeypatch.setattr(addresses, "_aliases_io", lambda engine: True)
    assert StableAddresses(engines, graphs=True).why_not_every_engine_graphed() == (
        "1 engine(s) left as they are: they write an output through an input (aliased I/O, e.g. a KV cache)"
    )


def with_a_graph(settings) -> tuple[RuntimeLikeEngine, StableAddresses, torch.Tensor]:
    """An engine whose site has captured its graph at one batch ``x``."""
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    x = batches(8)[0]
    for _ in range(GRAPH_AFTER + 1):
        engine(x)
    assert stable.sites[0].graph is not None
    return engine, stable, x


def test_a_call_that_needs_autograd_is_never_answered_from_a_graph(settings, captured):
    engine, stable, x = with_a_graph(settings)
    w = x.clone().requires_grad_()
    y = engine(w)
    assert y.grad_fn is not None and captured[0].replays == 1  # run as it is: its autograd history kept
    stable.uninstall()


def test_an_engine_that_keeps_its_outputs_hands_out_copies_before_its_graph_too(settings, captured):
    """An engine told by its user to keep its outputs writes every call into the same tensors; the graph
    captured later writes into them at each replay: the calls before it hand out copies as well."""
    engine = RuntimeLikeEngine(settings["disabled"])
    engine.use_pre_allocated_outputs = True
    engine.set_output_tensors_as_unowned(False)
    stable = graphed(engine)
    xs = batches(*[8] * 6)
    kept = [engine(x) for x in xs]
    assert all(torch.equal(y, 2 * x + 1) for x, y in zip(xs, kept))
    assert stable.sites[0].keeps_outputs
    stable.uninstall()


def test_a_prewarm_or_new_settings_free_the_graphs(settings, captured):
    """Both re-create the engines' execution contexts: a graph would replay launches into freed memory."""
    engine, stable, x = with_a_graph(settings)
    stable.forget()  # what a session does after a prewarm
    assert stable.sites[0].graph is None
    for _ in range(GRAPH_AFTER + 1):
        engine(x)
    stable.drop_graphs()  # what a session does where applying its settings changed an engine
    assert stable.sites[0].graph is None and len(captured) == 2
    stable.uninstall()


def test_a_failed_capture_gives_the_stream_back_and_raises_the_calls_own_error(monkeypatch):
    """``_capture_call``'s sequence against torch's CUDA-graph API, recorded (no CUDA here)."""
    said: list[str] = []

    class Graph:
        def capture_begin(self, capture_error_mode):
            said.append(f"begin {capture_error_mode}")

        def capture_end(self):
            said.append("end")
            raise RuntimeError("operation failed due to a previous error during capture")

    class Stream:
        def __init__(self, stream):
            said.append("on the capture stream")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            said.append("stream given back")

    monkeypatch.setattr(addresses.torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(addresses.torch.cuda, "stream", Stream)
    monkeypatch.setattr(addresses.torch.cuda, "synchronize", lambda: said.append("synchronize"))

    def call():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing"):
        addresses._capture_call(call, object())
    assert said == ["synchronize", "on the capture stream", "begin thread_local", "end", "stream given back"]


def test_auto_does_not_try_call_site_graphs_where_no_engine_can_be_captured(fake_gpu, monkeypatch, paced):
    from tests.test_auto import _serve, _session

    monkeypatch.setattr(addresses, "why_no_site_graphs", lambda: "")
    monkeypatch.setattr(addresses, "_side_stream", lambda device: object())
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "it runs collectives (NCCL)")
    engine = paced({"disabled": 3.0, "whole_graph_capture": 2.0}, setup_ms=60.0)
    session = _session()
    session.serve(nn.Sequential(engine))
    _serve(session, engine, [torch.zeros(4, 2)] * 40, known=True)
    figures = session.close()
    assert auto.SITE_GRAPHS not in figures.auto_ms, figures.auto
    assert figures.auto.endswith("call-site graphs not tried: engine 0: it runs collectives (NCCL)"), figures.auto


def test_a_prewarm_never_replays_a_graph_of_the_contexts_it_replaced(fake_gpu, monkeypatch, captured, paced, tmp_path):
    """A prewarm applies eager kernel settings (new execution contexts) and runs its examples: a graph captured
    before it is freed by that change, so the example at the graph's shapes runs as it is."""
    monkeypatch.setenv(addresses.ENABLED_ENV, "graphs")
    monkeypatch.setattr(addresses._backend, "graph_capture_blocker", lambda obj, stream: "")
    engine = paced({"disabled": 1.0, "whole_graph_capture": 1.0})
    model = nn.Sequential(engine)
    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "k.bin"))
    with ServingSession(model, settings) as session:
        x = torch.zeros(4, 2)
        with torch.inference_mode():  # as a prewarm runs its examples
            for _ in range(GRAPH_AFTER + 1):
                model(x)
        assert len(captured) == 1 and captured[0].replays == 1
        session.prewarm([x])
        assert captured[0].replays == 1  # the examples ran as they are, not from the replaced contexts' graph
        assert torch.equal(model(x), x + 1)


def test_apply_settings_refuses_what_it_cannot_apply(trt, fake_gpu):
    with pytest.raises(RuntimeError, match=r"apply_settings needs the session's engines: call serve\(module\) first"):
        ServingSession(settings=TRTSettings(runtime_cache=None)).apply_settings()
    model, _ = engine_tree(trt.dynamo.runtime.TorchTensorRTModule)
    with ServingSession(model, TRTSettings(runtime_cache=None)) as session:
        with pytest.raises(TypeError, match=r"takes cuda_graph_strategy and .* got \['runtime_cache'\]"):
            session.apply_settings(runtime_cache=None)
        with pytest.raises(ValueError, match="Valid choices"):
            session.apply_settings(dynamic_shapes_kernel_specialization_strategy="eagerly")
        assert session.apply_settings(dynamic_shapes_kernel_specialization_strategy="eager") == 4
        assert session.apply_settings(dynamic_shapes_kernel_specialization_strategy="eager") == 0
