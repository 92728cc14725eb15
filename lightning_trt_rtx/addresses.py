"""Stable input and output addresses for engines under ``cuda_graph_strategy="whole_graph_capture"``.

TensorRT-RTX replays an engine's captured CUDA graph only while the engine's input and output
addresses stay the same; when they move it captures again, which costs more than not capturing at
all (bare engine on H100, 32x256 MLP: 76 µs per call at fixed addresses, 369-505 µs when they move,
455 µs without graphs). torch-tensorrt binds the caller's input tensor and a freshly allocated
output on every call, so the addresses are what the caching allocator hands back: inside
``Trainer.predict`` they are usually the same every batch (each batch's tensors are freed before the
next is allocated; with ``return_predictions=True`` Lightning keeps a host copy of each prediction),
and copying then costs more than it saves (H200, 32x256 MLP: 0.32 ms per batch as upstream, 0.44 ms
copying every call). They move when something keeps an engine's GPU outputs or inputs alive past the
next batch: a prediction writer or callback that stores them, a ``predict_step`` that stashes them.

So each call site (a ``TorchTensorRTModule``, or the module whose attributes hold a loaded program's
bare engines) watches its engines' addresses, and holds still what moved, from the next call on, for
the rest of the run:

* **inputs** (positional tensors), once their address moved between two calls at the same shapes,
  are copied into buffers allocated once per shape signature (shapes, dtypes, devices of the call's
  tensors), at most :data:`MAX_SHAPES` signatures per site, least recently used dropped;
* **outputs**, once their address moved, stay in the engine's own buffers (torch-tensorrt's
  ``use_pre_allocated_outputs``, with the outputs owned by the engine: it reuses them while the
  input shapes stay the same), and the caller gets a copy, so a prediction Lightning keeps is never
  overwritten by a later batch.

``$LIGHTNING_TRT_RTX_STABLE_ADDRESSES``: ``1`` (the default) as above, ``always`` copies from the first
call, ``0`` leaves the addresses to torch-tensorrt, ``graphs`` captures call sites instead (below).

**Call-site graphs** (``StableAddresses(..., graphs=True)``: ``graphs`` above, or ``"auto"``'s candidate;
the session runs the engines with their own capture off): each call site whose inputs can be copied is
captured in a ``torch.cuda.CUDAGraph`` of its own after :data:`GRAPH_AFTER` calls in a row at one input
signature (shapes, dtypes, devices, inference mode); one graph at a time, freed by a call at other shapes
(TensorRT ties a captured graph to its context's input shapes). A call copies its
inputs into the graph's buffers, replays it on the current stream and returns a copy of its outputs
(:class:`_Graph`), with none of torch-tensorrt's per-call host work. Calls with a non-tensor input or
autograd run as they are; a site whose engines cannot be captured
(:func:`~lightning_trt_rtx._backend.graph_capture_blocker`) or whose capture fails runs as it is for
good, the reason in :meth:`StableAddresses.describe`. Graphs are freed between loops, after a prewarm
(:meth:`StableAddresses.forget`), where the session changed an engine's settings
(:meth:`StableAddresses.drop_graphs`) and on uninstall: each re-creates the engines' execution contexts,
whose memory a graph holds. Where an engine keeps its outputs (the user's ``use_pre_allocated_outputs``),
calls without the graph hand out copies too (a later replay writes into those tensors).

Held addresses apply only while the site's engines hold ``whole_graph_capture`` and no CUDA-graph
capture is running around them (inside
:class:`~lightning_trt_rtx.graphs.GraphScopes`' whole-module graph the engines' own capture is off and
the outer graph already holds its buffers): otherwise calls pass straight through. A change of shapes
is a new capture (the engine keeps one set of outputs and allocates new ones for new shapes), and so
is a kept output that moves between steady calls; :meth:`StableAddresses.describe` counts both.
Where this applies: a ``TorchTensorRTModule`` (its forward runs its engine once per call, and writes
no input), and a loaded program's graph (``torch_tensorrt.load(...).module()``, the graph that reads
its engines with ``get_attr``) that runs each engine once per call, inputs and outputs alike where its
graph provably writes into no input (:func:`_inputs_written`: the ops' schemas, and the signature's
``user_inputs_to_mutate`` that :func:`~lightning_trt_rtx.load_program` records); where that cannot be
told, outputs only (moved inputs are reported). Left alone, with the reason in the figures: engines
that alias an output to an input (or whose I/O cannot be read), with every other engine of their
program; a program that writes into one of its inputs (a staged copy would hide the write; the input
and the op are named); engines run by a module of the user's own (it may run one twice in a forward:
one kept output for both calls); a ``TorchTensorRTModule`` called with a number (its engine takes a
shape input, and reuses kept outputs by input shapes only). Between loops
(:meth:`StableAddresses.pause`, :meth:`~StableAddresses.resume`) calls pass through and the engines have
their own output setting; the last call's addresses are forgotten at each, and after a prewarm
(:meth:`~StableAddresses.forget`)::

    stable = StableAddresses(find_engines(model))
    stable.install()
    try:
        ...                       # model(x): engines replay their graphs from about the third call at a shape
    finally:
        stable.uninstall()        # forwards and the engines' output setting put back
"""

from __future__ import annotations

import contextlib
import functools
import logging
import numbers
import operator
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from lightning_trt_rtx import _backend
from lightning_trt_rtx.engines import Engine

log = logging.getLogger(__name__)

MAX_SHAPES = 8  # input buffers kept per call site: a few batch sizes and a smaller last batch
_WHOLE_GRAPH = "whole_graph_capture"
_HELD = (True, False)  # pre-allocated outputs on, and owned by the engine: the same tensors every call
# the first held call: pre-allocated but "unowned", so the engine makes a fresh set for this call's shapes
# after it (whatever it kept before: upstream reuses kept outputs without checking their shape)
_FRESH = (True, True)
ENABLED_ENV = "LIGHTNING_TRT_RTX_STABLE_ADDRESSES"
# "0": leave the addresses to torch-tensorrt (whole-graph capture as upstream does it): the escape hatch,
# and a baseline of the graphs benchmark; "1": copy what moved (the default); "always": copy from the
# first call (for a job that knows its addresses move: saves the capture that finds it out)
# "graphs": each call site runs its engines without their own capture (their strategy "disabled") inside
# a CUDA graph of its own, captured at the shapes of its last calls (see _Graph): one replay per call,
# without torch-tensorrt's per-call host work
_MODES = {"0": "off", "1": "moved", "always": "always", "graphs": "graphs"}
GRAPH_AFTER = 2  # calls at an input signature run as they are before its capture (first execute, shapes settle)
_PROGRAM_WRITES = "its program may write into its inputs"  # why a site's inputs are not copied into a graph


def mode() -> str:
    """``"off"``, ``"moved"`` (the default) or ``"always"``, from ``$LIGHTNING_TRT_RTX_STABLE_ADDRESSES``."""
    value = os.environ.get(ENABLED_ENV, "1").strip().lower()
    if value not in _MODES:
        raise ValueError(
            f"${ENABLED_ENV}={value!r} is not a valid choice: use 0 (leave the addresses to torch-tensorrt),"
            " 1 (copy an engine's inputs or outputs once their address moved; the default), always"
            " (copy from the first call) or graphs (a CUDA graph of each call site, captured by this package;"
            " the engines' own capture off)."
        )
    return _MODES[value]


class _Site:
    """One call site: ``module.forward`` wrapped, the engines it runs, the buffers and what was seen."""

    def __init__(
        self,
        module: torch.nn.Module,
        engines: list[Engine],
        from_first_call: bool = False,
        program: bool = False,
        graphs: bool = False,
    ) -> None:
        self.module = module
        self.engines = engines
        self.original = module.forward
        self.program = program  # a program graph that may write into its inputs: they are not copied
        self.buffers: OrderedDict[tuple, list[torch.Tensor | None]] = OrderedDict()
        # what the site does, each switched on for good the first time that address moved between two
        # calls at the same shapes (each move is a capture the engine had to make again)
        self.copy_inputs = from_first_call and not program
        self.keep_outputs = from_first_call
        self.holding = False  # whether the engines keep their outputs (see _backend.set_output_holding)
        # engines told to make a fresh set of kept outputs (see _FRESH), by id, with the addresses of
        # the ones they kept before: an engine has made its set once they differ
        self.fresh: dict[int, tuple[int, ...]] = {}
        self.paused = False  # between loops: calls pass through
        self.inputs_left = False  # a program's inputs moved (not copied: a new capture each time)
        self.prior: list[tuple[bool, bool]] | None = None  # read when first held: engines are set up by then
        self.failure = ""  # why this site passes through for good (the figures show it)
        self.calls = 0  # calls under the engines' own whole-graph capture
        self.moves = 0  # held outputs at a new address between two steady calls at the same shapes
        self._last: tuple[tuple, tuple[int, ...], tuple[int, ...]] | None = None  # (signature, inputs, outputs)
        self._streak = 0  # calls in a row at the last signature since the site last changed what it does
        self.shapes_seen: set[tuple] = set()
        self.switches = 0  # calls at other shapes than the call before: the engine captures again
        self._cuda = torch.cuda.is_available()  # asking whether a capture runs needs a driver
        # the steady call's key, set once a call changed nothing (see _steady): (per input (address or
        # None when copied in, shape, dtype, device), the input buffers or None, output addresses,
        # inference mode)
        self._fast: tuple[tuple, list | None, tuple[int, ...], bool] | None = None
        # under "graphs": the site's CUDA graph and the input signature it was captured at, the calls in a row
        # at a signature not captured yet, whether an engine keeps its outputs (then the site's calls without
        # the graph hand out copies), and what ran
        self.graphs = graphs
        self.graph: tuple[tuple, _Graph] | None = None
        self._pending: tuple[tuple | None, int] = (None, 0)
        self.keeps_outputs: bool | None = None
        self._capture_stream: Any = None
        self.replays = 0  # calls replayed from a graph
        self.eager = 0  # calls run as they are (warm-up at a new signature, a non-tensor input, an outer capture)
        self.captures = 0
        self.unfit = ""  # why a call could not be replayed from any graph (its inputs), where one could not

    # --- under "graphs": one CUDA graph of the call, at the shapes of the last calls -----------------

    def _graph_call(self, args: tuple, kwargs: dict) -> Any:
        if self.paused:
            return self.original(*args, **kwargs)
        tensors = (*args, *(kwargs[k] for k in sorted(kwargs))) if kwargs else args
        if self.failure or not self._graphs_wanted():
            return self._eager(args, kwargs)
        if not all(isinstance(t, torch.Tensor) for t in tensors):  # a number a graph would fix at its capture
            self.unfit = "a call passed a non-tensor input (a graph would fix it at its capture)"
            return self._eager(args, kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):  # a replay records no autograd
            self.unfit = "a call needed autograd (a replay records none)"
            return self._eager(args, kwargs)
        key = (
            torch.is_inference_mode_enabled(),
            len(args),
            tuple(kwargs) if kwargs else (),
            *[(t.shape, t.dtype, t.device) for t in tensors],
        )
        graph = self.graph
        if graph is None or graph[0] != key:
            graph = self._graph_for(key, args, kwargs, tensors)
            if graph is None:
                return self._eager(args, kwargs)
        self.replays += 1
        return graph[1].run(tensors)

    def _eager(self, args: tuple, kwargs: dict) -> Any:
        """The call as it is: the caller's own copy of outputs an engine keeps (a later replay writes
        into them)."""
        self.eager += 1
        outputs = self.original(*args, **kwargs)
        if self.keeps_outputs is None:
            try:
                self.keeps_outputs = any(_backend.output_holding(e.obj) == _HELD for e in self.engines)
            except Exception:  # an engine without the output setting keeps none
                self.keeps_outputs = False
        return _copy_tensors(outputs) if self.keeps_outputs else outputs

    def _graphs_wanted(self) -> bool:
        """Engines without their own capture (a capture inside ours fails in CUDA), and no graph being
        captured around the call (an enable_cudagraphs whole-module graph holds its launches already)."""
        if self._cuda and _capturing():
            return False
        return all(engine.get().cuda_graph_strategy == "disabled" for engine in self.engines)

    def _graph_for(self, key: tuple, args: tuple, kwargs: dict, tensors: tuple) -> tuple[tuple, _Graph] | None:
        """The graph for a call at ``key``, captured now after :data:`GRAPH_AFTER` calls in a row at it;
        None (the call runs as it is) before, or where it cannot be captured. A call at other shapes frees
        the graph: TensorRT ties a captured graph to its execution context's input shapes (upstream's own
        graphs are captured again at every change of shapes too)."""
        self.graph = None
        if self._pending[0] != key:
            self._pending = (key, 0)
        if self._pending[1] < GRAPH_AFTER:
            self._pending = (key, self._pending[1] + 1)
            return None
        if _backend.cudagraphs_mode() != _backend.STANDARD:
            return None  # enable_cudagraphs scopes are open: their graphs capture the engines
        try:
            graph = self._capture(args, kwargs, tensors)
        except Exception as err:  # e.g. an op that synchronizes: the site runs its calls as they are
            self._give_up(f"its call could not be captured in a CUDA graph ({type(err).__name__}: {err})")
            return None
        self._pending = (None, 0)
        self.graph = (key, graph)
        self.captures += 1
        return self.graph

    def _capture(self, args: tuple, kwargs: dict, tensors: tuple) -> _Graph:
        """Capture the call on copies of its inputs (the graph's input buffers, outside its memory pool)."""
        if self._capture_stream is None:
            self._capture_stream = _side_stream(tensors[0].device if tensors else None)
        inputs = [t.detach().clone() for t in tensors]
        static_args = tuple(inputs[: len(args)])
        static_kwargs = dict(zip(sorted(kwargs), inputs[len(args) :]))
        graph, outputs = _capture_call(functools.partial(self.original, *static_args, **static_kwargs),
                                       self._capture_stream)  # fmt: skip
        log.debug("Captured a CUDA graph of %s's call (%d input(s))", type(self.module).__name__, len(inputs))
        return _Graph(graph, inputs, outputs)

    def drop_graphs(self) -> None:
        """Free the site's graph (e.g. between loops, or where the engines' settings changed: that
        re-creates their execution contexts, and a graph would replay launches into freed memory)."""
        self.graph = None
        self._pending = (None, 0)

    # --- the wrapped forward: the steady path, else the full one ---------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.graphs:
            return self._graph_call(args, kwargs)
        fast = self._fast
        if fast is not None and not kwargs:  # the steady path: same shapes and addresses as the last call
            keys, buffers, out_addresses, inference = fast
            if len(args) == 1:  # the common case, without a loop
                arg = args[0]
                steady = isinstance(arg, torch.Tensor) and keys[0] == (
                    arg.data_ptr() if buffers is None else arg.device, arg.shape, arg.dtype
                )
            else:
                steady = len(args) == len(keys) and all(
                    isinstance(a, torch.Tensor)
                    and k == (a.data_ptr() if buffers is None or b is None else a.device, a.shape, a.dtype)
                    for a, k, b in zip(args, keys, buffers or keys)
                )
            if steady and inference == torch.is_inference_mode_enabled() and self._wanted():
                engine_args = args if buffers is None else _copy_in(args, buffers)
                outputs = self.original(*engine_args)
                if isinstance(outputs, torch.Tensor):
                    moved = len(out_addresses) != 1 or outputs.data_ptr() != out_addresses[0]
                else:
                    moved = tuple(t.data_ptr() for t in _tensors(outputs)) != out_addresses
                if moved:  # what the watch does with a move
                    assert self._last is not None
                    self._fast = None
                    self._watch(self._last[0], engine_args, outputs)
                else:
                    self.calls += 1
                    self._streak += 1
                return _copy_tensors(outputs) if self.holding else outputs
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        """Every call that is not steady: decide whether to watch, hold the outputs, stage the inputs."""
        self._fast = None
        if self.failure or self.paused or not self._wanted():
            return self._pass_through(args, kwargs)
        if self.prior is None and not self._read_prior():
            return self.original(*args, **kwargs)
        if not self.program and any(_is_number(a) for a in args):
            self._give_up("a number input (a shape input: the engine reuses kept outputs by input shapes only)")
            return self._pass_through(args, kwargs)
        signature = _signature(args, kwargs)
        if self.keep_outputs and not self._hold():
            return self.original(*args, **kwargs)
        engine_args, engine_kwargs = self._stage(args, kwargs, signature) if self.copy_inputs else (args, kwargs)
        outputs = self.original(*engine_args, **engine_kwargs)
        if self.fresh:
            self._settle()
        self._watch(signature, (*engine_args, *engine_kwargs.values()), outputs)
        if self._streak >= 3 and not kwargs and not self.fresh:
            self._fast = self._steady(args, signature)
        # kept outputs are the engine's own: the next batch is written into them
        return _copy_tensors(outputs) if self.holding else outputs

    def _steady(self, args: tuple, signature: tuple) -> tuple | None:
        """The key of a steady call (every input a tensor, the addresses settled), for the next calls to
        be checked against: their addresses (or, where inputs are copied in, shapes) and nothing more."""
        if self._last is None or len(signature) != len(args) + 1:
            return None  # a number or another non-tensor input: the full path every call
        buffers = self.buffers.get(signature) if self.copy_inputs else None
        # per input: its address, or where it is copied into a buffer its device; its shape and dtype
        keys = tuple(
            (a.data_ptr() if buffers is None or buffer is None else a.device, a.shape, a.dtype)
            for a, buffer in zip(args, buffers or args)
        )
        return keys, buffers, self._last[2], torch.is_inference_mode_enabled()

    def _pass_through(self, args: tuple, kwargs: dict) -> Any:
        self.let_go()
        return self.original(*args, **kwargs)

    def let_go(self) -> None:
        """The engines' own output setting back; the next watched call is compared with nothing before it.
        Under "graphs", the graphs are freed."""
        if self.holding:
            self._give_back()
        self.drop_graphs()
        self.forget()

    def forget(self) -> None:
        self._last, self._streak, self._fast = None, 0, None

    def _wanted(self) -> bool:
        if self._cuda and _capturing():
            return False  # an outer graph is being captured: its static buffers already hold still
        for engine in self.engines:
            if engine.get().cuda_graph_strategy == _WHOLE_GRAPH:
                return True
        return False

    def _hold(self) -> bool:
        """Have the engines keep their outputs (:meth:`_give_back` gives them their own setting back)."""
        if self.holding:
            return True
        try:
            for engine in self.engines:
                self.fresh[id(engine.obj)] = _backend.kept_output_addresses(engine.obj)
                _backend.set_output_holding(engine.obj, _FRESH)
        except Exception as err:
            self._fail(err)
            return False
        self.holding = True
        return True

    def _settle(self) -> None:
        """After a held call: each engine that made its fresh set keeps it from now on. One that did not
        run (not every engine of a program need run every call) makes its own the next time it runs."""
        try:
            for engine in self.engines:
                before = self.fresh.get(id(engine.obj))
                if before is not None and _backend.kept_output_addresses(engine.obj) != before:
                    _backend.set_output_holding(engine.obj, _HELD)
                    del self.fresh[id(engine.obj)]
        except Exception as err:
            self._fail(err)

    def _read_prior(self) -> bool:
        """Read the engines' own output setting at the first call (engines are set up by then); False if
        it cannot be read. An engine that already keeps its outputs hands every call the same tensors:
        the caller gets copies."""
        try:
            self.prior = [_backend.output_holding(e.obj) for e in self.engines]
        except Exception as err:
            self._fail(err)
            return False
        self.keep_outputs = self.keep_outputs or _HELD in self.prior
        return True

    def _fail(self, err: Exception) -> None:
        """An engine without the output setting: give up, the engines' own setting back."""
        self._give_up(f"the engine cannot keep its outputs ({type(err).__name__}: {err})")
        self._give_back()

    def _give_up(self, why: str) -> None:
        """Pass through from now on, and say why in the figures."""
        self.failure = why
        log.debug("Stable addresses off for %s: %s", type(self.module).__name__, why)

    def _give_back(self) -> None:
        self.holding = False
        self.fresh.clear()
        for engine, prior in zip(self.engines, self.prior or []):
            try:
                _backend.set_output_holding(engine.obj, prior)
            except Exception as err:
                log.debug("Could not give engine %s its output setting back: %s", engine.name, err)

    def _stage(self, args: tuple, kwargs: dict, signature: tuple) -> tuple[tuple, dict]:
        """``args`` and ``kwargs`` (a program's keyword inputs, in the signature's order) copied into the
        signature's buffers: positional inputs first, then keyword inputs by name."""
        if not signature:
            return args, kwargs
        names = sorted(kwargs)
        values = (*args, *(kwargs[name] for name in names))
        buffers = self.buffers.get(signature)
        if buffers is None:
            buffers = [torch.empty(v.shape, dtype=v.dtype, device=v.device) if _stageable(v) else None for v in values]
            self.buffers[signature] = buffers
            while len(self.buffers) > MAX_SHAPES:
                self.buffers.popitem(last=False)
        else:
            self.buffers.move_to_end(signature)
        staged = _copy_in(values, buffers)
        return staged[: len(args)], {**kwargs, **dict(zip(names, staged[len(args) :]))}

    def _watch(self, signature: tuple, engine_args: tuple, outputs: Any) -> None:
        """Compare this call's addresses with the last call's; start copying what moved."""
        inputs = tuple(a.data_ptr() for a in engine_args if isinstance(a, torch.Tensor))
        addresses = tuple(t.data_ptr() for t in _tensors(outputs))
        last, self._last = self._last, (signature, inputs, addresses)
        self.calls += 1
        self.shapes_seen.add(signature)
        if last is None or last[0] != signature:
            self.switches += last is not None
            self._streak = 1
            return
        self._streak += 1
        if inputs != last[1] and not self.copy_inputs:
            if self.program:
                self.inputs_left = True
            else:
                self.copy_inputs = True  # e.g. a caller that keeps its batches alive
                self._streak = 0
        if addresses != last[2]:
            if not self.keep_outputs:
                self.keep_outputs = True  # the caller keeps its GPU outputs (e.g. a writer storing them)
                self._streak = 0
            elif self._streak >= 3:
                # held: the first call at new shapes returns fresh outputs and allocates the ones the
                # engine keeps from the second call on; from the third call in a row, a new address
                # is a new capture
                self.moves += 1

    # --- install / uninstall ---------------------------------------------------------------------

    def install(self) -> None:
        self.module.forward = self  # an instance attribute over the class's forward, removed on uninstall

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.__dict__["forward"]
        self._give_back()
        self.buffers.clear()
        self.drop_graphs()
        self._fast = None


class _Graph:
    """One call site's CUDA graph at one input signature: its input buffers and the outputs it writes."""

    __slots__ = ("graph", "inputs", "outputs")

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: Any) -> None:
        self.graph = graph
        self.inputs = inputs
        self.outputs = outputs

    def run(self, tensors: tuple) -> Any:
        """The call's inputs copied in, the graph replayed on the current stream, the caller's own copy of
        its outputs (the next replay writes into the graph's)."""
        for buffer, tensor in zip(self.inputs, tensors):
            buffer.copy_(tensor)
        self.graph.replay()
        return _copy_tensors(self.outputs)


class StableAddresses:
    """Hold the input and output addresses of every engine in ``engines`` still (see the module docs);
    ``graphs``: capture each call site in CUDA graphs of its own instead (``$LIGHTNING_TRT_RTX_STABLE_ADDRESSES``
    ``graphs``; the engines must run without their own capture)."""

    def __init__(self, engines: Sequence[Engine], from_first_call: bool = False, graphs: bool = False) -> None:
        self.sites: list[_Site] = []
        self.from_first_call = from_first_call
        self.graphs = graphs
        self.engines = engines
        self.skipped = 0  # engines left alone (see the module docs)
        self.left: list[str] = []  # why, one entry per call site left alone (for the figures)
        by_module: dict[int, tuple[Any, list[Engine]]] = {}
        for engine in engines:
            module = engine.obj if engine.kind == "module" else _runner(engine)
            by_module.setdefault(id(module), (module, []))[1].append(engine)
        self._pending: list[tuple[torch.nn.Module, list[Engine], bool]] = []
        self._blockers: dict[tuple[int, ...], str] = {}  # by the site's engines: why they cannot be captured
        for module, group in by_module.values():
            why, inputs_kept = _why_left_alone(module, group)
            if why:
                self.skipped += len(group)
                self.left.append(f"{len(group)} engine(s) left as they are: {why}")
                log.debug("Stable addresses: %d engine(s) left as they are: %s", len(group), why)
                continue
            # ``program``: a program graph whose ops may write into its inputs: its inputs are not copied
            self._pending.append((module, group, not inputs_kept))

    @property
    def holdable(self) -> bool:
        """Whether any engine's addresses can be held (the others are left alone: see the module docs)."""
        return bool(self._pending)

    def why_not_graphed(self) -> str:
        """Why no call site can be captured in a graph of its own (``""``: one can): its inputs cannot be
        copied in (a program that may write into them), or an engine cannot be captured."""
        reasons = self._site_blockers()
        if "" in reasons:
            return ""
        blocked = [why for why in reasons if why != _PROGRAM_WRITES]
        return blocked[0] if blocked else "no call site's inputs can be copied (its program may write into them)"

    def why_not_every_engine_graphed(self) -> str:
        """Why some engine runs, or would run, outside a graph of ours (``""``: every engine's call site can
        be captured, and none has run a call outside one for its inputs or a failed capture): a site left
        alone, a program whose inputs cannot be copied, an engine that cannot be captured, or what the
        sites met while running."""
        if self.left:
            return self.left[0]
        why = next((why for why in self._site_blockers() if why), "")
        if why:
            return why
        for site in self.sites if self.graphs else ():
            if site.failure or site.unfit:
                return f"a call site ran its calls as they are: {site.failure or site.unfit}"
        return ""

    def _site_blockers(self) -> list[str]:
        """For each call site whose addresses can be held, why it cannot be captured in a graph of ours
        (``""``: it can)."""
        return [_PROGRAM_WRITES if program else self._blocker(engines) for _, engines, program in self._pending]

    def _blocker(self, engines: list[Engine]) -> str:
        """Why a call site's engines cannot be captured (``""``: they can), asked once per site."""
        key = tuple(id(e.obj) for e in engines)
        if key not in self._blockers:
            self._blockers[key] = _graph_blocker(engines)
        return self._blockers[key]

    def use_graphs(self, graphs: bool) -> None:
        """Capture call sites in graphs of their own (True) or hold addresses (False); the sites are made
        again at the next :meth:`install` where this changes."""
        if graphs != self.graphs:
            self.uninstall()
            self.graphs = graphs

    def adopt(self, engines: Sequence[Engine]) -> bool:
        """Whether ``engines`` are the ones this object holds (then it keeps this list: a re-serve)."""
        if {id(e.obj) for e in engines} != {id(e.obj) for e in self.engines}:
            return False
        self.engines = engines
        return True

    def install(self) -> None:
        if self.sites:
            return
        for module, engines, program in self._pending:
            if self.graphs and program:
                continue  # its inputs cannot be copied into a graph's buffers: left alone (see describe)
            site = _Site(module, engines, self.from_first_call, program, graphs=self.graphs)
            blocker = self._blocker(engines) if self.graphs else ""
            if blocker:
                site._give_up(blocker)  # its calls run as they are; the figures say why
            site.install()
            self.sites.append(site)

    def pause(self) -> None:
        """Between loops: calls pass through, and the engines get their own output setting back (so a
        checkpoint saved meanwhile records it)."""
        for site in self.sites:
            site.paused = True
            site.let_go()

    def resume(self) -> None:
        """At a loop's start: watch again, comparing nothing with what came before."""
        for site in self.sites:
            site.paused = False
            site.forget()

    def forget(self) -> None:
        """Compare the next call with nothing before it (e.g. after a prewarm's example inputs, which
        re-creates the engines' execution contexts: call-site graphs are freed)."""
        for site in self.sites:
            site.forget()
            site.drop_graphs()

    def drop_graphs(self) -> None:
        """Free every call site's graph (the engines' settings changed: their execution contexts are new)."""
        for site in self.sites:
            site.drop_graphs()

    def uninstall(self) -> None:
        sites, self.sites = self.sites, []
        for site in sites:
            site.uninstall()

    def describe(self) -> str:
        """For the figures: what was held still, and where engines captured again (under ``graphs``: what
        the sites' own graphs replayed)."""
        if self.graphs:
            return self._describe_graphs()
        skipped = "; ".join(self.left)
        if not self.sites:
            return f"addresses NOT held: {skipped}" if skipped else ""
        failed = [s for s in self.sites if s.failure]
        if failed:
            return f"addresses NOT held at {len(failed)} of {len(self.sites)} call sites: {failed[0].failure}"
        if not any(s.calls for s in self.sites):
            return "addresses not held: no call ran under the engines' own capture (e.g. inside a whole-module graph)"
        copying = [
            f"{what} at {n} of {len(self.sites)} call site(s)"
            for what, n in (
                ("inputs copied in", sum(s.copy_inputs for s in self.sites)),
                ("outputs kept and copied out", sum(s.keep_outputs for s in self.sites)),
            )
            if n
        ]
        how = ", ".join(copying) + (" from the first call" if self.from_first_call else " once they had moved")
        parts = [
            f"stable addresses: {len(self.sites)} call site(s), {max(len(s.shapes_seen) for s in self.sites)} shape(s),"
            f" {how if copying else 'nothing to copy (the addresses did not move)'}"
        ]
        switches = sum(s.switches for s in self.sites)
        moves = sum(s.moves for s in self.sites)
        if switches:
            parts.append(f"{switches} shape switch(es), each a new capture")
        if moves:
            parts.append(f"outputs moved {moves} time(s), each a new capture")
        left = sum(s.inputs_left for s in self.sites)
        if left:
            parts.append(f"a loaded program's inputs moved at {left} call site(s): not copied, each a new capture")
        if skipped:
            parts.append(skipped)
        return "; ".join(parts)


    def _describe_graphs(self) -> str:
        left = list(self.left)
        programs = sum(len(engines) for _, engines, program in self._pending if program)
        if programs:
            left.append(
                f"{programs} engine(s) left as they are: their program may write into its inputs (a graph's"
                " input buffers would hide the write)"
            )
        skipped = "; ".join(left)
        if not self.sites:
            return f"call-site graphs NOT captured: {skipped}" if skipped else ""
        failed = [s for s in self.sites if s.failure]
        calls = sum(s.replays + s.eager for s in self.sites)
        parts = [
            f"call-site graphs: {len(self.sites)} call site(s), {sum(s.captures for s in self.sites)} capture(s),"
            f" {sum(s.replays for s in self.sites)} of {calls} call(s) replayed"
        ]
        if failed:
            parts.append(f"NOT captured at {len(failed)} call site(s): {failed[0].failure}")
        if skipped:
            parts.append(skipped)
        return "; ".join(parts)


def _runner(engine: Engine) -> Any:
    """The module whose forward runs a bare engine: the program graph that reads it (see
    :class:`~lightning_trt_rtx.engines.Engine`), else the module holding it."""
    return engine.runner if engine.runner is not None else engine.owner


def _why_left_alone(module: Any, engines: list[Engine]) -> tuple[str, bool]:
    """Why the engines a call site runs are left as they are (``""``: they are held), and whether its
    inputs may be copied (a compiled module, or a program graph that provably writes into no input)."""
    aliased = [_aliases_io(e) for e in engines]
    if any(aliased):  # an aliased output writes through its input: a staged copy (or a kept output) would hide it
        return "they write an output through an input (aliased I/O, e.g. a KV cache)", False
    if any(a is None for a in aliased):
        return "their I/O could not be read (aliased or not)", False
    if engines[0].kind == "module":
        return "", True
    if not isinstance(module, torch.fx.GraphModule):
        return "a module of your own runs them (it may run one more than once per call)", False
    if not _runs_each_once(module, engines):
        return "their program runs one more than once per call (an engine keeps one set of outputs)", False
    written = _inputs_written(module)
    if written:
        name, op = written[0]
        return (
            f"their program writes into its input {name!r} ({op}): a copy of the input would hide the write",
            False,
        )
    return "", written is not None


def _inputs_written(graph_module: Any) -> list[tuple[str, str]] | None:
    """The inputs a program graph writes into, as ``(input, op)``; None when it cannot be told.

    An exported graph's ops are ATen operators whose schemas mark the arguments they write
    (``Tensor(a!)``): in the default (training) IR an in-place op on the input itself, in the
    functional IR the ``copy_`` that ``ExportedProgram.module()`` adds for every input the signature
    records in ``user_inputs_to_mutate`` (also read by :func:`~lightning_trt_rtx.load_program`). A
    write into a view of an input is traced back to the input. Any node whose effect cannot be read
    (a Python call, a higher-order op, a submodule other than torch.export's input guards) leaves the
    question open.
    """
    graph = getattr(graph_module, "graph", None)
    if graph is None:
        return None
    recorded = getattr(graph_module, "meta", {}).get(_backend.PROGRAM_INPUTS_MUTATED, ())
    written: list[tuple[str, str]] = [(name, "user_inputs_to_mutate") for name in recorded]
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op == "call_module":
            if type(graph_module.get_submodule(node.target)).__name__ == "GuardsFn":
                continue  # torch.export's input-shape guards: it reads its inputs only
            return None
        if node.op != "call_function":
            return None
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            if node.target in _PURE_CALLS:
                continue
            return None
        for index, argument in enumerate(schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.kwargs.get(argument.name) if index >= len(node.args) else node.args[index]
            for target in value if isinstance(value, (list, tuple)) else (value,):
                source = _aliased_source(target)
                if source is not None and source.op == "placeholder":
                    written.append((str(source.target), str(node.target)))
    return written


def _aliased_source(node: Any) -> Any:
    """The node whose memory ``node`` is (through views, in-place results and ``getitem`` of them)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if node.target is operator.getitem:
            parent = node.args[0]
            parent_schema = getattr(getattr(parent, "target", None), "_schema", None)
            if parent_schema is None or not parent_schema.returns or parent_schema.returns[0].alias_info is None:
                return node  # an item of a fresh result
            node = parent
            continue
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            return node  # a fresh tensor
        aliased = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None]
        if not aliased or aliased[0] >= len(node.args):
            return node
        node = node.args[aliased[0]]
    return node if isinstance(node, torch.fx.Node) else None


# Python calls in exported graphs that write nothing (arithmetic on sizes, tuple items)
_PURE_CALLS = frozenset(
    (operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
     operator.pow, operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
     torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_sum)  # fmt: skip
)


def _runs_each_once(module: Any, engines: list[Engine]) -> bool:
    """Whether ``module`` is a program graph that runs each of ``engines`` once per call (an engine's
    kept outputs are one set: run twice in a forward, its second result would overwrite its first)."""
    if not isinstance(module, torch.fx.GraphModule):
        return False  # a module of the user's own: its Python may run an engine any number of times
    uses = {id(e.obj): 0 for e in engines}
    for node in module.graph.nodes:
        if node.op == "get_attr":
            try:
                value = functools.reduce(getattr, node.target.split("."), module)
            except AttributeError:
                return False
            if id(value) in uses:
                uses[id(value)] += len(node.users)
    return all(n == 1 for n in uses.values())


def _aliases_io(engine: Engine) -> bool | None:
    """Whether the engine writes an output through an input's storage (None: cannot tell)."""
    if engine.kind == "module":
        return bool(getattr(engine.obj, "aliased_io", None))
    return _backend.bare_engine_aliases_io(engine.obj)


def _stageable(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a set of input buffers fits: each tensor's position (or keyword), shape, dtype and device,
    and whether inference mode is on (an inference-mode buffer cannot be written outside it)."""
    staged = tuple((i, tuple(a.shape), a.dtype, a.device) for i, a in enumerate(args) if _stageable(a))
    if kwargs:
        staged += tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(kwargs.items()) if _stageable(v))
    return (torch.is_inference_mode_enabled(), *staged) if staged else ()


def _copy_in(args: tuple, buffers: list[torch.Tensor | None]) -> tuple:
    """``args`` copied into their input buffers (None: passed as they are)."""
    for arg, buffer in zip(args, buffers):
        if buffer is not None and arg is not buffer:
            if arg.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                arg = arg.clone()  # another view of the buffer itself: a copy may not overlap
            buffer.copy_(arg)
    return tuple(arg if buffer is None else buffer for arg, buffer in zip(args, buffers))


# whether the current stream is capturing a CUDA graph (torch.cuda.is_current_stream_capturing, without
# its Python wrapper: every held call asks)
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)


def why_no_site_graphs() -> str:
    """Why call sites cannot be captured in graphs of their own here (``""``: they can)."""
    return "" if torch.cuda.is_available() else "CUDA graphs need a CUDA device"


def _side_stream(device: torch.device | None) -> Any:
    """A stream to capture on (a capture cannot run on the legacy default stream)."""
    return torch.cuda.Stream(device)


def _graph_blocker(engines: Sequence[Engine]) -> str:
    """Why one of ``engines`` cannot be captured in a CUDA graph of ours (``""``: none)."""
    why = why_no_site_graphs()
    if why:
        return why
    try:
        stream = _side_stream(None)
        for engine in engines:
            why = _backend.graph_capture_blocker(engine.obj, stream)
            if why:
                return f"engine {engine.name}: {why}"
    except Exception as err:
        return f"whether its engines can be captured could not be read ({type(err).__name__}: {err})"
    return ""


def _capture_call(call: Any, stream: Any) -> tuple[Any, Any]:
    """``call()`` captured in a new CUDA graph on ``stream`` (not run): the graph, and the outputs its
    replays write. Thread-local capture: an uploads thread's CUDA calls on its own stream do not break it.
    Not ``torch.cuda.graph``: a capture that fails there leaves the caller on the capture stream (its exit
    ends the capture before it gives the stream back, and that raises); here the stream is always given
    back, and the call's own error is the one raised."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()  # nothing queued before the capture runs into it
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            outputs = call()
        except BaseException:
            with contextlib.suppress(Exception):
                graph.capture_end()  # ends the invalidated capture; the call's error is the one that matters
            raise
        graph.capture_end()
    return graph, outputs


def _is_number(value: Any) -> bool:
    return isinstance(value, (numbers.Number, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def _tensors(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in ``outputs``, at any depth (a loaded program rebuilds dicts and nested tuples)."""
    if isinstance(outputs, torch.Tensor):  # the common case, without pytree's cost on every call
        return [outputs]
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _copy_tensors(outputs: Any) -> Any:
    """The caller's own copy of every tensor, at any depth: the engine writes the next batch into the
    tensors it keeps."""
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    return pytree.tree_map_only(torch.Tensor, torch.clone, outputs)
