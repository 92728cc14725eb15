"""One serving run: settings on every engine, this GPU's kernel cache, CUDA-graph scopes, figures.

The public entry point for jobs without a Trainer (``torchrun`` scripts, Lightning Fabric loops),
and the core the callbacks and the precision plugin drive::

    from lightning_trt_rtx import ServingSession, TRTSettings

    with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture")) as session:
        for batch in loader:
            model(batch)
    print(session.figures)          # engines, what the cache loaded and whether it applied, bytes saved

Engines that create their execution context while compiling (native NCCL collectives) get the
settings before they exist::

    with ServingSession(settings=settings) as session:
        with session.engines_created():
            compiled = torch_tensorrt.dynamo.compile(exported, inputs=[x], use_distributed_mode_trace=True)
        session.serve(compiled)

On exit, also after an exception or Ctrl-C, the session saves the cache, gives every engine its prior
settings back and fills in the figures; it never raises over the user's own error. A session serves
one run: each run opens its own and so reads what is on disk now.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lightning_trt_rtx import _backend, addresses, auto, cache, prewarm, transfers
from lightning_trt_rtx._messages import warn
from lightning_trt_rtx.engines import EngineBinding, find_engines
from lightning_trt_rtx.graphs import GraphScopes
from lightning_trt_rtx.report import RankFigures
from lightning_trt_rtx.settings import CudaGraphStrategy, TRTSettings, check_flag

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Who this process is in its job."""

    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_trainer(cls, trainer: Any) -> Ranks:
        return cls(trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size)

    @classmethod
    def from_environment(cls) -> Ranks:
        """From ``torch.distributed`` when initialised (else a single process), local and node rank
        from ``LOCAL_RANK`` / ``GROUP_RANK`` or ``NODE_RANK`` as torchrun and Lightning set them."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))  # without it (mp.spawn): one node
        node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))
        return cls(rank, local, node, world)

    def __post_init__(self) -> None:
        for name in ("rank", "local_rank", "node_rank", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}.")
        # a node's processes and a job's nodes are at most world_size; a single process (world_size 1, e.g.
        # before torchrun's process group is initialised) keeps the launcher's LOCAL_RANK / NODE_RANK
        for name in ("rank", "local_rank", "node_rank") if self.world_size > 1 else ("rank",):
            value = getattr(self, name)
            if value >= self.world_size:
                raise ValueError(f"{name} must be in [0, world_size): got {name} {value}, world_size {self.world_size}")


def _check_module(module: Any) -> None:
    if module is not None and not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module (or None), got {type(module).__name__}.")


class ServingSession:
    """Serve a module's TensorRT-RTX engines with runtime settings and this GPU's kernel cache.

    Args:
        module: the model whose engines to serve (or pass it to :meth:`serve` later).
        settings: the runtime settings (default: ``TRTSettings()``: lazy kernels, no graphs, the
            default per-GPU cache file).
        rank, local_rank, node_rank, world_size: this process's place in the job; by default from
            ``torch.distributed`` (and ``LOCAL_RANK``/``NODE_RANK``), a single process without it.
    """

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        settings: TRTSettings | None = None,
        *,
        rank: int | None = None,
        local_rank: int | None = None,
        node_rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        _check_module(module)
        if settings is None:
            settings = TRTSettings()
        if not isinstance(settings, TRTSettings):
            raise TypeError(
                f"settings must be a TRTSettings, got {type(settings).__name__}; e.g."
                " TRTSettings(cuda_graph_strategy='whole_graph_capture') or TRTSettings.from_dict({...})."
            )
        given = dict(rank=rank, local_rank=local_rank, node_rank=node_rank, world_size=world_size)
        base = Ranks.from_environment()
        self.ranks = Ranks(**{k: getattr(base, k) if v is None else v for k, v in given.items()})
        # under whole-graph capture, "graphs" has the package capture each call site (the engines' own capture off)
        self._site_graphs_asked = False
        if settings.cuda_graph_strategy in ("whole_graph_capture", "auto"):
            # a bad $LIGHTNING_TRT_RTX_STABLE_ADDRESSES is named here, not at the first engine
            self._site_graphs_asked = addresses.mode() == "graphs" and settings.cuda_graph_strategy != "auto"
        self.settings = settings
        self.module = module
        self.figures = RankFigures(rank=self.ranks.rank)
        self.cache: cache.RunCache | None = None
        self.binding: EngineBinding | None = None
        self.graphs: GraphScopes | None = None
        self.stable: addresses.StableAddresses | None = None
        self.closed = False
        self._between_loops = False  # loops drive stable addresses (for_trainer's loops_only), none runs now
        self._cache_opened = False
        self._gpu: cache.Gpu | None = None  # the GPU this run serves on: its engines' device, else the current one
        self._engines_located = False  # whether _gpu was decided from engines (then it stays)
        self._local_devices: list[str] | None = None  # a Trainer's device per local rank (Lightning's own)
        self._timer = _BatchTimer(self.figures)
        self.uploads: transfers.UploadsAhead | None = None
        self.looping = False  # between loop_started and loop_ended
        self._in_batch = False  # between batch_started and batch_ended
        self._loop_batches: int | None = None  # how many batches the loop runs, where its owner says
        # an uploads thread calls CUDA only between the steps that may capture a graph
        self._step_gate = transfers.StepGate(capture=functools.partial(self._graphs_may_capture, now=True))
        # cuda_graph_strategy="auto": the candidates' trial, driven by batch_started / batch_ended
        self.auto: auto.AutoGraphs | None = None
        if settings.cuda_graph_strategy == "auto":
            self.auto = auto.AutoGraphs(self._run_candidate)
        # prewarm arguments handed over by an adapter that meets this session through trainer_session (the
        # plugin, when the callback's session serves the run): whoever starts the loops runs them once
        self.prewarm_spec: prewarm.PrewarmSpec | None = None
        # the run owner's upload_ahead (the callback's): an adapter that meets this session checks its own against it
        self.upload_ahead_wanted: bool | None = None

    @classmethod
    def for_trainer(cls, trainer: Any, settings: TRTSettings, loops_only: bool = False) -> ServingSession:
        """``loops_only``: the session serves whole-graph capture's stable addresses only between
        :meth:`loop_started` and :meth:`loop_ended` (a callback: not in the sanity check or training)."""
        session = cls(settings=settings, **vars(Ranks.from_trainer(trainer)))
        session._between_loops = loops_only
        devices = getattr(getattr(trainer, "strategy", None), "parallel_devices", None)
        if devices:
            session._local_devices = [str(device) for device in devices]
        return session

    # --- opening -------------------------------------------------------------------------------

    def __enter__(self) -> ServingSession:
        if self.module is not None:
            self.serve(self.module)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def serve(self, module: torch.nn.Module | None = None, warn_if_none: bool = True) -> int:
        """Give every engine under ``module`` the settings and this run's cache handle; returns the count.

        Idempotent and cheap when nothing changed (engines already holding the settings are left
        alone): call it wherever engines may have appeared or been reset. ``warn_if_none=False`` where
        engines may still appear later.
        """
        self._check_open()
        _check_module(module)
        check_flag("warn_if_none", warn_if_none)
        module = self.module = module if module is not None else self.module
        if module is None:
            raise ValueError("ServingSession.serve needs a module: pass it here or to ServingSession(module, ...).")
        if self.graphs is not None and self.graphs.is_open:
            # served just before the scopes opened; re-applying now would undo a scope's own settings
            # (engines inside a whole-module graph hold their capture off)
            return self.figures.engines
        engines = find_engines(module)
        self.figures.gpu = self._locate(engines).id  # also without engines or a cache, for the table
        self.figures.engines = len(engines)
        if not engines:
            if warn_if_none:
                warn(
                    f"No TensorRT engines found under {type(module).__name__}: the TensorRT-RTX runtime settings"
                    " change nothing. Compile the model with torch_tensorrt (or load a compiled program with"
                    " load_program) before serving it; in a LightningModule, in __init__, setup or configure_model.",
                    rank=self.ranks.rank,
                    rank_zero=True,
                    once=True,
                )
            return 0
        if not _backend.is_rtx_build():
            warn(
                f"torch-tensorrt {_backend.installed_version()} is not a TensorRT-RTX build: cuda_graph_strategy,"
                " dynamic_shapes_kernel_specialization_strategy and runtime_cache are no-ops there. The job runs"
                f" with standard TensorRT. For the runtime settings: `{_backend.INSTALL_HINT}`.",
                rank=self.ranks.rank,
                rank_zero=True,
                once=True,
            )
            return len(engines)
        self._open_cache()
        if self.binding is None or self.binding.root is not module:
            if self.binding is not None:
                self.binding.restore()
            self.binding = EngineBinding(module)
            if self.auto is not None:  # a decision this process made for these engines is where they start
                first = engines[0]  # remembered on the module holding it: it lives as long as the engines
                self.auto.bind(first.obj if first.kind == "module" else first.owner, [id(e.obj) for e in engines])
        self.apply_settings()
        self.figures.engines = len(self.binding.engines)
        self._hold_addresses()
        return self.figures.engines

    def _site_graphs(self) -> bool:
        """Whether call sites are captured in CUDA graphs of their own now (``$LIGHTNING_TRT_RTX_STABLE_ADDRESSES``
        ``graphs`` under whole-graph capture, or ``"auto"``'s candidate)."""
        if self.auto is not None:
            return self.auto.candidate == auto.SITE_GRAPHS
        return self._site_graphs_asked

    def _hold_addresses(self) -> None:
        """Under whole-graph capture, hold every engine's input and output addresses still (see
        :mod:`lightning_trt_rtx.addresses`): TensorRT-RTX replays a captured graph only while they stay.
        Under ``"auto"``, only while its candidate is the one with held addresses. Where call sites are
        captured in graphs of their own, install those."""
        if self.binding is None:
            return
        mode = addresses.mode()
        graphs = self._site_graphs()
        if not graphs and (self.engine_strategy() != "whole_graph_capture" or mode == "off" or (
            self.auto is not None and self.auto.candidate != auto.HELD
        )):
            if self.stable is not None:
                self.stable.uninstall()  # auto switched away from it (a fixed strategy never does)
                if not self.stable.adopt(self.binding.engines):
                    self.stable = None  # other engines: made again if auto holds them
            if mode == "off" and self.auto is None and self.engine_strategy() == "whole_graph_capture":
                self.figures.capture = f"addresses not held (${addresses.ENABLED_ENV}=0)"
            return
        stable = self._stable_addresses(mode)
        stable.use_graphs(graphs)
        stable.install()  # a no-op while installed
        if self._between_loops:
            stable.pause()

    def _stable_addresses(self, mode: str) -> addresses.StableAddresses:
        """The run's StableAddresses for the bound engines (made, or kept when the engines are the same),
        not installed."""
        assert self.binding is not None
        engines = self.binding.engines
        if self.stable is not None:
            if self.stable.adopt(engines):
                return self.stable
            self.stable.uninstall()
        self.stable = addresses.StableAddresses(engines, from_first_call=mode == "always")
        return self.stable

    def engine_strategy(self) -> CudaGraphStrategy:
        """The ``cuda_graph_strategy`` the engines hold now: the settings', or under ``"auto"`` its current
        candidate's; ``"disabled"`` where call sites are captured in graphs of their own (a capture inside
        ours fails)."""
        if self.auto is not None:
            return auto.engine_strategy(self.auto.candidate)
        if self._site_graphs_asked:
            return "disabled"
        return self.settings.cuda_graph_strategy

    def _auto_options(self) -> auto.Options:
        """The candidates an ``"auto"`` trial may try on the bound engines, or why it tries none."""
        if self.binding is None or not self.binding.engines:
            off = "not a TensorRT-RTX build" if self.figures.engines else "no TensorRT-RTX engines to time"
            return auto.Options(off=off)
        mode = addresses.mode()
        if mode == "off":
            off = f"${addresses.ENABLED_ENV}=0"
            return auto.Options((auto.DISABLED, auto.UPSTREAM), held_left_out=off, graphs_left_out=off)
        stable = self._stable_addresses(mode)
        if not stable.holdable:
            why = "no engine's addresses can be held"
            return auto.Options((auto.DISABLED, auto.UPSTREAM), held_left_out=why, graphs_left_out=why)
        why = addresses.why_no_site_graphs() or stable.why_not_graphed()
        if why:
            return auto.Options((auto.DISABLED, auto.UPSTREAM, auto.HELD), graphs_left_out=why)
        if not stable.why_not_every_engine_graphed():
            return auto.Options((auto.DISABLED, auto.SITE_GRAPHS), own_capture_left_out=auto.SITE_GRAPHS_COVER_ALL)
        return auto.Options(auto.CANDIDATES)

    def _run_candidate(self, candidate: str) -> None:
        """Put the engines under an ``"auto"`` candidate (its driver has made it the current one)."""
        if self.binding is not None:
            self.apply_settings()  # a strategy change drops the execution contexts
            self._hold_addresses()

    def apply_settings(self, **overrides: Any) -> int:
        """Give the bound engines this run's settings (with ``overrides``); how many changed. A change
        re-creates their execution contexts: call-site graphs are freed (they would replay into freed memory).
        ``overrides``: ``cuda_graph_strategy`` or ``dynamic_shapes_kernel_specialization_strategy``."""
        if self.binding is None:
            raise RuntimeError("apply_settings needs the session's engines: call serve(module) first.")
        unknown = sorted(set(overrides) - {"cuda_graph_strategy", "dynamic_shapes_kernel_specialization_strategy"})
        if unknown:
            raise TypeError(
                f"apply_settings takes cuda_graph_strategy and dynamic_shapes_kernel_specialization_strategy;"
                f" got {unknown}."
            )
        dataclasses.replace(self.settings, **overrides)  # a bad value is refused, naming the valid choices
        changed = self.binding.apply(self.runtime_settings(**overrides))
        if changed and self.stable is not None:
            self.stable.drop_graphs()
        return changed

    def runtime_settings(self, **overrides: Any) -> Any:
        """``torch_tensorrt.runtime.RuntimeSettings`` with this run's cache handle (and ``overrides``)."""
        values = {"cuda_graph_strategy": self.engine_strategy(), **overrides}
        return self.settings.to_runtime_settings(self.cache.handle if self.cache is not None else None, **values)

    @contextmanager
    def engines_created(self) -> Iterator[None]:
        """Engines set up (compiled) inside the block start with the settings and this run's cache.

        For engines that create their execution context while compiling (native NCCL collectives):
        setting them afterwards would cost every rank a second, collective, context creation. Such
        engines had no settings before, so they keep these after :meth:`close` (no more saves).
        """
        self._check_open()
        if not _backend.is_rtx_build():
            yield
            return
        self._open_cache()
        with _backend.settings_at_engine_setup(self.runtime_settings()):
            yield

    def prewarm(self, inputs: Sequence[Any], target: str | None = None) -> list[Any]:
        """Compile this GPU's kernels for each example's shapes now, before the first real batch.

        Runs the module (or its attribute ``target``) once per example (a tensor or a tuple of
        tensors, e.g. from :func:`lightning_trt_rtx.prewarm.example_inputs`) with the engines'
        kernels specialized eagerly, then gives them this session's settings back: see
        :func:`lightning_trt_rtx.prewarm.prewarm`. Returns a ``PrewarmedShape`` per example (its shapes
        and first-call time) and counts them in ``figures.prewarmed``.
        """
        records = prewarm.prewarm(self, inputs, target)
        if self.stable is not None:
            self.stable.forget()  # the examples are not the loop's tensors: compare its first batch with nothing
        return records

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("This ServingSession is closed: a session serves one run. Open a new one.")

    def _locate(self, engines: Sequence[Any] = ()) -> cache.Gpu:
        """The GPU this run serves on: the device its engines run on (TensorRT-RTX kernels are compiled
        there), else this process's current device; decided at the first call that sees engines. A
        current device other than the engines' is warned about (the cache follows the engines)."""
        if self._gpu is not None and (self._engines_located or not engines):
            return self._gpu
        self._engines_located = bool(engines)
        devices = sorted({d for d in (_backend.engine_device(e.obj) for e in engines) if d is not None})
        current = cache.current_device()
        if not devices or current is None:  # no engine says (or no CUDA here): the current device
            self._gpu = self._gpu or cache.current_gpu()
            return self._gpu
        device = devices[0]
        if len(devices) > 1:
            warn(
                f"The TensorRT engines of this run are on several devices ({', '.join(f'cuda:{d}' for d in devices)});"
                f" one kernel cache serves them all and follows cuda:{device}. Kernels compiled on the other"
                " devices do not apply there: serve each device's engines in a session of their own.",
                rank=self.ranks.rank,
                once=True,
            )
        gpu = cache.gpu_at(device)
        if device != current:
            warn(
                f"The TensorRT engines run on cuda:{device} (GPU {gpu.id}), but this process's current CUDA device"
                f" is cuda:{current}: the kernel cache file and its record follow the engines' device. Call"
                f" torch.cuda.set_device({device}) before compiling and serving so that both agree (torchrun:"
                " torch.cuda.set_device(int(os.environ['LOCAL_RANK']))).",
                rank=self.ranks.rank,
                once=True,
            )
        if self._gpu is not None and self._gpu != gpu and self.cache is not None:
            warn(
                f"The kernel cache {self.cache.path} was opened for the current device (GPU {self._gpu.id}) before"
                f" the engines existed, but they run on cuda:{device} (GPU {gpu.id}): their kernels are saved"
                f" under GPU {self._gpu.id}'s name. Call torch.cuda.set_device({device}) before engines_created().",
                rank=self.ranks.rank,
                once=True,
            )
        self._gpu = gpu
        return gpu

    def _open_cache(self) -> None:
        if self._cache_opened:
            return
        self._cache_opened = True
        template = self.settings.runtime_cache
        if template is None:
            return
        placement = cache.Placement.current(
            self.ranks.rank, self.ranks.local_rank, self.ranks.node_rank, self.ranks.world_size, gpu=self._locate()
        )
        template = self._template_for_this_job(template, placement)
        self.cache = cache.RunCache(template, placement)
        self.figures.gpu = placement.gpu.id
        self.figures.cache = self.cache.stats

    def _template_for_this_job(self, template: str, placement: cache.Placement) -> str:
        """The template this rank uses, decided without asking the other ranks (no collective: a session
        may be opened on some ranks only). One naming ``{gpu}`` gives ranks that share one GPU a file
        each (``one_per_rank``); a template that gives several ranks one file is warned about."""
        if placement.world_size == 1 or cache.is_per_rank(template):
            return template
        fields = set(cache.template_fields(template))
        local_world = self._local_world_size()
        if "gpu" in fields:
            return cache.one_per_rank(template) if self._shares_gpu(local_world) else template
        one_node = local_world == placement.world_size
        if not ("local_rank" in fields and one_node) and not (fields & {"host", "node_rank"} and local_world == 1):
            self._warn_shared_file(template, placement)
        return template

    def _local_world_size(self) -> int:
        """How many ranks of this job run on this node: the Trainer's devices, else ``LOCAL_WORLD_SIZE``
        (torchrun sets it), else the world size (one node)."""
        if self._local_devices is not None:
            return len(self._local_devices)
        try:
            return int(os.environ["LOCAL_WORLD_SIZE"])
        except (KeyError, ValueError):
            return self.ranks.world_size

    def _shares_gpu(self, local_world: int) -> bool:
        """Whether another rank of this job may run on this rank's GPU: Lightning's device list says so
        exactly; without a Trainer, more ranks on this node than GPUs it sees (then every rank of the
        node gets its own file, which seeds from the others' files filled on the same GPU)."""
        if self._local_devices is not None and self.ranks.local_rank < len(self._local_devices):
            return self._local_devices.count(self._local_devices[self.ranks.local_rank]) > 1
        return local_world > max(cache.visible_gpus(), 1)

    def _warn_shared_file(self, template: str, placement: cache.Placement) -> None:
        warn(
            f"Several ranks of this job share the kernel cache file {template!r}: the last writer wins and"
            " kernels the other ranks compiled are lost. Give each its own file: name {gpu} (one file per"
            f" GPU) or {{rank}} in the template, e.g. the default {cache.default_template()!r}.",
            rank=placement.rank,
            rank_zero=True,
        )

    # --- CUDA graphs ---------------------------------------------------------------------------

    def open_graphs(self, targets: Sequence[str] | None = None) -> None:
        """Open CUDA-graph scopes (see :mod:`lightning_trt_rtx.graphs`) inside the applied settings."""
        self._check_open()
        if self.graphs is not None and self.graphs.is_open:
            return
        if self.module is None:
            raise ValueError("open_graphs needs the session's module: call serve(module) first.")
        if self.auto is not None:  # the scopes capture the compiled modules: no trial inside them
            self.auto.stop("TRTCudaGraphs' scopes capture the compiled modules")
        self.serve(self.module)  # settings outside, graphs inside, whatever order the callbacks run in
        handle = self.cache.handle if self.cache is not None else None
        settings = dataclasses.replace(self.settings, cuda_graph_strategy=self.engine_strategy())
        self.graphs = GraphScopes(self.module, targets, settings, handle, self.ranks.rank)
        self.graphs.open()

    def close_graphs(self) -> None:
        if self.graphs is not None:
            was_open = self.graphs.is_open
            self.graphs.close()
            if was_open:  # what each target ran, read at its first call in the loop
                self.figures.graphs = self.graphs.describe()

    # --- uploads ahead of the engine ---------------------------------------------------------------

    def upload_ahead(
        self,
        batches: Iterable[Any],
        device: torch.device | str | int | None = None,
        depth: int = transfers.DEFAULT_DEPTH,
        steps_marked: bool = False,
        small_on_host: bool = False,
    ) -> Iterable[Any]:
        """``batches`` with every CPU tensor already on the GPU, ``depth`` batches ahead (see
        :class:`lightning_trt_rtx.transfers.UploadsAhead`); closed with the loop or the session::

            with ServingSession(model, settings) as session:
                for batch in session.upload_ahead(loader):
                    model(batch)

        ``device``: default, the current CUDA device. Without CUDA (or with a CPU ``device``) the batches
        are returned as they are, and the figures say so.

        Where CUDA graphs may be captured during the loop (whole-graph capture, ``"auto"``, graph scopes),
        a thread may call CUDA only between steps (:class:`~lightning_trt_rtx.transfers.StepGate`):
        ``steps_marked=True`` says that :meth:`batch_started` and :meth:`batch_ended` bracket every
        step (the callbacks and the plugin do); otherwise the loop's own thread reads and stages.
        ``small_on_host=True``: batches under 1 MiB come back staged in pinned host memory (under 64 KiB, as
        they are), for a loop that moves each to the GPU itself with ``non_blocking=True`` (Lightning's
        ``batch_to_device`` does; the callbacks and the plugin pass it): one batch on the GPU at a time keeps
        an engine's input address.
        """
        self._check_open()
        check_flag("steps_marked", steps_marked)
        check_flag("small_on_host", small_on_host)  # also where no uploads run (CPU): one answer on every host
        transfers.check_source(batches)
        self._close_uploads()
        transfers.check_depth(depth)
        reason = transfers.why_not_on_cuda(device)
        if reason is not None:
            self.uploads_off(reason)
            return batches
        target = "cuda" if device is None else device
        gate = self._step_gate if steps_marked else None
        self.uploads = transfers.UploadsAhead(
            batches, target, depth, may_capture=self._graphs_may_capture, gate=gate, small_on_host=small_on_host
        )
        self.figures.uploads = f"ahead, depth {depth}"
        return self.uploads

    def _graphs_may_capture(self, now: bool = False) -> bool:
        """Whether a CUDA graph may be captured while the loop runs: TensorRT-RTX's whole-graph capture
        (also as an ``"auto"`` candidate), or ``enable_cudagraphs`` scopes (ours or the user's). ``now``:
        in the coming step, where ``"auto"`` counts only while its candidate captures (so an uploads
        thread copies during the steps whose engines run without graphs)."""
        strategy = self.engine_strategy() if now else self.settings.cuda_graph_strategy
        graphs_open = self.graphs is not None and self.graphs.is_open
        return strategy != "disabled" or graphs_open or _backend.cudagraphs_mode() != 0

    def uploads_off(self, reason: str) -> None:
        """Record why this run's batches are not uploaded ahead (for the figures)."""
        self.figures.uploads = f"off: {reason}"

    def _close_uploads(self) -> None:
        uploads, self.uploads = self.uploads, None
        if uploads is None:
            return
        uploads.close()
        stats = uploads.stats
        staged = stats["staged_bytes"] + stats["pinned_bytes"]
        pinned = f", {stats['pinned_bytes'] / staged:.0%} already pinned" if stats["pinned_bytes"] else ""
        how = {"thread": ", own thread", "loop": ""}.get(stats["mode"], "")
        how += " (CUDA calls between steps: graphs may be captured)" if uploads.gated else ""
        direct = stats["direct_batches"]
        small = f" ({direct} under {uploads.DIRECT_MAX_BYTES >> 10} KiB, not staged)" if direct else ""
        self.figures.uploads = f"ahead, depth {uploads.depth}{how}: {stats['batches']} batches{small}{pinned}"

    # --- timing --------------------------------------------------------------------------------

    def loop_started(self, cuda: bool | None = None, batches: int | float | None = None) -> None:
        """A loop's batches start: timing (and, on a GPU, the steps' GPU time) starts over.
        ``cuda``: whether the loop runs on a GPU (default: whether one is available). ``batches``: how many
        it runs, where known (``"auto"`` tries graphs only where the loop is long enough to win back a
        switch of strategy; unknown: as if endless)."""
        if cuda is not None:
            check_flag("cuda", cuda)
        whole = False  # a count of batches, or inf
        if isinstance(batches, numbers.Real) and not isinstance(batches, bool):
            value = float(batches)
            whole = value >= 0 and (value == math.inf or value.is_integer())
        if batches is not None and not whole:
            raise ValueError(
                f"batches must be a whole number >= 0 (inf: a loop of unknown length) or None; got {batches!r}."
            )
        self._between_loops = False
        self.looping = True
        self._loop_batches = int(batches) if batches is not None and math.isfinite(batches) else None
        if self.stable is not None:
            self.stable.resume()
        self._timer.start(cuda=torch.cuda.is_available() if cuda is None else cuda)

    def batch_started(self, batch: Any = None) -> None:
        """Call before each batch (the callbacks do), with the batch: under ``"auto"`` a batch of a new
        input shape starts a new trial (without it, one trial decides for the run)."""
        if self.binding is not None:
            self.binding.refresh()  # a MutableTorchTensorRTModule may have recompiled
            if self.stable is not None and self.stable.engines is not self.binding.engines:
                self._hold_addresses()  # a new walk (an identity test: the list is rebuilt by each apply)
        if self.auto is not None:
            waited = self.uploads.stats["waited_s"] if self.uploads is not None else None
            self.auto.batch_started(batch, self._auto_options, waited_s=waited, left=self._batches_left())
        self._timer.batch_started()
        self._step_gate.step_started()
        self._in_batch = True

    def batch_ended(self) -> None:
        """Call after each batch (the callbacks do): times the batches of an ``"auto"`` trial."""
        if not self._in_batch:  # its time would count from nothing: a first batch of hours
            raise RuntimeError("batch_ended() without batch_started(): call batch_started(batch) before each batch.")
        self._in_batch = False
        self._step_gate.step_ended()
        self._timer.batch_ended()
        if self.auto is not None:
            self.auto.batch_ended(self._batches_left(), self.figures.first_batch_ms)

    def _batches_left(self) -> float:
        """The loop's batches not yet ended (``inf``: a loop of unknown length)."""
        return math.inf if self._loop_batches is None else max(0, self._loop_batches - self.figures.batches)

    def loop_ended(self) -> None:
        self._step_gate.step_ended()  # a step that raised never called batch_ended
        self._in_batch = False
        self.looping = False
        self._close_uploads()
        self._timer.end()
        if self.auto is not None:
            self.auto.loop_ended(self.figures.batches)
        self._between_loops = True
        if self.stable is not None:
            self.stable.pause()  # inside fit, training runs until the next validation loop

    # --- closing -------------------------------------------------------------------------------

    def close(self) -> RankFigures:
        """Close graph scopes, save the cache, restore the engines; idempotent, never raises."""
        if self.closed:
            return self.figures
        self.closed = True
        self._step_gate.step_ended()  # an uploads thread waiting for a step that raised goes on closing
        try:  # nothing here may stop the save below
            if self.looping:  # a loop that no loop-end hook closed (the plugin's own run, an exception)
                self.loop_ended()
            self._close_uploads()  # uploads opened without a loop (ServingSession.upload_ahead)
        except Exception as err:  # e.g. a CUDA error the user's step left: never over it
            warn(f"Ending the loop (its figures or its uploads) failed: {err}", rank=self.ranks.rank, logger=log.name)
        self.close_graphs()
        if self.auto is not None:
            self.figures.auto = self.auto.describe()
            self.figures.auto_ms = self.auto.medians_ms()
        if self.stable is not None:
            if self.auto is None or self.auto.candidate in (auto.HELD, auto.SITE_GRAPHS):
                self.figures.capture = self.stable.describe()
            self.stable.uninstall()
        try:
            if self.cache is not None:
                self.cache.save()
        except Exception as err:  # RunCache.save never raises; this guards the restore below regardless
            warn(f"Saving the kernel cache failed: {err}", rank=self.ranks.rank)
        finally:
            if self.binding is not None:
                self.binding.restore()
        return self.figures


class _BatchTimer:
    """First-batch and steady per-batch time, synchronised with the GPU only at the two edges; on a
    GPU also the GPU time of the steady steps (CUDA events at a step's start and end, read in arrears),
    sampled: one steady step in ``GPU_EVERY`` (two events a step cost the host more than the rest of
    this package's per-batch work)."""

    _FOLD_AFTER = 8  # pairs of events kept before the oldest (long finished) are read and dropped
    GPU_EVERY = 8  # steady steps 1, 1 + GPU_EVERY, ... are timed on the GPU

    def __init__(self, figures: RankFigures) -> None:
        self.figures = figures
        self._batch_start = 0.0
        self._first_batch_end = 0.0
        self._events: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._start_event: torch.cuda.Event | None = None
        self._gpu_ms = 0.0
        self._gpu_steps = 0
        self._cuda = False

    def start(self, cuda: bool = False) -> None:
        self.figures.batches, self.figures.first_batch_ms, self.figures.mean_batch_ms = 0, 0.0, 0.0
        self.figures.step_gpu_ms = 0.0
        self._events.clear()
        self._gpu_ms, self._gpu_steps = 0.0, 0
        self._cuda = cuda and torch.cuda.is_available()

    def batch_started(self) -> None:
        self._batch_start = time.perf_counter()
        if self._cuda and self.figures.batches % self.GPU_EVERY == 1:  # steady batches only, sampled
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def batch_ended(self) -> None:
        figures = self.figures
        figures.batches += 1
        if self._start_event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start_event, end))
            self._start_event = None
            if len(self._events) > self._FOLD_AFTER:
                self._fold(self._events.popleft())
        if figures.batches == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._first_batch_end = time.perf_counter()
            figures.first_batch_ms = (self._first_batch_end - self._batch_start) * 1e3

    def _fold(self, pair: tuple[torch.cuda.Event, torch.cuda.Event]) -> None:
        start, end = pair
        end.synchronize()
        self._gpu_ms += start.elapsed_time(end)
        self._gpu_steps += 1

    def end(self) -> None:
        figures = self.figures
        if figures.batches > 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            figures.mean_batch_ms = (time.perf_counter() - self._first_batch_end) * 1e3 / (figures.batches - 1)
        elif figures.batches == 1:
            figures.mean_batch_ms = figures.first_batch_ms
        while self._events:
            self._fold(self._events.popleft())
        self._start_event = None
        if self._gpu_steps:
            figures.step_gpu_ms = self._gpu_ms / self._gpu_steps


def trainer_session(trainer: Any) -> ServingSession | None:
    """The one lookup when two adapters meet in one Trainer: the open session of this Trainer's run.

    The adapters that own runs (the ``TRTRuntimeSettings`` callback, the ``TRTRuntimePrecision``
    plugin) say so with a class attribute ``serves_runs = True`` and hold their run's session in
    ``.session``; the callback's comes first (it opens at ``setup``, before the plugin's
    ``convert_module``), else the plugin's. No adapter imports another.
    """
    for owner in [*getattr(trainer, "callbacks", []), getattr(trainer, "precision_plugin", None)]:
        session = getattr(owner, "session", None) if getattr(owner, "serves_runs", False) else None
        if isinstance(session, ServingSession):
            return session
    return None
