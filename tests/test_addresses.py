"""Stable addresses under whole-graph capture, on CPU.

A TensorRT engine cannot run here, so the engine is faked at our own boundary: a module that runs
like torch-tensorrt's runtime does (binds whatever input it is given; with ``use_pre_allocated_outputs``
it returns the same output tensors while the shapes stay the same, else fresh ones) and records the
addresses it was bound to. Its settings are real ``torch_tensorrt.runtime.RuntimeSettings``. The
session tests use real engine-less ``TorchTensorRTModule`` objects. ``tests/gpu`` runs real engines.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_trt_rtx import ServingSession, TRTSettings, addresses
from lightning_trt_rtx.addresses import MAX_SHAPES, StableAddresses
from lightning_trt_rtx.engines import Engine, find_engines
from tests.test_session import engine_tree


class RuntimeLikeEngine(nn.Module):
    """Computes ``2 * x + 1`` the way torch-tensorrt's runtime hands out outputs (``_TRTEngine``).

    It binds whatever input it is given. With ``use_pre_allocated_outputs`` it writes into
    ``pre_allocated_outputs`` when the previous call also pre-allocated and the input shape did not
    change since that call (without checking the outputs' own shape, as upstream does not: stale
    outputs fail the write), and after the call allocates new ones while its outputs are "unowned"
    (as ``torch_tensorrt.compile`` marks the engines producing a model's outputs), there are none, or
    the shape changed. ``obeys_ownership=False``: an engine that stays unowned whatever it is told.
    """

    def __init__(self, settings, obeys_ownership: bool = True) -> None:
        super().__init__()
        self.runtime_settings = settings
        self.use_pre_allocated_outputs = False
        self.unowned = True
        self.obeys_ownership = obeys_ownership
        self.bound_inputs: list[int] = []
        self.bound_outputs: list[int] = []
        self.pre_allocated_outputs: list[torch.Tensor] = []
        self._last: tuple[torch.Size | None, bool] = (None, False)  # (input shape, pre-allocated) of the last call

    def set_output_tensors_as_unowned(self, enabled: bool) -> None:
        self.unowned = enabled or not self.obeys_ownership

    def are_output_tensors_unowned(self) -> bool:
        return self.unowned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bound_inputs.append(x.data_ptr())
        shape_changed = self._last[0] != x.shape
        reuse = self._last[1] and self.use_pre_allocated_outputs and not shape_changed
        out = self.pre_allocated_outputs[0] if reuse else torch.empty_like(x)  # none kept: upstream breaks too
        with torch.inference_mode(out.is_inference()):  # TensorRT writes through a raw address
            out.copy_(2 * x + 1)  # a stale output of another shape fails here
        self.bound_outputs.append(out.data_ptr())
        self._last = (x.shape, self.use_pre_allocated_outputs)
        if self.use_pre_allocated_outputs and (self.unowned or not self.pre_allocated_outputs or shape_changed):
            self.pre_allocated_outputs = [torch.empty_like(x)]  # while ``out`` is alive: at another address
        return out


@pytest.fixture
def refused_holding(monkeypatch):
    """Engines that cannot be told to keep their outputs (``_backend.set_output_holding`` raises)."""

    def refuse(obj, state):
        if state[0]:
            raise AttributeError("no use_pre_allocated_outputs")

    monkeypatch.setattr(addresses._backend, "set_output_holding", refuse)


def held(engine: nn.Module, from_first_call: bool = False) -> StableAddresses:
    stable = StableAddresses([Engine("engine", "module", engine)], from_first_call=from_first_call)
    stable.install()
    return stable


def batches(*sizes: int, width: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, width, generator=g) for n in sizes]


HELD_BOTH = "inputs copied in at 1 of 1 call site(s), outputs kept and copied out at 1 of 1 call site(s)"


def test_addresses_that_moved_are_held_from_the_next_call_and_predictions_are_kept(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    inputs = batches(8, 8, 8, 8, 8, 8)
    kept = [engine(x) for x in inputs]  # every prediction kept alive, as return_predictions=True does
    # each call got a different input tensor: the first two were bound as given (both addresses moved
    # between them), from the third call on the engine saw one buffer
    assert len({x.data_ptr() for x in inputs}) == 6
    assert engine.bound_inputs[:2] == [x.data_ptr() for x in inputs[:2]] and len(set(engine.bound_inputs[2:])) == 1
    # the first held call allocates the outputs the engine keeps (told to own them, though compile
    # marked them unowned); from the next call on it writes into them
    assert len(set(engine.bound_outputs[3:])) == 1
    for x, y in zip(inputs, kept):  # later batches overwrote nothing the caller holds
        torch.testing.assert_close(y, 2 * x + 1)
    assert all(y.data_ptr() not in engine.bound_outputs[3:] for y in kept)
    assert stable.sites[0].moves == 0
    assert stable.describe() == f"stable addresses: 1 call site(s), 1 shape(s), {HELD_BOTH} once they had moved"


class AllocatorLikeEngine(RuntimeLikeEngine):
    """Hands out the same fresh output while the caller drops the last one, as CUDA's caching allocator
    does inside ``Trainer.predict(return_predictions=False)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_pre_allocated_outputs:
            return super().forward(x)
        self.bound_inputs.append(x.data_ptr())
        if getattr(self, "_block", None) is None or self._block.shape != x.shape:
            self._block = torch.empty_like(x)
        self.bound_outputs.append(self._block.data_ptr())
        return torch.mul(x, 2, out=self._block).add_(1)


def test_addresses_that_stay_still_are_not_copied(settings):
    engine = AllocatorLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    x = batches(8)[0]  # the loader's batch lands where the last one was
    for _ in range(5):
        y = engine(x)
        torch.testing.assert_close(y, 2 * x + 1)
    assert set(engine.bound_inputs) == {x.data_ptr()} and y.data_ptr() == engine.bound_outputs[-1]  # no copy
    assert not engine.use_pre_allocated_outputs and not stable.sites[0].buffers
    assert stable.describe() == (
        "stable addresses: 1 call site(s), 1 shape(s), nothing to copy (the addresses did not move)"
    )


def test_from_the_first_call_everything_is_held_at_once(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    inputs = batches(8, 8, 8, 8)
    kept = [engine(x) for x in inputs]
    assert len(set(engine.bound_inputs)) == 1 and len(set(engine.bound_outputs[1:])) == 1
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert stable.describe() == f"stable addresses: 1 call site(s), 1 shape(s), {HELD_BOTH} from the first call"


def test_the_environment_variable_picks_the_mode_and_a_bad_value_names_the_choices(monkeypatch):
    for value, mode in (("0", "off"), ("1", "moved"), ("always", "always"), (" Always ", "always")):
        monkeypatch.setenv(addresses.ENABLED_ENV, value)
        assert addresses.mode() == mode
    monkeypatch.delenv(addresses.ENABLED_ENV)
    assert addresses.mode() == "moved"
    monkeypatch.setenv(addresses.ENABLED_ENV, "yes")
    with pytest.raises(ValueError, match=r"LIGHTNING_TRT_RTX_STABLE_ADDRESSES='yes'.*0 .*1 .*always"):
        addresses.mode()


def test_a_smaller_last_batch_gets_its_own_buffers_and_the_right_values(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    inputs = batches(8, 8, 8, 3)
    outputs = [engine(x) for x in inputs]
    for x, y in zip(inputs, outputs):
        assert y.shape == x.shape
        torch.testing.assert_close(y, 2 * x + 1)
    assert engine.bound_inputs[3] != engine.bound_inputs[2]
    assert len(stable.sites[0].buffers) == 2 and stable.sites[0].moves == 0
    # the engine allocates new outputs at new shapes: that switch is a new capture, and is said
    assert stable.describe() == (
        f"stable addresses: 1 call site(s), 2 shape(s), {HELD_BOTH} once they had moved;"
        " 1 shape switch(es), each a new capture"
    )


def test_input_buffers_are_bounded_least_recently_used_first(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    sizes = list(range(1, MAX_SHAPES + 3))
    for n in sizes:
        torch.testing.assert_close(engine(batches(n)[0]), 2 * batches(n)[0] + 1)
    site = stable.sites[0]
    assert len(site.buffers) == MAX_SHAPES
    kept_batch_sizes = sorted(key[1][1][0] for key in site.buffers)
    assert kept_batch_sizes == sizes[-MAX_SHAPES:]


def test_inputs_given_as_non_contiguous_views_are_copied_whole(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    held(engine, from_first_call=True)
    x = torch.randn(4, 8).t()  # 8 x 4, not contiguous
    torch.testing.assert_close(engine(x), 2 * x + 1)


def test_calls_pass_straight_through_while_the_engine_does_not_capture(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    x = batches(8)[0]
    engine(x)
    assert engine.use_pre_allocated_outputs
    engine.runtime_settings = settings["disabled"]  # as GraphScopes does inside a whole-module graph
    y = engine(x)
    assert engine.bound_inputs[-1] == x.data_ptr() and not engine.use_pre_allocated_outputs and engine.unowned
    assert y.data_ptr() == engine.bound_outputs[-1]  # no copy: nothing is kept
    assert stable.sites[0].calls == 1


def test_an_engine_whose_outputs_still_move_is_reported(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"], obeys_ownership=False)
    stable = held(engine, from_first_call=True)
    for x in batches(8, 8, 8, 8, 8):
        engine(x)
    assert stable.sites[0].moves == 3  # calls 3, 4 and 5 at the same shapes
    assert stable.describe().endswith("; outputs moved 3 time(s), each a new capture")


def test_an_engine_that_cannot_keep_its_outputs_passes_through_and_says_so(settings, refused_holding):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    x = batches(8)[0]
    torch.testing.assert_close(engine(x), 2 * x + 1)
    assert engine.bound_inputs == [x.data_ptr()]
    assert stable.describe() == (
        "addresses NOT held at 1 of 1 call sites: the engine cannot keep its outputs"
        " (AttributeError: no use_pre_allocated_outputs)"
    )


def test_uninstall_gives_back_the_forward_and_the_output_setting(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    engine(batches(8)[0])
    assert "forward" in vars(engine) and engine.use_pre_allocated_outputs and not engine.unowned
    stable.uninstall()
    assert "forward" not in vars(engine) and not engine.use_pre_allocated_outputs and engine.unowned
    x = batches(8)[0]
    engine(x)
    assert engine.bound_inputs[-1] == x.data_ptr()


def test_buffers_made_in_inference_mode_are_not_written_outside_it(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    x = batches(8)[0]
    with torch.inference_mode():
        engine(x)
    with torch.no_grad():  # Trainer(inference_mode=False)
        torch.testing.assert_close(engine(x), 2 * x + 1)
    assert len(stable.sites[0].buffers) == 2


def test_a_session_holds_addresses_only_under_whole_graph_capture(trt, fake_gpu):
    TTM = trt.dynamo.runtime.TorchTensorRTModule
    for strategy, expected in (("disabled", False), ("whole_graph_capture", True)):
        model, engines = engine_tree(TTM)
        with ServingSession(model, TRTSettings(cuda_graph_strategy=strategy, runtime_cache=None)) as session:
            assert all(("forward" in vars(e)) == expected for e in engines)
        assert not any("forward" in vars(e) for e in engines)  # given back on close
        assert session.figures.capture == (
            "addresses not held: no call ran under the engines' own capture (e.g. inside a whole-module graph)"
            if expected
            else ""
        )
        assert len(find_engines(model)) == 4


class DictEngine(RuntimeLikeEngine):
    """A program that rebuilds its outputs into a dict of a tensor and a tuple (as loaded programs may)."""

    def forward(self, x: torch.Tensor) -> dict:
        out = super().forward(x)
        return {"y": out, "more": (out, 7)}


def test_outputs_at_any_depth_are_the_callers_own(settings):
    engine = DictEngine(settings["whole_graph_capture"])
    stable = held(engine)
    inputs = batches(8, 8, 8, 8, 8)
    kept = [engine(x) for x in inputs]
    for x, out in zip(inputs, kept):
        torch.testing.assert_close(out["y"], 2 * x + 1)
        torch.testing.assert_close(out["more"][0], 2 * x + 1)
        assert out["more"][1] == 7
    assert stable.sites[0].keep_outputs and stable.sites[0].moves == 0


def test_an_input_viewing_its_buffer_differently_is_still_copied(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    x = torch.randn(4, 4)
    engine(x)
    buffer = next(iter(stable.sites[0].buffers.values()))[0]
    view = buffer.t()  # the same storage and shape, other strides: other values
    expected = 2 * view.clone() + 1
    torch.testing.assert_close(engine(view), expected)


def test_a_session_refuses_a_bad_mode_before_serving_and_gives_every_engine_back(trt, fake_gpu, monkeypatch):
    TTM = trt.dynamo.runtime.TorchTensorRTModule
    model, engines = engine_tree(TTM)
    monkeypatch.setenv(addresses.ENABLED_ENV, "yes")
    with pytest.raises(ValueError, match="not a valid choice: use 0"):
        with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)):
            pass
    assert not any("forward" in vars(e) for e in engines)
    for strategy in ("whole_graph_capture", "auto"):  # named where the session is made, before any engine
        with pytest.raises(ValueError, match=f"{addresses.ENABLED_ENV}='yes' is not a valid choice"):
            ServingSession(settings=TRTSettings(cuda_graph_strategy=strategy, runtime_cache=None))
    ServingSession(settings=TRTSettings(runtime_cache=None)).close()  # without graphs nothing reads it
    monkeypatch.setenv(addresses.ENABLED_ENV, "always")
    with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)) as session:
        assert session.stable is not None and session.stable.from_first_call


def test_holding_again_after_a_pause_at_other_shapes_never_reuses_stale_outputs(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    held(engine, from_first_call=True)
    for x in batches(8, 8, 8):  # held at 8 rows: the engine keeps 8-row outputs
        engine(x)
    engine.runtime_settings = settings["disabled"]  # a pause (e.g. a whole-module graph's loop): passed through
    engine(batches(3)[0])
    engine.runtime_settings = settings["whole_graph_capture"]
    for x in batches(3, 3, 3, 3):  # upstream would reuse the 8-row outputs here, had they been kept
        torch.testing.assert_close(engine(x), 2 * x + 1)


def test_an_engine_that_already_keeps_its_outputs_hands_the_caller_copies(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    engine.use_pre_allocated_outputs, engine.unowned = True, False  # as the user's enable_pre_allocated_outputs
    engine(batches(8)[0])  # called before: the engine reuses its kept outputs at the next call (none dropped)
    stable = held(engine)
    inputs = batches(8, 8, 8, 8)
    kept = [engine(x) for x in inputs]
    for x, y in zip(inputs, kept):  # the engine wrote every batch into the same tensors: the caller's are copies
        torch.testing.assert_close(y, 2 * x + 1)
    assert stable.sites[0].keep_outputs
    stable.uninstall()
    assert engine.use_pre_allocated_outputs and not engine.unowned  # its own setting back


def test_inputs_that_move_under_outputs_that_stay_are_the_only_copies(settings):
    engine = AllocatorLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    inputs = batches(8, 8, 8, 8, 8)  # all alive: each at its own address
    for x in inputs:
        y = engine(x)
        torch.testing.assert_close(y, 2 * x + 1)
    assert len(set(engine.bound_inputs[2:])) == 1 and y.data_ptr() == engine.bound_outputs[-1]  # no output copy
    assert stable.describe() == (
        "stable addresses: 1 call site(s), 1 shape(s), inputs copied in at 1 of 1 call site(s) once they had moved"
    )


def test_outputs_that_cannot_be_held_once_they_move_pass_through_and_say_so(settings, refused_holding):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    inputs = batches(8, 8, 8, 8)
    kept = [engine(x) for x in inputs]  # outputs kept: they move, holding them fails, calls pass through
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert engine.bound_inputs[2:] == [x.data_ptr() for x in inputs[2:]]
    assert stable.describe().startswith("addresses NOT held at 1 of 1 call sites: the engine cannot keep its outputs")


def test_holding_again_with_no_call_in_between_reuses_nothing_it_should_not(settings):
    """A second run (``always``) holds at its first call, at the shape the last run's held calls had:
    the engine reuses what it kept (its last call pre-allocated), which must still be there."""
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    first = held(engine, from_first_call=True)
    for x in batches(8, 8):
        engine(x)
    first.uninstall()
    second = held(engine, from_first_call=True)
    inputs = batches(8, 8, 8, 3, 3, 3)
    kept = [engine(x) for x in inputs]
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert len(set(engine.bound_outputs[-2:])) == 1  # held again at the new shape
    assert second.sites[0].moves == 0


def test_a_pause_between_loops_gives_the_output_setting_back_and_forgets_the_last_addresses(settings):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    for x in batches(8, 8, 8):  # kept alive: held from the third call
        engine(x)
    assert engine.use_pre_allocated_outputs and not engine.unowned
    stable.pause()  # e.g. training between two validation loops inside fit
    assert not engine.use_pre_allocated_outputs and engine.unowned  # what a checkpoint would save
    x = batches(8)[0]
    torch.testing.assert_close(engine(x), 2 * x + 1)
    assert engine.bound_inputs[-1] == x.data_ptr() and stable.sites[0].calls == 3  # passed through
    stable.resume()
    inputs = batches(8, 8, 8)
    kept = [engine(x) for x in inputs]
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert engine.use_pre_allocated_outputs and len(set(engine.bound_outputs[-2:])) == 1


@pytest.mark.parametrize("between", ["resume", "forget"])
def test_a_loop_or_a_prewarm_compares_nothing_with_calls_before_it(settings, between):
    engine = AllocatorLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    engine(batches(8)[0])  # e.g. a prewarm call, its input elsewhere than the loop's batches
    getattr(stable, between)()  # at a loop's start; after a prewarm
    x = batches(8)[0]
    for _ in range(4):
        engine(x)
    assert stable.describe() == (
        "stable addresses: 1 call site(s), 1 shape(s), nothing to copy (the addresses did not move)"
    )


def test_a_loop_driven_session_holds_addresses_only_inside_its_loops(trt, fake_gpu):
    """A callback's session: not in the sanity check or training (a checkpoint saved then records the
    engines' own output setting), only between loop_started and loop_ended."""
    model, engines = engine_tree(trt.dynamo.runtime.TorchTensorRTModule)
    trainer = SimpleNamespace(global_rank=0, local_rank=0, node_rank=0, world_size=1, strategy=SimpleNamespace())
    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    session = ServingSession.for_trainer(trainer, settings, loops_only=True)
    session.serve(model)
    assert session.stable is not None and len(session.stable.sites) == 4
    states = []
    for step in (lambda: None, session.loop_started, session.loop_ended, session.loop_started):
        step()
        states.append({site.paused for site in session.stable.sites})
    assert states == [{True}, {False}, {True}, {False}]
    session.close()
    with ServingSession(model, settings) as own:  # a session of its own serves every call
        assert own.stable is not None and not any(site.paused for site in own.stable.sites)


class ShapeInputEngine(RuntimeLikeEngine):
    """Takes a number that decides its output's rows: a shape input (``TorchTensorRTModule`` passes it
    as a 0-d tensor, whose shape never changes), so, as upstream, it reuses kept outputs while its
    tensor input's shape stays the same, whatever the number."""

    def forward(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        reuse = self._last[1] and self.use_pre_allocated_outputs and self._last[0] == x.shape
        out = self.pre_allocated_outputs[0] if reuse else torch.empty(rows, x.shape[1])
        out.copy_(2 * x[:rows] + 1)  # kept outputs of other rows fail here
        self._last = (x.shape, self.use_pre_allocated_outputs)
        if self.use_pre_allocated_outputs and (self.unowned or not self.pre_allocated_outputs):
            self.pre_allocated_outputs = [torch.empty(rows, x.shape[1])]
        return out


def test_a_compiled_module_called_with_a_number_passes_through_and_says_why(settings):
    engine = ShapeInputEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    x = batches(8)[0]
    for rows in (8, 8, 3, 5):
        torch.testing.assert_close(engine(x, rows), 2 * x[:rows] + 1)
    assert not engine.use_pre_allocated_outputs and not stable.sites[0].buffers
    assert stable.describe() == (
        "addresses NOT held at 1 of 1 call sites: a number input (a shape input: the engine reuses kept outputs"
        " by input shapes only)"
    )


class BareEngine(RuntimeLikeEngine):
    """A loaded program's bare engine: settings through ``update_runtime_settings``, and serialized info
    (``__getstate__``, as a torchbind Engine answers it) that says whether it aliases its I/O."""

    def __init__(self, settings, aliased_io: str = "") -> None:
        super().__init__(settings)
        self.aliased_io = aliased_io

    def update_runtime_settings(self, *codes) -> None:
        self.codes = codes

    def __getstate__(self):
        return ["10", "e", "0%9%0%1%NVIDIA H100", b"", "", "", "0", "", "", "0", "0", "0", self.aliased_io], "Engine"


def _run(x: torch.Tensor, engine: nn.Module) -> torch.Tensor:
    return engine(x)  # stands for torch.ops.tensorrt.execute_engine


def _run_if(x: torch.Tensor, engine: nn.Module, use: bool) -> torch.Tensor | None:
    return engine(x) if use else None


def program(settings, *engines: BareEngine, runs: int = 1, optional_last: bool = False):
    """A loaded program's graph (as ``torch_tensorrt.load(...).module()`` has it): each engine read with
    ``get_attr`` and run by a call node (``runs`` times over; the last engine only when ``use`` is True),
    and the ``Engine`` records ``find_engines`` would make of it, with the settings applied."""
    root, graph = nn.Module(), torch.fx.Graph()
    x, use = graph.placeholder("x"), graph.placeholder("use")
    outputs = []
    for i, engine in enumerate(engines):
        setattr(root, f"_run_on_acc_{i}_engine", engine)
        node = graph.get_attr(f"_run_on_acc_{i}_engine")
        out = x
        for _ in range(runs):
            last = optional_last and i == len(engines) - 1
            out = graph.call_function(_run_if, (out, node, use)) if last else graph.call_function(_run, (out, node))
        outputs.append(out)
    graph.output(tuple(outputs))
    module = torch.fx.GraphModule(root, graph)
    found = [Engine(f"_run_on_acc_{i}_engine", "bare", e, owner=module) for i, e in enumerate(engines)]
    for record in found:
        record.set(settings)
    return module, found


def test_a_program_holds_its_outputs_and_reports_moved_inputs_without_copying_them(settings):
    engine = BareEngine(settings["whole_graph_capture"])
    module, found = program(settings["whole_graph_capture"], engine)
    stable = StableAddresses(found)
    stable.install()
    inputs = batches(8, 8, 8, 8)
    kept = [module(x, True)[0] for x in inputs]  # inputs and outputs kept alive: both move
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    # its graph's own ops might write into its inputs (a staged copy would hide the write): never copied
    assert engine.bound_inputs == [x.data_ptr() for x in inputs]
    assert len(set(engine.bound_outputs[3:])) == 1  # outputs held from the third call
    assert stable.describe() == (
        "stable addresses: 1 call site(s), 1 shape(s), outputs kept and copied out at 1 of 1 call site(s) once they"
        " had moved; a loaded program's inputs moved at 1 call site(s): not copied, each a new capture"
    )


def test_a_program_that_runs_an_engine_twice_or_a_module_of_your_own_is_left_alone(settings):
    twice, found = program(settings["whole_graph_capture"], BareEngine(settings["whole_graph_capture"]), runs=2)
    own = Engine("engine", "bare", found[0].obj, owner=nn.Sequential())  # plain Python: runs it any number of times
    why = {
        "twice": "their program runs one more than once per call (an engine keeps one set of outputs)",
        "own": "a module of your own runs them (it may run one more than once per call)",
    }
    for engines, case in ((found, "twice"), ([own], "own")):
        stable = StableAddresses(engines)
        stable.install()
        assert not stable.sites and stable.skipped == 1
        assert stable.describe() == f"addresses NOT held: 1 engine(s) left as they are: {why[case]}"
    x = batches(8)[0]
    torch.testing.assert_close(twice(x, True)[0], 2 * (2 * x + 1) + 1)


def test_every_engine_of_a_program_is_left_alone_when_one_aliases_its_io(settings):
    plain, aliased = BareEngine(settings["whole_graph_capture"]), BareEngine(settings["whole_graph_capture"], "o@c@kv")
    for engines, sites in (((plain,), 1), ((plain, aliased), 0)):
        module, found = program(settings["whole_graph_capture"], *engines)
        stable = StableAddresses(found)
        stable.install()
        assert len(stable.sites) == sites and stable.skipped == len(engines) - sites
        assert ("forward" in vars(module)) == bool(sites)
        stable.uninstall()


def test_an_engine_that_did_not_run_in_the_first_held_call_makes_its_own_outputs_when_it_runs(settings):
    a, b = BareEngine(settings["whole_graph_capture"]), BareEngine(settings["whole_graph_capture"])
    module, found = program(settings["whole_graph_capture"], a, b, optional_last=True)
    stable = StableAddresses(found, from_first_call=True)
    stable.install()
    for x in batches(8, 8):
        module(x, True)  # both held at 8 rows
    stable.pause()
    module(batches(3)[0], True)  # passed through: b's last call did not keep its outputs, its list is 8-row
    stable.resume()
    module(batches(3)[0], False)  # held again; only a runs
    for x in batches(3, 3, 3):  # b: upstream would reuse its 8-row list here, had it been told to own it unmade
        out_a, out_b = module(x, True)
        torch.testing.assert_close(out_b, 2 * x + 1)
    assert len(set(b.bound_outputs[-2:])) == 1  # held again at 3 rows


def _full_path_forbidden(monkeypatch, site) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the full path ran on a steady call")

    monkeypatch.setattr(addresses, "_signature", boom)
    monkeypatch.setattr(addresses.pytree, "tree_leaves", boom)
    monkeypatch.setattr(site, "_watch", boom)


def test_a_steady_call_checks_addresses_and_shapes_only(settings, monkeypatch):
    """Item 4 of issue 20: nothing moves, nothing is built per call (no signature, no pytree, no watch)."""
    engine = AllocatorLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    x = batches(8)[0]
    for _ in range(4):
        engine(x)
    site = stable.sites[0]
    with monkeypatch.context() as m:
        _full_path_forbidden(m, site)
        for _ in range(5):
            torch.testing.assert_close(engine(x), 2 * x + 1)
    assert site.calls == 9 and site.switches == 0
    # another shape leaves the steady path: counted as a switch, as before
    torch.testing.assert_close(engine(batches(3)[0]), 2 * batches(3)[0] + 1)
    assert site.switches == 1 and len(site.shapes_seen) == 2
    # the engine's capture switched off (e.g. a whole-module graph's scope): passed through at once
    engine.runtime_settings = settings["disabled"]
    calls = site.calls
    engine(x)
    assert site.calls == calls


def test_a_steady_call_with_moving_inputs_copies_them_without_the_full_path(settings, monkeypatch):
    engine = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    inputs = batches(*[8] * 12)
    kept = [engine(x) for x in inputs[:6]]  # predictions and batches kept alive: both addresses move
    site = stable.sites[0]
    assert site.copy_inputs and site.keep_outputs
    with monkeypatch.context() as m:
        _full_path_forbidden(m, site)
        kept += [engine(x) for x in inputs[6:]]
    for x, y in zip(inputs, kept):  # every prediction the caller's own, none overwritten
        torch.testing.assert_close(y, 2 * x + 1)
    assert len(set(engine.bound_inputs[2:])) == 1 and site.moves == 0
    # an output that moves on the steady path is a new capture, counted as the full path counts it
    engine.pre_allocated_outputs = [torch.empty(8, 4)]
    engine(inputs[0])
    assert site.moves == 1


def test_a_steady_held_call_costs_within_5_us_of_the_engines_own():
    """The wrapper's Python cost per steady call (the benchmark's own measurement, fewer calls): the
    fastest of interleaved rounds, so a busy host rarely decides it. Before issue 20 it was 13-14 us here."""
    from benchmarks.graphs import wrapper_overhead_us

    cost = wrapper_overhead_us(calls=2000, rounds=30)
    assert cost["overhead_us"] <= 5.0, cost
