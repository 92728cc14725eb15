"""One serving session per LightningModule: settings + shared cache handle + engines + graphs + figures.

The callbacks and the precision plugin all drive the session of the module they serve, so using
several of them in one Trainer applies settings once, opens CUDA-graph scopes inside the settings
(whatever order the callbacks are listed in) and saves the cache once.
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from contextlib import ExitStack
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_trt_rtx import _backend, cache
from lightning_trt_rtx.engines import EngineBinding, find_engines
from lightning_trt_rtx.report import RankFigures
from lightning_trt_rtx.settings import TRTSettings

log = logging.getLogger(__name__)

_sessions: "weakref.WeakKeyDictionary[torch.nn.Module, ServingSession]" = weakref.WeakKeyDictionary()


class ServingSession:
    """Everything one module's serving needs, opened by :meth:`attach` and closed by :meth:`close`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = weakref.ref(module)
        self.settings: Optional[TRTSettings] = None
        self._owners: set[str] = set()
        self.graph_targets: Optional[Sequence[str]] = None
        self.graphs_requested = False
        self.binding: Optional[EngineBinding] = None
        self.shared_cache: Optional[cache.SharedCache] = None
        self.figures = RankFigures()
        self._graphs: Optional[ExitStack] = None
        self._warned_no_engines = False
        self._trainer: Optional["weakref.ref[Any]"] = None
        self._batch_start = 0.0
        self._first_batch_end = 0.0

    @classmethod
    def of(cls, module: torch.nn.Module) -> "ServingSession":
        """The session of ``module``, created on first use."""
        if module not in _sessions:
            _sessions[module] = cls(module)
        return _sessions[module]

    @property
    def active(self) -> bool:
        return self.binding is not None

    def configure(self, settings: TRTSettings, owner: str, trainer: Any = None) -> None:
        """Register who serves this module with which settings; two owners must agree."""
        self._remember(trainer)
        if self.settings is not None and settings != self.settings and owner not in self._owners:
            raise ValueError(
                f"{owner} and {', '.join(sorted(self._owners))} configure different TensorRT-RTX settings for the same"
                f" model ({settings} vs {self.settings}). Configure the settings in one place: either the"
                " TRTRuntimeSettings callback or the TRTRuntimePrecision plugin."
            )
        self.settings = settings
        self._owners.add(owner)

    def request_graphs(self, targets: Optional[Sequence[str]], trainer: Any = None) -> None:
        self._remember(trainer)
        self.graphs_requested, self.graph_targets = True, targets

    def _remember(self, trainer: Any) -> None:
        if trainer is not None and trainer is not self.trainer:
            # a new Trainer serving a module served before: none of the last one's configuration
            # (owners, settings, graphs request) carries over, whichever of its hooks runs first
            self._owners.clear()
            self.settings = None
            self.graphs_requested, self.graph_targets = False, None
            self._trainer = weakref.ref(trainer)

    @property
    def trainer(self) -> Any:
        return self._trainer() if self._trainer is not None else None

    # --- opening -----------------------------------------------------------------------------

    def attach(self, warn_if_none: bool = True) -> int:
        """Apply the settings (and the shared cache) to every engine now under the module.

        Idempotent and cheap when nothing changed: call it at every point where engines may have
        appeared or been reset (setup, after a checkpoint restore, at loop start).
        ``warn_if_none=False`` where engines may still appear later (``configure_model`` runs after
        ``Callback.setup``). Returns the number of engines served.
        """
        module = self._module()
        if module is None or self.settings is None:
            return 0
        engines = find_engines(module)
        if not engines:
            if warn_if_none and not self._warned_no_engines:
                self._warned_no_engines = True
                rank_zero_warn(
                    f"No TensorRT engines found under {type(module).__name__}: the TensorRT-RTX runtime settings"
                    " change nothing. Compile the model with torch_tensorrt (or load a compiled program) in"
                    " __init__, setup or configure_model."
                )
            return 0
        if not _backend.is_rtx_build():
            rank_zero_warn(
                f"torch-tensorrt {_backend.installed_version()} is not a TensorRT-RTX build: cuda_graph_strategy,"
                " dynamic_shapes_kernel_specialization_strategy and runtime_cache are no-ops there. The job runs"
                f" with standard TensorRT. For the runtime settings: `{_backend.INSTALL_HINT}`."
            )
            self.figures.engines = len(engines)
            return len(engines)
        if self.binding is None:
            self.binding = EngineBinding(module)
            self.figures = RankFigures(rank=_ranks(self.trainer).get("rank", 0))
            self._open_cache()
        handle = self.shared_cache.handle if self.shared_cache is not None else None
        self.binding.apply(self.settings.to_runtime_settings(handle))
        self.figures.engines = len(self.binding.engines)
        return self.figures.engines

    def _open_cache(self) -> None:
        template = self.settings.runtime_cache
        self.shared_cache = None
        if template is None:
            return
        placement = cache.Placement.current(**_ranks(self.trainer))
        if placement.world_size > 1 and not cache.is_per_rank(template):
            rank_zero_warn(
                f"All {placement.world_size} ranks share the kernel cache file {template!r}: the last writer wins"
                " and kernels the other ranks compiled are lost. Give each rank its own file with a template"
                f" that names {{rank}}, e.g. the default {cache.default_template()!r}."
            )
        self.shared_cache = cache.open_shared(template, placement)
        stats = self.shared_cache.stats
        self.figures.cache_path, self.figures.cache_source = stats.path, stats.source
        self.figures.cache_bytes = stats.load_bytes

    def refresh(self) -> None:
        """Per-batch: re-apply only if a MutableTorchTensorRTModule recompiled (an identity check)."""
        if self.binding is not None:
            self.binding.refresh()

    def open_graphs(self) -> None:
        """Open ``enable_cudagraphs`` around each compiled attribute of the module, routing calls through it."""
        module = self._module()
        if module is None or not self.graphs_requested or self._graphs is not None:
            return
        self.attach()  # settings outside, graphs inside, whatever order the callbacks run in
        targets = list(self.graph_targets) if self.graph_targets else _compiled_attributes(module)
        if not targets:
            return
        strategy = None
        if self.settings is not None and self.settings.cuda_graph_strategy != "disabled":
            if _backend.is_rtx_build():
                strategy = self.settings.cuda_graph_strategy
            else:
                rank_zero_warn(
                    "cuda_graph_strategy needs a TensorRT-RTX build; capturing CUDA graphs without it."
                )
        stack = ExitStack()
        for name in targets:
            original = getattr(module, name, None)
            if original is None:
                stack.close()
                raise AttributeError(
                    f"{type(module).__name__} has no attribute {name!r} to capture in CUDA graphs."
                    f" Compiled attributes found: {_compiled_attributes(module)}."
                )
            entered = stack.enter_context(_backend.enable_cudagraphs(original, strategy))
            if entered is not original:
                # graph breaks: enable_cudagraphs returns a new wrapper; calls must go through it
                setattr(module, name, entered)
                stack.callback(setattr, module, name, original)
        self._graphs = stack

    # --- closing -----------------------------------------------------------------------------

    def close_graphs(self) -> None:
        """Leave the CUDA-graph scopes (innermost first), putting the original attributes back."""
        if self._graphs is not None:
            graphs, self._graphs = self._graphs, None
            try:
                graphs.close()
            except Exception as err:
                warnings.warn(f"Closing the CUDA-graphs scope failed: {err}", stacklevel=2)

    def close(self) -> bool:
        """Close graph scopes, save the cache, restore the engines. Never raises over the user's error.

        Returns whether this call closed an open session (the callbacks and the plugin all call it).
        """
        self.close_graphs()
        if self.binding is None:
            return False
        binding, self.binding = self.binding, None
        try:
            if self.shared_cache is not None:
                self.figures.saved_bytes = self.shared_cache.save().save_bytes
        except Exception as err:  # cache.save never raises; this guards the restore below regardless
            warnings.warn(f"Saving the kernel cache failed: {err}", stacklevel=2)
        finally:
            binding.restore()
            # what this run configured ends with it: the next run (or loop) configures afresh
            self.settings = None
            self._owners.clear()
        return True

    # --- figures -----------------------------------------------------------------------------

    def loop_started(self) -> None:
        self.figures.batches, self.figures.first_batch_ms, self.figures.mean_batch_ms = 0, 0.0, 0.0

    def batch_started(self) -> None:
        self.refresh()
        self._batch_start = time.perf_counter()

    def batch_ended(self) -> None:
        figures = self.figures
        figures.batches += 1
        if figures.batches == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._first_batch_end = time.perf_counter()
            figures.first_batch_ms = (self._first_batch_end - self._batch_start) * 1e3

    def loop_ended(self) -> None:
        figures = self.figures
        if figures.batches > 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            figures.mean_batch_ms = (time.perf_counter() - self._first_batch_end) * 1e3 / (figures.batches - 1)
        elif figures.batches == 1:
            figures.mean_batch_ms = figures.first_batch_ms


def _ranks(trainer: Any) -> dict[str, int]:
    if trainer is None:
        return {}
    return dict(
        rank=trainer.global_rank,
        local_rank=trainer.local_rank,
        node_rank=trainer.node_rank,
        world_size=trainer.world_size,
    )


def _compiled_attributes(module: torch.nn.Module) -> list[str]:
    """Attributes of ``module`` that hold compiled models: children with engines, or mutable modules."""
    names = [name for name, child in module.named_children() if find_engines(child)]
    names += [name for name, value in vars(module).items() if _backend.is_mutable_module(value)]
    return names
