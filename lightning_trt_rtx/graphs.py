"""CUDA-graph scopes: ``torch_tensorrt.runtime.enable_cudagraphs`` around a module's compiled parts.

``enable_cudagraphs(m)`` returns the module to call: ``m`` itself (no graph breaks; engines capture
themselves) or a new whole-module wrapper (graph breaks: PyTorch ops between engines). Calls must go
through what it returns, so the attribute holding ``m`` is swapped for the scope and put back after.

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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch

from lightning_trt_rtx import _backend
from lightning_trt_rtx._messages import warn
from lightning_trt_rtx.engines import EngineBinding, find_engines
from lightning_trt_rtx.settings import TRTSettings

log = logging.getLogger(__name__)


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
        self.targets = list(targets) if targets else None
        self.settings = settings
        self.cache_handle = cache_handle
        self.rank = rank
        self.modes: dict[str, str] = {}  # target -> how it is captured, for the figures
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
        try:
            for name in targets:
                self._open_one(stack, name, strategy)
        except BaseException:
            stack.close()
            _backend.restore_cudagraphs_mode(mode)  # a scope that failed half-way never exits
            self.modes.clear()
            raise
        self._stack = stack

    def _open_one(self, stack: ExitStack, name: str, strategy: str | None) -> None:
        module = self.module
        original = getattr(module, name, None)
        if original is None:
            raise AttributeError(
                f"{type(module).__name__} has no attribute {name!r} to capture in CUDA graphs."
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
        if entered is not original:
            setattr(module, name, entered)
            stack.callback(setattr, module, name, original)
            self.modes[name] = "whole-module graph" + (" (engines' own capture off)" if strategy else "")
        else:
            self.modes[name] = f"engine graphs ({strategy})" if strategy else "engine graphs"
        log.debug("CUDA graphs for %s: %s", name, self.modes[name])

    def close(self) -> None:
        """Leave the scopes (innermost first), putting the attributes and engine settings back."""
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        try:
            stack.close()
        except Exception as err:
            warn(f"Closing the CUDA-graphs scope failed: {err}", rank=self.rank)
