"""Loaded programs under whole-graph capture, on CPU: real ``torch.export`` programs.

A saved TensorRT program is an ``ExportedProgram`` whose graph runs each engine through an operator
(``tensorrt::execute_engine``) on an engine object the graph reads with ``get_attr``;
``ExportedProgram.module()`` puts an engine re-traced by ``torch_tensorrt.save`` on an empty container
(``_run_on_acc_0.<name>``), not on the graph module itself. A real engine cannot run here, so the
engine is faked at our own boundary: an opaque object (as torch-tensorrt's own Python ``TRTEngine``
is registered) that computes ``2 * x + 1`` the way the runtime hands out outputs, run by a custom
operator with the same schema shape as ``execute_engine``; ``_backend.is_bare_engine`` accepts it.
Everything else (export, the signature, ``.module()``, ``torch.export.save``/``load``) is real.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._custom_class_base import CustomClassBase
from torch._library.opaque_object import register_opaque_type

from lightning_trt_rtx import _backend
from lightning_trt_rtx.addresses import StableAddresses
from lightning_trt_rtx.engines import EngineBinding, find_engines
from tests.test_addresses import BareEngine, RuntimeLikeEngine, batches


class ExportableEngine(CustomClassBase):
    """An engine a program can hold as a constant: the runtime-like behaviour of the CPU address tests."""

    def __init__(self, aliased_io: str = "") -> None:
        self.aliased_io = aliased_io
        self.use_pre_allocated_outputs = False
        self.unowned = True
        self.obeys_ownership = True
        self.bound_inputs: list[int] = []
        self.bound_outputs: list[int] = []
        self.pre_allocated_outputs: list[torch.Tensor] = []
        self._last: tuple[torch.Size | None, bool] = (None, False)

    set_output_tensors_as_unowned = RuntimeLikeEngine.set_output_tensors_as_unowned
    are_output_tensors_unowned = RuntimeLikeEngine.are_output_tensors_unowned
    run = RuntimeLikeEngine.forward
    update_runtime_settings = BareEngine.update_runtime_settings
    __getstate__ = BareEngine.__getstate__  # the serialized info, as a torchbind Engine answers it

    def __reduce__(self) -> tuple:  # torch.export.save pickles constants; a fresh engine comes back
        return ExportableEngine, (self.aliased_io,)


register_opaque_type(ExportableEngine, typ="reference")


@torch.library.custom_op("lightning_trt_rtx_tests::execute_engine", mutates_args=())
def execute_engine(inputs: list[torch.Tensor], engine: ExportableEngine) -> list[torch.Tensor]:
    return [engine.run(inputs[0])]


@execute_engine.register_fake
def _(inputs: list[torch.Tensor], engine: ExportableEngine) -> list[torch.Tensor]:
    return [torch.empty_like(inputs[0])]


class _Accelerated(nn.Module):
    """What ``torch_tensorrt.compile`` leaves for one engine: a submodule holding it as a plain attribute."""

    def __init__(self, engine: ExportableEngine) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lightning_trt_rtx_tests.execute_engine([x], self.engine)[0]


class Compiled(nn.Module):
    """A compiled model: an engine, and PyTorch ops around it that write into an input or not."""

    def __init__(self, writes: str = "") -> None:
        super().__init__()
        self._run_on_acc_0 = _Accelerated(ExportableEngine())
        self.writes = writes

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.writes == "input":
            scale.add_(1)  # e.g. a step counter updated in place
        elif self.writes == "view":
            x[:, :2].mul_(2)
        return self._run_on_acc_0(x)  # the input reaches the engine, whose output is the program's (as ResNet-50's)


def _look_at(x: torch.Tensor) -> None:
    pass


def exported(writes: str = "", functional: bool = False) -> torch.export.ExportedProgram:
    program = torch.export.export(Compiled(writes), (torch.randn(8, 4), torch.ones(1)), strict=False)
    return program.run_decompositions() if functional else program


def served(module: nn.Module, settings) -> StableAddresses:
    binding = EngineBinding(module)
    binding.apply(settings["whole_graph_capture"])
    stable = StableAddresses(binding.engines)
    stable.install()
    return stable


@pytest.fixture(autouse=True)
def exportable_engines_are_bare_engines(trt, monkeypatch):
    recognise = _backend.is_bare_engine
    monkeypatch.setattr(_backend, "is_bare_engine", lambda obj: isinstance(obj, ExportableEngine) or recognise(obj))


def test_a_retraced_program_runs_its_engine_from_the_graph_above_the_container():
    """Why a saved ResNet-50 was left alone: its engine sits on a container module, not on the graph."""
    module = exported().module()
    (engine,) = find_engines(module)
    assert engine.kind == "bare" and engine.name.startswith("_run_on_acc_0.")
    assert engine.owner is module._run_on_acc_0 and not isinstance(engine.owner, torch.fx.GraphModule)
    assert engine.runner is module


def test_a_program_that_writes_into_no_input_holds_its_inputs_and_outputs(settings):
    module = exported().module()
    stable = served(module, settings)
    (engine,) = [e.obj for e in find_engines(module)]
    scale = torch.ones(1)
    inputs = batches(8, 8, 8, 8, 8)
    kept = [module(x, scale) for x in inputs]  # every input and output kept alive: both move
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert len(set(engine.bound_inputs[2:])) == 1  # copied into one buffer from the third call
    assert len(set(engine.bound_outputs[3:])) == 1  # and the engine keeps its outputs
    assert stable.describe() == (
        "stable addresses: 1 call site(s), 1 shape(s), inputs copied in at 1 of 1 call site(s), outputs kept and"
        " copied out at 1 of 1 call site(s) once they had moved"
    )
    stable.uninstall()
    assert "forward" not in vars(module)


def test_a_program_called_with_keyword_inputs_copies_them_in_too(settings):
    """A program exported with keyword inputs (input_ids=, attention_mask=): they are its engine's inputs
    as much as positional ones, and are copied into buffers once their addresses moved."""
    program = torch.export.export(Compiled(), (), {"x": torch.randn(8, 4), "scale": torch.ones(1)}, strict=False)
    module = program.module()
    stable = served(module, settings)
    (engine,) = [e.obj for e in find_engines(module)]
    inputs = batches(8, 8, 8, 8, 8, 8)
    kept = [module(x=x, scale=torch.ones(1)) for x in inputs]  # every input and output kept alive: both move
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert len(set(engine.bound_inputs[2:])) == 1  # copied into one buffer from the third call
    assert "inputs copied in at 1 of 1 call site(s)" in stable.describe()
    stable.uninstall()


@pytest.mark.parametrize(
    ("writes", "functional", "op"),
    [
        ("input", False, "aten.add_.Tensor"),  # torch.export's default IR keeps the in-place op
        ("input", True, "aten.copy_.default"),  # the functional IR: .module() copies the result back
        ("view", False, "aten.mul_.Tensor"),  # a write into a view of the input
    ],
)
def test_a_program_that_writes_into_an_input_is_left_alone_and_says_which(settings, writes, functional, op):
    program = exported(writes, functional)
    if functional:
        assert list(program.graph_signature.user_inputs_to_mutate.values()) == ["scale"]
    module = program.module()
    stable = served(module, settings)
    assert not stable.sites and stable.skipped == 1
    name = "x" if writes == "view" else "scale"
    assert stable.describe() == (
        f"addresses NOT held: 1 engine(s) left as they are: their program writes into its input {name!r} ({op}):"
        " a copy of the input would hide the write"
    )
    x, scale = batches(8)[0], torch.ones(1)
    expected_scale = 2.0 if writes == "input" else 1.0
    written = x.clone()
    if writes == "view":
        written[:, :2] *= 2
    torch.testing.assert_close(module(x.clone(), scale), 2 * written + 1)
    assert scale.item() == expected_scale  # the write reached the caller's tensor


def test_load_program_records_the_signatures_input_writes(tmp_path, settings):
    """``load_program`` keeps what the saved program's signature records (``.module()`` drops it)."""
    path = str(tmp_path / "program.ep")
    torch.export.save(exported("input", functional=True), path)
    module = _backend.load_program(path)
    assert module.meta[_backend.PROGRAM_INPUTS_MUTATED] == ("scale",)
    module.eval()  # Lightning calls it
    stable = served(module, settings)
    assert stable.skipped == 1 and "writes into its input 'scale'" in stable.describe()
    torch.export.save(exported(), path)
    clean = _backend.load_program(path)
    assert clean.meta[_backend.PROGRAM_INPUTS_MUTATED] == ()
    assert len(served(clean, settings).sites) == 1


def test_a_program_graph_that_cannot_be_read_holds_outputs_only(settings):
    """A graph with a Python call in it (not an exported program's): its writes cannot be told."""
    module = exported().module()
    x = next(n for n in module.graph.nodes if n.op == "placeholder")
    with module.graph.inserting_after(x):
        module.graph.call_function(_look_at, (x,))  # a plain Python callable: no schema says what it writes
    module.recompile()
    stable = served(module, settings)
    (engine,) = [e.obj for e in find_engines(module)]
    inputs = batches(8, 8, 8, 8)
    kept = [module(x, torch.ones(1)) for x in inputs]
    for x, y in zip(inputs, kept):
        torch.testing.assert_close(y, 2 * x + 1)
    assert engine.bound_inputs == [x.data_ptr() for x in inputs]  # never copied
    assert "a loaded program's inputs moved" in stable.describe()
