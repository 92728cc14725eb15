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
from lightning_trt_rtx.addresses import GRAPH_AFTER, MAX_SHAPES, StableAddresses
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
    assert "forward" not in vars(engine) and not site.graphs


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


def test_graphs_are_bounded_least_recently_used_first(settings, captured):
    engine = RuntimeLikeEngine(settings["disabled"])
    stable = graphed(engine)
    for size in range(1, MAX_SHAPES + 3):
        for x in batches(*[size] * (GRAPH_AFTER + 1)):
            assert torch.equal(engine(x), 2 * x + 1)
    site = stable.sites[0]
    assert len(site.graphs) == MAX_SHAPES and site.captures == MAX_SHAPES + 2
    assert [key[3][0][0] for key in site.graphs] == list(range(3, MAX_SHAPES + 3))  # the two oldest dropped
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
    assert not stable.sites[0].graphs
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)  # between loops: as they are
    stable.resume()
    assert all(torch.equal(engine(x), 2 * x + 1) for x in xs)
    assert len(captured) == 2
    stable.uninstall()


def test_a_program_whose_inputs_cannot_be_copied_is_left_alone(settings, captured, monkeypatch):
    monkeypatch.setattr(addresses, "_inputs_written", lambda module: None)  # a graph whose effects cannot be read
    module, engines = program(settings["disabled"], BareEngine(settings["disabled"]))
    stable = StableAddresses(engines, graphs=True)
    assert stable.holdable and not stable.graphable
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
    assert session.figures.capture == "call-site graphs: 4 call site(s), 0 capture(s), 0 of 0 call(s) replayed"


paced = paced_engines  # the fixture, by its name


def test_auto_keeps_call_site_graphs_without_a_switch_of_strategy(fake_gpu, monkeypatch, captured, paced):
    from tests.test_auto import _serve, _session

    monkeypatch.setattr(addresses, "why_no_site_graphs", lambda: "")
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
    session = _session()
    session.serve(nn.Sequential(engine))
    xs = [torch.full((4, 2), float(i)) for i in range(60)]
    outputs = _serve(session, engine, xs, known=True)
    figures = session.close()
    assert all(torch.equal(y, x + 1) for x, y in zip(xs, outputs))
    assert figures.auto.startswith(f"kept {auto.SITE_GRAPHS} (median ms per batch: disabled 3.0"), figures.auto
    assert "whole_graph_capture" not in engine.strategies, figures.auto
    assert "not tried" in figures.auto and figures.capture.startswith("call-site graphs: 1 call site(s), 1 capture(s)")
    assert figures.auto_ms[auto.SITE_GRAPHS] == pytest.approx(0.5, abs=0.2)
