"""Stable input and output addresses for engines under ``cuda_graph_strategy="whole_graph_capture"``.

TensorRT-RTX replays an engine's captured CUDA graph only while the engine's input and output
addresses stay the same; when they move it captures again, which costs more than not capturing at
all. torch-tensorrt binds the caller's input tensor and a freshly allocated output on every call, so
inside ``Trainer.predict`` the addresses depend on what the caching allocator hands back (measured
on a bare engine on H100, 32x256 MLP: 76 µs per call at fixed addresses, 369-505 µs when they move,
455 µs without graphs; what this module costs on top, two copies per call, is the graphs benchmark's
to say). It holds them still, per call site (a ``TorchTensorRTModule``, or the module whose
attributes hold a loaded program's bare engines):

* **inputs** (positional tensors) are copied into buffers allocated once per shape signature
  (shapes, dtypes, devices of the call's tensors), at most :data:`MAX_SHAPES` signatures per site,
  least recently used dropped;
* **outputs** stay in the engine's own buffers (torch-tensorrt's ``use_pre_allocated_outputs``, with
  the outputs owned by the engine: it reuses them while the input shapes stay the same), and the
  caller gets a copy, so a prediction Lightning keeps is never overwritten by a later batch.

Staging applies only while the site's engines hold ``whole_graph_capture`` and no CUDA-graph capture
is running around them (inside :class:`~lightning_trt_rtx.graphs.GraphScopes`' whole-module graph
the engines' own capture is off and the outer graph already holds its buffers): otherwise calls pass
straight through. Each site watches its outputs: an output address that moves between two calls at
the same shapes means the engine captured again, and so does a change of shapes (the engine keeps
one set of outputs and allocates new ones for new shapes); :meth:`StableAddresses.describe` counts
both. Engines that alias an output to an input (or whose I/O cannot be read) are left alone::

    stable = StableAddresses(find_engines(model))
    stable.install()
    try:
        ...                       # model(x): engines replay their graphs from about the third call at a shape
    finally:
        stable.uninstall()        # forwards and the engines' output setting put back
"""

from __future__ import annotations

import logging
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
# "0": leave the addresses to torch-tensorrt (whole-graph capture as upstream does it): the escape
# hatch, and the baseline the graphs benchmark compares against
ENABLED_ENV = "LIGHTNING_TRT_RTX_STABLE_ADDRESSES"


def enabled() -> bool:
    """Whether sessions hold addresses still under whole-graph capture (unless ``$ENABLED_ENV=0``)."""
    return os.environ.get(ENABLED_ENV, "1") != "0"


class _Site:
    """One call site: ``module.forward`` wrapped, the engines it runs, the buffers and what was seen."""

    def __init__(self, module: torch.nn.Module, engines: list[Engine]) -> None:
        self.module = module
        self.engines = engines
        self.original = module.forward
        self.buffers: OrderedDict[tuple, list[torch.Tensor | None]] = OrderedDict()
        self.holding = False  # whether the engines keep their outputs (see _backend.set_output_holding)
        self.prior: list[tuple[bool, bool]] | None = None  # read when first held: engines are set up by then
        self.failure = ""  # why this site passes through for good (the figures show it)
        self.staged_calls = 0
        self.moves = 0  # outputs at a new address between two steady calls at the same shapes
        self._last: tuple[tuple, tuple[int, ...]] | None = None  # (signature, output addresses)
        self._streak = 0  # calls in a row at the last signature
        self.shapes_seen: set[tuple] = set()
        self.switches = 0  # staged calls at other shapes than the call before: the engine re-allocates its outputs
        self._cuda = torch.cuda.is_available()  # asking whether a capture runs needs a driver

    # --- the wrapped forward ---------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failure or not self._wanted():
            self._hold(False)
            return self.original(*args, **kwargs)
        if not self._hold(True):
            return self.original(*args, **kwargs)
        signature = _signature(args)
        outputs = self.original(*self._stage(args, signature), **kwargs)
        self.staged_calls += 1
        self._watch(signature, outputs)
        return _copy_tensors(outputs)

    def _wanted(self) -> bool:
        if self._cuda and torch.cuda.is_current_stream_capturing():
            return False  # an outer graph is being captured: its static buffers already hold still
        return any(e.get().cuda_graph_strategy == _WHOLE_GRAPH for e in self.engines)

    def _hold(self, on: bool) -> bool:
        """Have the engines keep their outputs (``on``) or give them their own setting back."""
        if self.holding == on:
            return True
        try:
            if on:
                self.prior = self.prior or [_backend.output_holding(e.obj) for e in self.engines]
                for engine in self.engines:
                    _backend.set_output_holding(engine.obj, _HELD)
            else:
                self._give_back()
        except Exception as err:  # an engine without the setting: pass through from now on, and say so
            self.failure = f"the engine cannot keep its outputs ({type(err).__name__}: {err})"
            log.debug("Stable addresses off for %s: %s", type(self.module).__name__, self.failure)
            self._give_back()
            return False
        self.holding = on
        return True

    def _give_back(self) -> None:
        self.holding = False
        for engine, prior in zip(self.engines, self.prior or []):
            try:
                _backend.set_output_holding(engine.obj, prior)
            except Exception as err:
                log.debug("Could not give engine %s its output setting back: %s", engine.name, err)

    def _stage(self, args: tuple, signature: tuple) -> tuple:
        if not signature:
            return args
        buffers = self.buffers.get(signature)
        if buffers is None:
            buffers = [torch.empty(a.shape, dtype=a.dtype, device=a.device) if _stageable(a) else None for a in args]
            self.buffers[signature] = buffers
            while len(self.buffers) > MAX_SHAPES:
                self.buffers.popitem(last=False)
        else:
            self.buffers.move_to_end(signature)
        for arg, buffer in zip(args, buffers):
            if buffer is not None and arg is not buffer:
                if arg.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                    arg = arg.clone()  # another view of the buffer itself: a copy may not overlap
                buffer.copy_(arg)
        return tuple(arg if buffer is None else buffer for arg, buffer in zip(args, buffers))

    def _watch(self, signature: tuple, outputs: Any) -> None:
        addresses = tuple(t.data_ptr() for t in _tensors(outputs))
        last, self._last = self._last, (signature, addresses)
        self._streak = self._streak + 1 if last is not None and last[0] == signature else 1
        self.shapes_seen.add(signature)
        if last is not None and last[0] != signature:
            self.switches += 1
        # the first call at new shapes returns fresh outputs and allocates the ones the engine keeps
        # from the second call on: from the third call in a row, a new address is a new capture
        if self._streak >= 3 and last is not None and last[1] != addresses:
            self.moves += 1

    # --- install / uninstall ---------------------------------------------------------------------

    def install(self) -> None:
        self.module.forward = self  # an instance attribute over the class's forward, removed on uninstall

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.__dict__["forward"]
        self._give_back()
        self.buffers.clear()


class StableAddresses:
    """Hold the input and output addresses of every engine in ``engines`` still (see the module docs)."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self.sites: list[_Site] = []
        self.engines = engines
        self.skipped = 0  # engines left alone: aliased I/O, or not known not to be
        by_module: dict[int, tuple[torch.nn.Module, list[Engine]]] = {}
        for engine in engines:
            module = engine.obj if engine.kind == "module" else engine.owner
            if not isinstance(module, torch.nn.Module) or _aliases_io(engine) is not False:
                self.skipped += 1  # aliased outputs write through their input: a staged copy would hide the write
                continue
            by_module.setdefault(id(module), (module, []))[1].append(engine)
        self._pending = list(by_module.values())

    def adopt(self, engines: Sequence[Engine]) -> bool:
        """Whether ``engines`` are the ones this object holds (then it keeps this list: a re-serve)."""
        if {id(e.obj) for e in engines} != {id(e.obj) for e in self.engines}:
            return False
        self.engines = engines
        return True

    def install(self) -> None:
        if self.sites:
            return
        for module, engines in self._pending:
            site = _Site(module, engines)
            site.install()
            self.sites.append(site)

    def uninstall(self) -> None:
        sites, self.sites = self.sites, []
        for site in sites:
            site.uninstall()

    def describe(self) -> str:
        """For the figures: what was held still, and where engines captured again."""
        skipped = f"{self.skipped} engine(s) left as they are (aliased or unreadable I/O)" if self.skipped else ""
        if not self.sites:
            return f"addresses NOT held: {skipped}" if skipped else ""
        failed = [s for s in self.sites if s.failure]
        if failed:
            return f"addresses NOT held at {len(failed)} of {len(self.sites)} call sites: {failed[0].failure}"
        if not any(s.staged_calls for s in self.sites):
            return "addresses not held: no call ran under the engines' own capture (e.g. inside a whole-module graph)"
        parts = [
            f"stable addresses: {len(self.sites)} call site(s),"
            f" {max(len(s.shapes_seen) for s in self.sites)} shape(s)"
        ]
        switches = sum(s.switches for s in self.sites)
        moves = sum(s.moves for s in self.sites)
        if switches:
            parts.append(f"{switches} shape switch(es), each a new capture")
        if moves:
            parts.append(f"outputs moved {moves} time(s), each a new capture")
        if skipped:
            parts.append(skipped)
        return "; ".join(parts)


def _aliases_io(engine: Engine) -> bool | None:
    """Whether the engine writes an output through an input's storage (None: cannot tell)."""
    if engine.kind == "module":
        return bool(getattr(engine.obj, "aliased_io", None))
    return _backend.bare_engine_aliases_io(engine.obj)


def _stageable(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _signature(args: tuple) -> tuple:
    """What a set of input buffers fits: each tensor's position, shape, dtype and device, and whether
    inference mode is on (an inference-mode buffer cannot be written outside it)."""
    staged = tuple((i, tuple(a.shape), a.dtype, a.device) for i, a in enumerate(args) if _stageable(a))
    return (torch.is_inference_mode_enabled(), *staged) if staged else ()


def _tensors(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in ``outputs``, at any depth (a loaded program rebuilds dicts and nested tuples)."""
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def _copy_tensors(outputs: Any) -> Any:
    """The caller's own copy of every tensor, at any depth: the engine writes the next batch into the
    tensors it keeps."""
    return pytree.tree_map_only(torch.Tensor, torch.clone, outputs)
