"""Prewarm: compile this GPU's kernels for a job's input shapes before its first real batch.

TensorRT-RTX specializes kernels for each input shape just in time. Under the default ``"lazy"``
strategy the specialized kernels compile in the background after a shape is first seen, so a job's
first batches at each shape run slower kernels. Prewarming runs the model once per shape with the
engines' ``dynamic_shapes_kernel_specialization_strategy`` set to ``"eager"`` (the kernels compile
synchronously, into the run's kernel cache), then gives the engines the session's own settings back
and runs each shape once more under them, so the first real batch finds the execution context and
the kernels ready. Closing the session saves the cache, so later runs on this GPU load them::

    from lightning_trt_rtx import ServingSession
    from lightning_trt_rtx.prewarm import example_inputs, parse_shape

    with ServingSession(model) as session:
        session.prewarm(example_inputs([parse_shape("8x128"), parse_shape("32x128")], "float16", "cuda"))
        for batch in loader:
            model(batch)

From Lightning: ``TRTRuntimeSettings(prewarm_shapes=["8x128", "32x128"])`` (or the same arguments of
``TRTRuntimePrecision``). Once per GPU of a node, in a deploy step (fills that GPU's cache file)::

    python -m lightning_trt_rtx prewarm model.ep --shape 8x128 --shape 32x128 --device 0

Measured on H200 (``tests/gpu/test_gpu_prewarm.py``): after prewarm, the first call at each prewarmed
shape ran within 2x of that shape's steady time.
"""

from __future__ import annotations

import logging
import numbers
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lightning_trt_rtx import _backend
from lightning_trt_rtx._messages import info, warn
from lightning_trt_rtx.engines import EngineBinding, find_engines

if TYPE_CHECKING:
    from lightning_trt_rtx.cache import Gpu, RunCache
    from lightning_trt_rtx.graphs import GraphScopes
    from lightning_trt_rtx.report import RankFigures

log = logging.getLogger(__name__)

Shape = tuple[tuple[int, ...], ...]  # one entry: the shape of each input of one call
SHAPE_FORM = (
    "'8x128' (one input of shape 8x128) or '8x128,8x128' (two inputs, one call); dimensions are positive integers"
)
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DIM = re.compile(r"[0-9]+")


class PrewarmError(RuntimeError):
    """A prewarm call failed; ``shape`` is the entry it ran (the model's own error is the cause)."""

    def __init__(self, shape: Shape, error: BaseException, dtypes: Sequence[torch.dtype] = (), hint: str = "") -> None:
        text = format_shape(shape)
        given = f" ({', '.join(_dtype_name(d) for d in dtypes)})" if dtypes else ""
        super().__init__(
            f"Prewarm call with input shape(s) {text}{given} failed: {type(error).__name__}: {error}"
            + (f". {hint}" if hint else "")
        )
        self.shape = shape


@dataclass(frozen=True)
class PrewarmedShape:
    """One prewarmed shape entry: ``first_call_ms`` under ``"eager"`` (the kernels compiled here), and
    ``served_ms``, the call after the session's own settings came back (None when they were the same)."""

    shape: Shape
    first_call_ms: float
    served_ms: float | None = None

    @property
    def text(self) -> str:
        return format_shape(self.shape)


# --- shapes and example inputs ------------------------------------------------------------------


def parse_shape(text: str) -> Shape:
    """``"8x128"`` -> ``((8, 128),)`` (one input); ``"8x128,8x128"`` -> two inputs of one call.

    ValueError showing the valid form for anything else.
    """
    if not isinstance(text, str):
        raise TypeError(f"A prewarm shape must be a str like {SHAPE_FORM}; got {type(text).__name__} {text!r}.")
    inputs = []
    for part in text.split(","):
        dims = [d.strip() for d in part.strip().lower().split("x")]
        if not all(_DIM.fullmatch(d) and int(d) > 0 for d in dims):
            raise ValueError(f"Invalid prewarm shape {text!r}. Valid form: {SHAPE_FORM}.")
        inputs.append(tuple(int(d) for d in dims))
    return tuple(inputs)


def format_shape(shape: Shape) -> str:
    """The inverse of :func:`parse_shape`: ``((8, 128), (8, 128))`` -> ``"8x128,8x128"``."""
    return ",".join("x".join(str(d) for d in dims) for dims in shape)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype``, or one of :data:`DTYPES`' names; ValueError naming the valid names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(f"Invalid prewarm dtype {dtype!r}. Valid names: {', '.join(DTYPES)} (or a torch.dtype).")


def _shapes(shapes: Iterable[Shape | str]) -> list[Shape]:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Iterable):
        raise TypeError(f"shapes must be a list of shapes, each like {SHAPE_FORM}; got {shapes!r}.")
    try:
        parsed = [parse_shape(s) if isinstance(s, str) else _shape_of_numbers(s) for s in shapes]
    except TypeError:  # e.g. [8, 128]: a shape given as numbers, not one entry per call
        raise TypeError(f"shapes must be a list of shapes, each like {SHAPE_FORM}; got {shapes!r}.") from None
    if not parsed:
        raise ValueError(f"No prewarm shapes given: give one or more, each like {SHAPE_FORM}.")
    return parsed


def _shape_of_numbers(entry: Iterable[Iterable[int]]) -> Shape:
    """One entry given as numbers, ``((8, 128),)``: every dimension a positive int, like :func:`parse_shape`."""
    shape = tuple(tuple(dims) for dims in entry)
    if not shape or not all(
        dims and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims)
        for dims in shape
    ):
        raise ValueError(
            f"Invalid prewarm shape {entry!r}: every dimension must be a positive int. Valid forms: {SHAPE_FORM},"
            " or per input a tuple of ints, e.g. ((8, 128),)."
        )
    return tuple(tuple(int(d) for d in dims) for dims in shape)


def example_inputs(
    shapes: Iterable[Shape | str],
    dtype: str | torch.dtype | Sequence[str | torch.dtype] = "float16",
    device: str | torch.device | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """One tuple of tensors per shape entry: ``torch.randn`` for floating dtypes, zeros (valid token
    ids) for integer ones. ``dtype``: one for every input, or a sequence with one per input."""
    entries = _shapes(shapes)
    if isinstance(dtype, (str, torch.dtype)):
        dtypes = [parse_dtype(dtype)] * max(len(entry) for entry in entries)
    elif isinstance(dtype, Sequence):
        dtypes = [parse_dtype(d) for d in dtype]
    else:  # None, a number: parse_dtype names the valid ones
        dtypes = [parse_dtype(dtype)]
    examples = []
    for entry in entries:
        if len(entry) > len(dtypes):
            raise ValueError(f"Shape {format_shape(entry)} has {len(entry)} inputs but only {len(dtypes)} dtypes.")
        examples.append(tuple(_tensor(dims, dt, device) for dims, dt in zip(entry, dtypes)))
    return examples


def _tensor(dims: tuple[int, ...], dtype: torch.dtype, device: str | torch.device | None) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(dims, dtype=dtype, device=device)
    return torch.zeros(dims, dtype=dtype, device=device)


# --- running ------------------------------------------------------------------------------------


class _Rank(Protocol):
    @property
    def rank(self) -> int: ...


class Session(Protocol):
    """What prewarming needs of a session: :class:`~lightning_trt_rtx.session.ServingSession` is one (it
    calls :func:`prewarm` from its own ``prewarm`` method; this module sits below it and imports it not)."""

    @property
    def closed(self) -> bool: ...

    @property
    def module(self) -> torch.nn.Module | None: ...

    @property
    def graphs(self) -> GraphScopes | None: ...

    @property
    def binding(self) -> EngineBinding | None: ...

    @property
    def cache(self) -> RunCache | None: ...

    @property
    def figures(self) -> RankFigures: ...

    @property
    def ranks(self) -> _Rank: ...

    def serve(self, module: torch.nn.Module | None = None, warn_if_none: bool = True) -> int: ...

    def apply_settings(self, **overrides: Any) -> int: ...

    def prewarm(self, inputs: Sequence[Any], target: str | None = None) -> list[Any]: ...

    def open_graphs(self, targets: Sequence[str] | None = None) -> None: ...

    def close_graphs(self) -> None: ...


def prewarm(
    session: Session, inputs: Iterable[torch.Tensor | Sequence[torch.Tensor]], target: str | None = None
) -> list[PrewarmedShape]:
    """Run the session's module (or its attribute ``target``) once per example, kernels compiled eagerly.

    Under ``torch.inference_mode()``, with every engine's ``dynamic_shapes_kernel_specialization_strategy``
    set to ``"eager"`` for the calls (the specialized kernels compile synchronously, into the run's
    cache handle), then the session's own settings given back and, where that changed them, each example
    run once more (the execution context is made again under them before the first real batch). CUDA
    graph scopes open on the session are closed for the calls and opened again after. Without engines or
    on a build that is not TensorRT-RTX there is nothing to compile: the calls do not run (you are told
    once) and the result is empty. Returns one record per example; a failing call raises
    :class:`PrewarmError` (naming the dtypes the model takes where they differ from the examples')
    after the settings are given back.
    """
    if session.closed:
        raise RuntimeError("This ServingSession is closed: prewarm before closing it (a session serves one run).")
    if session.module is None:
        raise ValueError("prewarm needs the session's module: pass it to ServingSession(module, ...) or serve(module).")
    examples = [(x,) if isinstance(x, torch.Tensor) else tuple(x) for x in inputs]
    if not examples:
        raise ValueError("prewarm got no inputs: give one example (a tensor or a tuple of tensors) per shape.")
    graphs = session.graphs if session.graphs is not None and session.graphs.is_open else None
    if graphs is not None:  # a graph would capture the calls: close the scopes for them, open them again after
        session.close_graphs()
    try:
        return _run(session, examples, target)
    finally:
        if graphs is not None:
            session.open_graphs(graphs.targets)


def _run(session: Session, examples: list[tuple[torch.Tensor, ...]], target: str | None) -> list[PrewarmedShape]:
    assert session.module is not None
    session.serve(session.module, warn_if_none=False)
    callee = _callee(session.module, target)
    binding = session.binding
    if binding is None or not binding.engines:
        # nothing to compile: the model's own ops would only run on made-up inputs (which its dtypes may refuse)
        what = "no TensorRT engines" if not session.figures.engines else "a build that is not TensorRT-RTX"
        warn(
            f"Prewarm skipped: {what} under {type(session.module).__name__}, so no TensorRT-RTX kernels to"
            " compile ahead of the first batch; its calls did not run.",
            rank=session.ranks.rank,
            rank_zero=True,
            once=True,
        )
        return []
    # eager needs a kernel cache: the settings change back drops the execution context, and the kernels
    # compiled under it survive only in the run's cache handle
    eager = session.cache is not None
    if not eager:
        info(
            "Prewarm without a kernel cache (runtime_cache=None): each shape runs once under the session's own"
            " settings; with a cache its kernels are compiled eagerly and kept.",
            rank=session.ranks.rank,
            rank_zero=True,
        )
    records: list[PrewarmedShape] = []
    restored = 0
    with torch.inference_mode():
        try:
            if eager:
                assert session.cache is not None
                session.apply_settings(dynamic_shapes_kernel_specialization_strategy="eager")
            for example in examples:
                records.append(PrewarmedShape(_shape_of(example), _timed(callee, example)))
        finally:
            restored = session.apply_settings()
        if restored:  # the execution context goes with a settings change: make it again before the first batch
            records = [
                PrewarmedShape(r.shape, r.first_call_ms, _timed(callee, example))
                for r, example in zip(records, examples)
            ]
    session.figures.prewarmed += len(records)
    log.debug("Prewarmed %s", ", ".join(f"{r.text}: {r.first_call_ms:.1f} ms" for r in records))
    return records


def _callee(module: torch.nn.Module, target: str | None) -> Any:
    if target is None:
        return module
    value = getattr(module, target, None)
    if value is None or not callable(value):
        from lightning_trt_rtx.graphs import compiled_attributes

        raise AttributeError(
            f"{type(module).__name__} has no callable attribute {target!r} to prewarm."
            f" Compiled attributes found: {compiled_attributes(module)}."
        )
    return value


def default_target(module: torch.nn.Module) -> str | None:
    """The attribute a LightningModule's prewarm calls by default: its only compiled attribute; None (the
    module's own forward) when it has none; ValueError naming them when it has several."""
    from lightning_trt_rtx.graphs import compiled_attributes

    found = compiled_attributes(module)
    if len(found) > 1:
        raise ValueError(
            f"{type(module).__name__} has several compiled attributes {found}: name the one the prewarm shapes are"
            " for with prewarm_target (or 'forward' for the LightningModule's own forward)."
        )
    return found[0] if found else None


def _shape_of(example: tuple[torch.Tensor, ...]) -> Shape:
    return tuple(tuple(t.shape) for t in example)


def _timed(callee: Any, example: tuple[torch.Tensor, ...]) -> float:
    devices = {t.device for t in example if isinstance(t, torch.Tensor) and t.is_cuda}
    for device in devices:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        callee(*example)
    except Exception as err:
        dtypes = [t.dtype for t in example]
        raise PrewarmError(_shape_of(example), err, dtypes, _dtype_hint(callee, dtypes)) from err
    for device in devices:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_hint(callee: Any, given: Sequence[torch.dtype]) -> str:
    """After a failed call: the dtypes the callee takes where they differ from the examples' (a saved
    program's recorded inputs, else its floating parameters), naming the valid prewarm dtypes."""
    module = callee if isinstance(callee, torch.nn.Module) else getattr(callee, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        return ""
    accepted = program_inputs(module)
    if accepted is not None:
        expected = {i.dtype for i in accepted[0] if i.dtype is not None}
        whose = "inputs"
    else:
        expected = {p.dtype for p in module.parameters() if p.is_floating_point()}
        whose = "parameters"
    if not expected or expected & set(given):
        return ""
    names = ", ".join(sorted(_dtype_name(d) for d in expected))
    return (
        f"The example inputs were {', '.join(sorted({_dtype_name(d) for d in given}))} and"
        f" {type(module).__name__}'s {whose} are {names}: give the prewarm dtype the model takes (prewarm_dtype,"
        f" --dtype; valid names: {', '.join(DTYPES)})"
    )


def summary(records: Sequence[PrewarmedShape]) -> str:
    """One line: every shape and its first-call time."""
    total = sum(r.first_call_ms for r in records)
    shapes = ", ".join(f"{r.text} {r.first_call_ms:.1f} ms" for r in records)
    return f"TensorRT-RTX prewarm: {len(records)} shape(s) in {total:.0f} ms ({shapes})"


# --- the callback's and the plugin's arguments --------------------------------------------------


@dataclass(frozen=True)
class PrewarmSpec:
    """The ``prewarm_*`` arguments of the callback and the plugin, validated at construction."""

    shapes: tuple[Shape, ...]
    dtype: torch.dtype
    target: str | None = None

    @classmethod
    def from_args(cls, shapes: list[str] | None, dtype: str, target: str | None) -> PrewarmSpec | None:
        if target is not None and (not isinstance(target, str) or not target.isidentifier()):
            raise TypeError(f"prewarm_target must be an attribute name (an identifier) or None; got {target!r}.")
        parsed_dtype = parse_dtype(dtype)
        if shapes is None:
            return None
        return cls(tuple(_shapes(shapes)), parsed_dtype, target)

    def run(self, session: Session, module: torch.nn.Module) -> list[PrewarmedShape]:
        """Prewarm ``session`` once (a session that prewarmed already is left alone) on ``module``'s device."""
        if session.closed or session.figures.prewarmed:
            return []
        target = self.target if self.target is not None else default_target(module)
        device = getattr(module, "device", None)
        if not isinstance(device, torch.device):
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
        records = session.prewarm(example_inputs(self.shapes, self.dtype, device), target)
        if records:  # none: skipped (no engines), and said so
            info(summary(records), rank=session.ranks.rank, rank_zero=True)
        return records


# --- checking a saved program (the command line) ------------------------------------------------


def check_program_gpu(program: torch.nn.Module, gpu: Gpu) -> str | None:
    """Why ``program``'s engines cannot run on ``gpu`` (None when they can, or when unknown).

    Engines record the GPU they were built on (compute capability and name). Like torch-tensorrt's
    runtime, a device with the same compute capability runs them; a hardware-compatible engine runs on
    any Ampere or newer GPU.
    """
    for engine in find_engines(program):
        built = _backend.engine_target(engine.obj)
        if built is None:
            continue
        ampere_or_newer = _sm_number(built.sm) >= 80 and _sm_number(gpu.sm) >= 80
        if built.sm == gpu.sm or (built.hardware_compatible and ampere_or_newer):
            continue
        return (
            f"the program was built for another GPU: engine {engine.name} targets {built.name} ({built.sm}),"
            f" and this is {gpu.name} ({gpu.sm}, GPU {gpu.id}). Compile it for this GPU, or prewarm it on a"
            f" {built.sm} GPU."
        )
    return None


def _sm_number(sm: str) -> int:
    digits = sm.removeprefix("sm")
    return int(digits) if digits.isdigit() else 0


@dataclass(frozen=True)
class _Input:
    dims: tuple[Any, ...]  # an int (static) or a symbol name (dynamic)
    dtype: torch.dtype | None


def program_inputs(program: torch.nn.Module) -> tuple[list[_Input], dict[str, tuple[int, int | None]]] | None:
    """The inputs a program from ``torch_tensorrt.load(...).module()`` takes (from its placeholders' metadata)
    and each dynamic dimension's range; None when the program does not record them."""
    graph = getattr(program, "graph", None)
    if graph is None:
        return None
    ranges: dict[str, tuple[int, int | None]] = {}
    constraints = getattr(program, "range_constraints", None) or {}
    inputs = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        dims: list[Any] = []
        for dim in value.shape:
            if isinstance(dim, int):
                dims.append(int(dim))
                continue
            expr = dim.node.expr
            dims.append(str(expr))
            if expr in constraints:
                ranges[str(expr)] = (_bound(constraints[expr].lower) or 0, _bound(constraints[expr].upper))
        inputs.append(_Input(tuple(dims), value.dtype))
    return inputs, ranges


def _bound(value: Any) -> int | None:
    """A range end as an int; None for an unbounded one (sympy's infinities)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):  # int_oo raises AttributeError
        return None


def describe_inputs(inputs: list[_Input], ranges: dict[str, tuple[int, int | None]]) -> str:
    """``1 input: s0x128 float16 (s0 in 1..64)``: what a program accepts, for error messages."""
    parts = [f"{'x'.join(str(d) for d in i.dims)} {str(i.dtype).removeprefix('torch.')}" for i in inputs]
    bounds = [f"{name} in {lo}..{'' if hi is None else hi}" for name, (lo, hi) in sorted(ranges.items())]
    where = f" ({', '.join(bounds)})" if bounds else ""
    return f"{len(inputs)} input(s): {', '.join(parts)}{where}"


def check_shape(shape: Shape, inputs: list[_Input], ranges: dict[str, tuple[int, int | None]]) -> str | None:
    """Why the program rejects ``shape`` (None when it accepts it)."""
    if len(shape) != len(inputs):
        return f"{len(shape)} input(s) given"
    bound: dict[str, int] = {}
    for index, (dims, expected) in enumerate(zip(shape, inputs)):
        if len(dims) != len(expected.dims):
            return f"input {index} has {len(dims)} dimension(s), the program's has {len(expected.dims)}"
        for axis, (size, want) in enumerate(zip(dims, expected.dims)):
            if isinstance(want, int):
                if size != want:
                    return f"input {index} dimension {axis} is {size}, the program's is {want}"
                continue
            if want in ranges:
                lo, hi = ranges[want]
                if size < lo or (hi is not None and size > hi):
                    return f"input {index} dimension {axis} is {size}, outside {want}'s range {lo}..{hi or ''}"
            if bound.setdefault(want, size) != size:
                return f"dimension {want} is {bound[want]} in one input and {size} in another (they must be equal)"
    return None
