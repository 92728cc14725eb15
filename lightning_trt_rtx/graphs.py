"""CUDA-graph scopes: ``torch_tensorrt.runtime.enable_cudagraphs`` around a module's compiled parts.

``enable_cudagraphs(m)`` returns the module to call: ``m`` itself (no graph breaks; engines capture
themselves) or a new whole-module wrapper (graph breaks: PyTorch ops between engines). Calls must go
through what it returns, so the attribute holding ``m`` is swapped for the scope and put back after.

**One process-global mode, two kinds of target.** Which graph runs is decided at call time by
torch_tensorrt's process-global CUDA-graphs mode: the engines capture themselves only in the
"subgraph" mode (they read it at every execute), the wrapper captures only in the "whole-graph"
mode (its ``forward`` reads ``get_whole_cudagraphs_mode()``, and runs the module plainly otherwise).
Each ``enable_cudagraphs`` scope sets the mode its target needs, so with several targets the last
one opened would switch the others' graphs off. Here, once every scope is open, the process-wide
mode is "subgraph" when any target runs its engines' own graphs (else "whole-graph"), and each
wrapper's ``forward`` runs with the "whole-graph" mode for the duration of its call (its engines then
leave the capture to it), so every target's graph runs. What ran is read at each target's first call
in the loop (the mode it saw, and whether the wrapper captured a graph): :meth:`GraphScopes.describe`.

Under ``cuda_graph_strategy="whole_graph_capture"`` a wrapped module's engines would try to capture
themselves inside the wrapper's capture, which CUDA refuses (cudaErrorStreamCaptureInvalidated,
measured on H100). Their own capture is turned off for the scope and given back after: the outer
graph already holds their launches.

Opening is all-or-nothing: if any target fails, the scopes already opened are closed, the
attributes put back and torch_tensorrt's process-global CUDA-graphs mode restored::

    scopes = GraphScopes(model, targets=None, settings=settings, cache_handle=handle)
    scopes.open()
    try:
        ...  # model.<compiled attribute>(x) now replays CUDA graphs
    finally:
        scopes.close()
    scopes.describe()  # "backbone: whole-module graph; head: engine graphs", as seen during the loop
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from lightning_trt_rtx import _backend
from lightning_trt_rtx._messages import warn
from lightning_trt_rtx.engines import EngineBinding, find_engines
from lightning_trt_rtx.settings import TRTSettings

log = logging.getLogger(__name__)


def check_targets(targets: Any) -> list[str] | None:
    """``targets`` as a list of attribute names, or None (every compiled attribute); TypeError or ValueError
    saying what is valid for anything else (a bare string, non-identifiers, an empty list)."""
    if targets is None:
        return None
    if not isinstance(targets, (str, bytes)) and isinstance(targets, Iterable):
        targets = list(targets)  # an iterator would be consumed by the check below
    if not isinstance(targets, list) or not all(isinstance(t, str) and t.isidentifier() for t in targets):
        raise TypeError(f"targets must be a list of attribute names (identifiers) or None; got {targets!r}.")
    if not targets:
        raise ValueError("targets is empty: name the attributes to capture, or pass None for every compiled one.")
    return targets


def compiled_attributes(module: torch.nn.Module) -> list[str]:
    """Attributes of ``module`` that hold compiled models: children with engines, or mutable modules."""
    names = [name for name, child in module.named_children() if find_engines(child)]
    names += [name for name, value in vars(module).items() if _backend.is_mutable_module(value)]
    return names


class GraphScopes:
    """One loop's CUDA-graph scopes over ``targets`` (default: every compiled attribute of ``module``)."""

    def __init__(
        self,
        module: torch.nn.Module,
        targets: Sequence[str] | None = None,
        settings: TRTSettings | None = None,
        cache_handle: Any = None,
        rank: int = 0,
    ) -> None:
        self.module = module
        self.targets = check_targets(targets)
        self.settings = settings
        self.cache_handle = cache_handle
        self.rank = rank
        self.modes: dict[str, str] = {}  # target -> how it was opened to be captured
        self.ran: dict[str, str] = {}  # target -> what ran at its first call in the loop (see describe)
        self._stack: ExitStack | None = None

    @property
    def is_open(self) -> bool:
        return self._stack is not None

    def _strategy(self) -> str | None:
        if self.settings is None or self.settings.cuda_graph_strategy == "disabled":
            return None
        if not _backend.is_rtx_build():
            warn(
                "cuda_graph_strategy needs a TensorRT-RTX build; capturing CUDA graphs without it.",
                rank=self.rank,
                rank_zero=True,
                once=True,
            )
            return None
        return self.settings.cuda_graph_strategy

    def open(self) -> None:
        """Enter every target's scope, or none of them (then re-raise)."""
        if self._stack is not None:
            return
        targets = self.targets or compiled_attributes(self.module)
        strategy = self._strategy()
        mode = _backend.cudagraphs_mode()
        stack = ExitStack()
        stack.callback(_backend.restore_cudagraphs_mode, mode)  # last out: the mode before any scope
        self.modes.clear()
        self.ran.clear()
        try:
            wrappers = [self._open_one(stack, name, strategy) for name in targets]
            # the mode the engines of targets without a wrapper read at every execute (and the one the
            # wrappers need, when every target has one); each wrapper sets its own for its calls
            if wrappers:
                own = any(w is None for w in wrappers)
                _backend.restore_cudagraphs_mode(_backend.SUBGRAPH if own else _backend.WHOLE_GRAPH)
            for name, wrapper in zip(targets, wrappers):
                if wrapper is None:
                    self._watch_engine_graphs(stack, name)
                else:
                    self._whole_mode_for_calls(stack, name, wrapper)
        except BaseException:
            stack.close()
            _backend.restore_cudagraphs_mode(mode)  # a scope that failed half-way never exits
            self.modes.clear()
            raise
        self._stack = stack

    def _open_one(self, stack: ExitStack, name: str, strategy: str | None) -> torch.nn.Module | None:
        """Enter ``name``'s scope; returns its whole-module wrapper (None: its engines capture themselves)."""
        module = self.module
        original = getattr(module, name, None)
        if not isinstance(original, torch.nn.Module):
            what = "no attribute" if original is None else f"a {type(original).__name__}, not a module, as attribute"
            raise AttributeError(
                f"{type(module).__name__} has {what} {name!r} to capture in CUDA graphs."
                f" Compiled attributes found: {compiled_attributes(module)}."
            )
        inner_strategy = strategy
        if strategy is not None and _backend.has_graph_breaks(original):
            # the wrapper captures the whole module: its engines must not capture themselves inside it
            assert self.settings is not None
            own_capture_off = EngineBinding(original)
            own_capture_off.apply(
                self.settings.to_runtime_settings(self.cache_handle, cuda_graph_strategy="disabled")
            )
            stack.callback(own_capture_off.restore)
            inner_strategy = None
        entered = stack.enter_context(_backend.enable_cudagraphs(original, inner_strategy))
        wrapper: torch.nn.Module | None = None
        if entered is not original:
            setattr(module, name, entered)
            stack.callback(setattr, module, name, original)
            wrapper = entered
        elif _backend.is_mutable_module(original) and _backend.is_whole_module_graph(original.gm):
            wrapper = original.gm  # upstream swapped the mutable module's .gm for the scope
        if wrapper is not None:
            self.modes[name] = "whole-module graph" + (" (engines' own capture off)" if strategy else "")
        else:
            self.modes[name] = f"engine graphs ({strategy})" if strategy else "engine graphs"
        log.debug("CUDA graphs for %s: %s", name, self.modes[name])
        return wrapper

    def _whole_mode_for_calls(self, stack: ExitStack, name: str, wrapper: torch.nn.Module) -> None:
        """Run ``wrapper``'s forward with the whole-graph mode on, whatever the process-wide mode."""
        call = _WholeModuleCall(wrapper, lambda why: self._saw(name, why or self.modes[name]))
        wrapper.forward = call  # an instance attribute over the class's forward; the wrapper is the scope's own
        stack.callback(vars(wrapper).pop, "forward", None)

    def _watch_engine_graphs(self, stack: ExitStack, name: str) -> None:
        """Read the mode the target's engines see at its first call (a hook that then removes itself)."""
        target = getattr(self.module, name)
        if not isinstance(target, torch.nn.Module):
            return

        def first_call(*_: Any) -> None:
            handle.remove()
            mode = _backend.engine_cudagraphs_mode()
            if mode == _backend.SUBGRAPH:
                self._saw(name, self.modes[name])
            else:
                self._saw(name, f"no graph (torch_tensorrt's CUDA-graphs mode was {_mode_name(mode)} at its call)")

        handle = target.register_forward_pre_hook(first_call)
        stack.callback(handle.remove)

    def _saw(self, name: str, what: str) -> None:
        self.ran.setdefault(name, what)
        log.debug("CUDA graphs for %s, at its first call: %s", name, what)

    def describe(self) -> str:
        """For the figures: what each target ran at its first call in the loop (read then, not what was
        asked), e.g. ``"backbone: whole-module graph (engines' own capture off); head: engine graphs"``."""
        return "; ".join(f"{name}: {self.ran.get(name, 'not called')}" for name in self.modes)

    def close(self) -> None:
        """Leave the scopes (innermost first), putting the attributes and engine settings back."""
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        try:
            stack.close()
        except Exception as err:
            warn(f"Closing the CUDA-graphs scope failed: {err}", rank=self.rank)


class _WholeModuleCall:
    """A whole-module wrapper's forward, run with torch_tensorrt's whole-graph mode on for the call
    (upstream's forward reads it, and runs the module without a graph when it is off); the mode the
    call found is put back after it, also when it raises. ``first`` hears, once, why the first call
    ran no graph (None: it ran the wrapper's graph)."""

    def __init__(self, wrapper: torch.nn.Module, first: Any) -> None:
        self.wrapper = wrapper
        self.forward = wrapper.forward
        self.first = first

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        before = _backend.cudagraphs_mode()
        if before != _backend.WHOLE_GRAPH:
            _backend.restore_cudagraphs_mode(_backend.WHOLE_GRAPH)
        try:
            whole = _backend.cudagraphs_mode() == _backend.WHOLE_GRAPH  # what upstream's forward reads
            outputs = self.forward(*args, **kwargs)
        finally:
            if before != _backend.WHOLE_GRAPH:
                _backend.restore_cudagraphs_mode(before)
        if self.first is not None:
            first, self.first = self.first, None
            if not whole:
                mode = _mode_name(_backend.cudagraphs_mode())
                first(f"no graph (torch_tensorrt's CUDA-graphs mode was {mode} at its call)")
            elif getattr(self.wrapper, "cudagraph", None) is None:  # upstream's captured graph
                first("no graph (the wrapper captured none)")
            else:
                first(None)
        return outputs


def _mode_name(mode: int) -> str:
    return _backend.CUDAGRAPHS_MODE_NAMES.get(mode, str(mode))
