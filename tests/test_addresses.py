"""Stable addresses under whole-graph capture, on CPU.

A TensorRT engine cannot run here, so the engine is faked at our own boundary: a module that runs
like torch-tensorrt's runtime does (binds whatever input it is given; with ``use_pre_allocated_outputs``
it returns the same output tensors while the shapes stay the same, else fresh ones) and records the
addresses it was bound to. Its settings are real ``torch_tensorrt.runtime.RuntimeSettings``. The
session tests use real engine-less ``TorchTensorRTModule`` objects. ``tests/gpu`` runs real engines.
"""

from __future__ import annotations

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
def settings(trt):
    return {
        s: trt.runtime.RuntimeSettings(cuda_graph_strategy=s, runtime_cache=None)
        for s in ("disabled", "whole_graph_capture")
    }


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


def test_bare_engines_whose_io_cannot_be_read_are_left_alone(settings):
    owner = RuntimeLikeEngine(settings["whole_graph_capture"])
    stable = StableAddresses([Engine("owner._run_on_acc_0_engine", "bare", object(), owner=owner)])
    stable.install()
    assert not stable.sites and "forward" not in vars(owner)
    assert stable.describe() == (
        "addresses NOT held: 1 engine(s) left as they are (aliased I/O, a program writing its inputs, or I/O that"
        " cannot be read)"
    )


def test_a_bare_engine_is_held_unless_its_serialized_info_says_it_aliases_io(settings):
    from lightning_trt_rtx import _backend
    from tests.test_prewarm import Stub  # a torchbind Engine's serialized info

    def engine(aliased_io: str) -> Stub:
        return Stub("0%9%0%1%NVIDIA H100", aliased_io=aliased_io)  # ALIASED_IO: "output@input@kind" records

    assert _backend.bare_engine_aliases_io(engine("")) is False
    assert _backend.bare_engine_aliases_io(engine("out@cache@kv")) is True
    for aliased, sites in (("", 1), ("out@cache@kv", 0)):
        owner = RuntimeLikeEngine(settings["whole_graph_capture"])
        stable = StableAddresses([Engine("owner._run_on_acc_0_engine", "bare", engine(aliased), owner=owner)])
        stable.install()
        assert len(stable.sites) == sites and ("forward" in vars(owner)) == bool(sites)
        stable.uninstall()


def test_a_session_refuses_a_bad_mode_before_serving_and_gives_every_engine_back(trt, fake_gpu, monkeypatch):
    TTM = trt.dynamo.runtime.TorchTensorRTModule
    model, engines = engine_tree(TTM)
    monkeypatch.setenv(addresses.ENABLED_ENV, "yes")
    with pytest.raises(ValueError, match="not a valid choice: use 0"):
        with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)):
            pass
    assert not any("forward" in vars(e) for e in engines)
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


def test_a_loop_compares_nothing_with_calls_before_it(settings):
    engine = AllocatorLikeEngine(settings["whole_graph_capture"])
    stable = held(engine)
    engine(batches(8)[0])  # e.g. a prewarm call, its input elsewhere than the loop's batches
    stable.resume()
    x = batches(8)[0]
    for _ in range(4):
        engine(x)
    assert stable.describe() == (
        "stable addresses: 1 call site(s), 1 shape(s), nothing to copy (the addresses did not move)"
    )


def test_a_call_with_a_number_input_passes_through_and_says_why(settings):
    class ShapeArgEngine(RuntimeLikeEngine):
        def forward(self, x: torch.Tensor, rows: int) -> torch.Tensor:  # the output's shape follows ``rows``
            return super().forward(x[:rows])

    engine = ShapeArgEngine(settings["whole_graph_capture"])
    stable = held(engine, from_first_call=True)
    x = batches(8)[0]
    for rows in (8, 3, 5):
        torch.testing.assert_close(engine(x, rows), 2 * x[:rows] + 1)
    assert not engine.use_pre_allocated_outputs and not stable.sites[0].buffers
    assert stable.describe() == (
        "addresses NOT held at 1 of 1 call sites: a number input may decide the output shapes"
    )


def test_every_engine_of_a_program_is_left_alone_when_one_aliases_its_io(settings):
    from tests.test_prewarm import Stub  # a torchbind Engine's serialized info

    owner = RuntimeLikeEngine(settings["whole_graph_capture"])
    plain, aliased = Stub("0%9%0%1%NVIDIA H100", aliased_io=""), Stub("0%9%0%1%NVIDIA H100", aliased_io="o@c@kv")
    stable = StableAddresses(
        [Engine("owner._run_on_acc_0_engine", "bare", plain, owner=owner),
         Engine("owner._run_on_acc_2_engine", "bare", aliased, owner=owner)]
    )  # fmt: skip
    stable.install()
    assert not stable.sites and stable.skipped == 2 and "forward" not in vars(owner)


class BareEngine(RuntimeLikeEngine):
    """A loaded program's bare engine: settings through ``update_runtime_settings`` (read back from what
    was last set), serialized info that says it aliases nothing."""

    def update_runtime_settings(self, *codes) -> None:
        self.codes = codes

    def __getstate__(self):
        return ["10", "e", "0%9%0%1%NVIDIA H100", b"", "", "", "0", "", "", "0", "0", "0", ""], "Engine"


class Program(nn.Module):
    """A loaded program's forward: an in-place aten op on its input (optional), then its engine."""

    def __init__(self, engine: nn.Module, writes_input: bool) -> None:
        super().__init__()
        self.engine, self.writes_input = engine, writes_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.writes_input:
            torch.ops.aten.mul_.Scalar(x, 1)
        return self.engine(x)


class _EngineIsALeaf(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, RuntimeLikeEngine) or super().is_leaf_module(module, name)


def bare_in(owner: nn.Module, engine: BareEngine, settings) -> Engine:
    found = Engine("engine", "bare", engine, owner=owner)
    found.set(settings)
    return found


@pytest.mark.parametrize("writes_input", [True, False])
def test_a_program_is_left_alone_where_its_graph_writes_an_input_else_its_inputs_are_copied(settings, writes_input):
    engine = BareEngine(settings["whole_graph_capture"])
    program = Program(engine, writes_input)
    graph_module = torch.fx.GraphModule(program, _EngineIsALeaf().trace(program))  # as a loaded program's graph
    stable = StableAddresses([bare_in(graph_module, engine, settings["whole_graph_capture"])])
    stable.install()
    if writes_input:
        assert not stable.sites and stable.skipped == 1
        return
    inputs = batches(8, 8, 8, 8)
    for x in inputs:
        torch.testing.assert_close(graph_module(x), 2 * x + 1)
    assert stable.sites[0].copy_inputs and len(set(engine.bound_inputs[2:])) == 1  # moved, then copied


def test_inputs_of_a_module_that_might_write_them_are_never_copied_and_that_is_said(settings):
    engine = BareEngine(settings["whole_graph_capture"])
    owner = Program(engine, writes_input=True)  # plain Python: nothing says whether it writes its inputs
    stable = StableAddresses([bare_in(owner, engine, settings["whole_graph_capture"])])
    stable.install()
    inputs = batches(8, 8, 8)
    for x in inputs:
        expected = 2 * x + 1
        torch.testing.assert_close(owner(x), expected)
    assert engine.bound_inputs == [x.data_ptr() for x in inputs]  # the caller's own tensors: never copied
    assert stable.describe().endswith(
        "; inputs moved but not copied at 1 call site(s) (the program might write into them)"
    )


def test_an_exported_programs_graph_says_whether_it_writes_an_input():
    class UpdatesCache(nn.Module):
        def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
            cache.add_(1)
            return x * 2 + cache

    class Pure(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2

    x = torch.randn(3)
    assert addresses._writes_inputs(torch.export.export(UpdatesCache(), (x, torch.zeros(3))).module()) is True
    assert addresses._writes_inputs(torch.export.export(Pure(), (x,)).module()) is False
    assert addresses._writes_inputs(Pure()) is None  # plain Python: cannot tell
