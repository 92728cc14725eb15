"""Lightning callbacks: TensorRT-RTX runtime settings and a shared kernel cache, and scoped CUDA graphs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal, get_args

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_trt_rtx import _predict_loop, report, transfers
from lightning_trt_rtx._messages import info
from lightning_trt_rtx.graphs import GraphScopes, check_targets
from lightning_trt_rtx.prewarm import PrewarmSpec
from lightning_trt_rtx.session import ServingSession, trainer_session
from lightning_trt_rtx.settings import DEFAULT_CACHE, CudaGraphStrategy, KernelStrategy, TRTSettings, check_flag

log = logging.getLogger(__name__)

Loop = Literal["predict", "validate", "test"]
_LOOPS: tuple[str, ...] = get_args(Loop)


def _check_loops(loops: Sequence[str]) -> tuple[str, ...]:
    if isinstance(loops, (str, bytes)) or not isinstance(loops, Iterable):
        raise TypeError(f"loops must be a list of loop names from {list(_LOOPS)}; got {loops!r}.")
    loops = tuple(loops)  # an iterator would be consumed by the checks below
    if not all(isinstance(loop, str) for loop in loops):
        raise TypeError(f"loops must be a list of loop names from {list(_LOOPS)}; got {loops!r}.")
    unknown = [loop for loop in loops if loop not in _LOOPS]
    if unknown or not loops:
        raise ValueError(f"Invalid loops {list(loops)!r}. Valid choices: {list(_LOOPS)} (one or more).")
    return tuple(dict.fromkeys(loops))


class _LoopHooks(Callback):
    """Routes the start and end hooks of the served loops to ``_start`` and ``_end``."""

    loops: tuple[str, ...]

    def _serves_stage(self, stage: str) -> bool:
        """Whether ``setup``/``teardown`` of this stage concern us (fit runs the validation loop)."""
        return stage in self.loops or (stage == "fit" and "validate" in self.loops)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None: ...

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None: ...

    def _hook(self, trainer: Trainer, pl_module: LightningModule, handler: str) -> None:
        if trainer.state.stage is not None and trainer.state.stage.value in self.loops:
            getattr(self, handler)(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hook(trainer, pl_module, "_start")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hook(trainer, pl_module, "_start")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hook(trainer, pl_module, "_start")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hook(trainer, pl_module, "_end")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hook(trainer, pl_module, "_end")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hook(trainer, pl_module, "_end")


class TRTRuntimeSettings(_LoopHooks):
    """Serve every TensorRT-RTX engine of the model with runtime settings and this GPU's kernel cache.

    Settings reach each engine before its first execute (one execution context per engine), the
    kernel cache filled on this GPU is loaded before the first batch and saved when the loop ends,
    also after an exception or Ctrl-C, and every engine gets its prior settings back afterwards::

        trainer = Trainer(callbacks=[TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture")])
        trainer.predict(model, dataloader)
        trainer.callbacks[0].figures      # on rank zero every rank's figures (printed as a table), elsewhere its own

    Args:
        cuda_graph_strategy: ``"disabled"``, ``"whole_graph_capture"`` or ``"auto"`` (time both, and whole-graph
            capture with held addresses, on the loop's first batches and keep the fastest; again on a new
            input shape: see :mod:`lightning_trt_rtx.auto`).
        dynamic_shapes_kernel_specialization_strategy: ``"lazy"``, ``"eager"`` or ``"none"``.
        runtime_cache: kernel-cache path template (placeholders ``{gpu}``, ``{rank}``, ``{local_rank}``,
            ``{node_rank}``, ``{world_size}``, ``{sm}``, ``{trt}``, ``{cuda}``, ``{host}``; fsspec URLs
            work), ``"default"`` (one file per physical GPU under ``~/.cache/lightning-trt-rtx`` or
            ``$LIGHTNING_TRT_RTX_CACHE_DIR``, keyed by GPU architecture and versions), or ``None``.
        loops: the loops to serve: ``"predict"`` (default), ``"validate"``, ``"test"``.
        print_table: print every rank's figures as one table on rank zero when serving ends.
        prewarm_shapes: input shapes to compile this GPU's kernels for when the loop starts, before
            the first batch (see :mod:`lightning_trt_rtx.prewarm`): each ``"8x128"`` (one input) or
            ``"8x128,8x128"`` (two inputs of one call). None (default): no prewarm.
        prewarm_dtype: the example inputs' dtype: ``"float16"`` (default), ``"bfloat16"``, ``"float32"``,
            ``"int64"``, ``"int32"`` (integers are zeros: valid token ids).
        prewarm_target: the LightningModule attribute the shapes are for; default: its only compiled
            attribute (with none, the LightningModule's own ``forward``); ``"forward"``: its ``forward``.
        upload_ahead: in GPU predict loops, upload each batch's CPU tensors on a stream of their own
            while the previous batch runs (large ones staged in pinned memory, with an event per batch; see
            :mod:`lightning_trt_rtx.transfers`). On by default; off by itself (the figures say why)
            where the LightningModule or DataModule overrides ``on_before_batch_transfer`` or
            ``transfer_batch_to_device``, or ``predict_step`` takes ``dataloader_iter``.
    """

    serves_runs = True  # owns its run's session (see session.trainer_session)

    def __init__(
        self,
        cuda_graph_strategy: CudaGraphStrategy = "disabled",
        dynamic_shapes_kernel_specialization_strategy: KernelStrategy = "lazy",
        runtime_cache: str | None = DEFAULT_CACHE,
        loops: Sequence[Loop] = ("predict",),
        print_table: bool = True,
        prewarm_shapes: list[str] | None = None,
        prewarm_dtype: str = "float16",
        prewarm_target: str | None = None,
        upload_ahead: bool = True,
    ) -> None:
        self.upload_ahead = check_flag("upload_ahead", upload_ahead)
        self.prewarm_spec = PrewarmSpec.from_args(prewarm_shapes, prewarm_dtype, prewarm_target)
        self.settings = TRTSettings(
            cuda_graph_strategy=cuda_graph_strategy,
            dynamic_shapes_kernel_specialization_strategy=dynamic_shapes_kernel_specialization_strategy,
            runtime_cache=runtime_cache,
        )
        self.loops = _check_loops(loops)
        self.print_table = check_flag("print_table", print_table)  # "yes" or "no" would both print
        self.figures: list[report.RankFigures] = []
        self.session: ServingSession | None = None  # this run's; None between runs
        self._serving: ServingSession | None = None  # set while a loop runs: the per-batch hooks' fast path
        self.checkpoint_settings: dict[str, Any] | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._serves_stage(stage):
            return
        if self.session is not None:  # a run that ended without teardown (an exception before our hooks)
            self.session.close()
        self.session = ServingSession.for_trainer(trainer, self.settings, loops_only=True)
        # what the plugin, meeting this session in the same Trainer, checks its own arguments against
        self.session.prewarm_spec, self.session.upload_ahead_wanted = self.prewarm_spec, self.upload_ahead
        # before any rank can end this run and post its figures
        report.open_run(trainer.global_rank, trainer.world_size)
        # engines that exist now get their settings before any context is created; no warning yet:
        # configure_model (which runs after this hook) may still create them
        self.session.serve(pl_module, warn_if_none=False)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.session is None or self.session.closed:  # a second loop of the same stage in this fit
            self.session = ServingSession.for_trainer(trainer, self.settings, loops_only=True)
        self.session.serve(pl_module)  # engines made in configure_model / reset by a checkpoint restore
        prewarm = self.prewarm_spec or self.session.prewarm_spec
        if prewarm is not None:  # once per session, before the loop's timing starts
            prewarm.run(self.session, pl_module)
        if trainer.state.fn == TrainerFn.PREDICTING:
            _predict_loop.upload_batches(trainer, self.session, self.upload_ahead)
        _predict_loop.start_loop(self.session, trainer)
        self._serving = self.session

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._serving = None
        if self.session is None:
            return
        self.session.loop_ended()
        if trainer.state.fn != TrainerFn.FITTING:
            self.session.close()
        # inside fit the validation loop comes back every epoch: the engines keep their settings
        # (and execution contexts) until teardown saves and restores once

    # --- per batch: one attribute test when not serving, a timestamp when serving -----------------

    def _batch_start(self, batch: Any) -> None:
        if self._serving is not None:
            self._serving.batch_started(batch)

    def _batch_end(self) -> None:
        if self._serving is not None:
            self._serving.batch_ended()

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch)

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    @override
    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips on_predict_end and teardown after an error or Ctrl-C: save here, never raise
        self._serving = None
        session, self.session = self.session, None
        if session is not None:
            figures = session.close()
            figures.failed = True
            report.post(figures, trainer.world_size)  # rank zero's report gets this rank's row; nobody is waited for
            self.figures = [figures]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._serves_stage(stage) or self.session is None:
            return
        session, self.session = self.session, None
        figures = session.close()  # a loop with zero batches runs no on_*_end hook
        # no collective (a rank that raised never gets here): the others leave their figures for rank zero,
        # which waits a bounded time for them
        report.post(figures, trainer.world_size)
        self.figures = report.collect(figures, world_size=trainer.world_size)
        if trainer.logger is not None:
            for row in self.figures:
                trainer.logger.log_metrics(row.metrics(prefix=f"trt_rtx/rank{row.rank}"), step=trainer.global_step)
        if self.print_table:
            table = report.table(self.figures)
            info(f"TensorRT-RTX serving ({self.settings.cuda_graph_strategy}):\n{table}", rank=trainer.global_rank,
                 rank_zero=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "loops": list(self.loops)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # what a checkpoint says it was served with; this callback's own arguments still decide
        self.checkpoint_settings = dict(state_dict.get("settings", {}))


class TRTCudaGraphs(_LoopHooks):
    """Run the model's compiled submodules inside ``torch_tensorrt.runtime.enable_cudagraphs``.

    The scope opens when the loop starts and closes when it ends (on exception too), restoring
    torch_tensorrt's process-global CUDA-graphs mode. Calls are routed through what
    ``enable_cudagraphs`` returns, which for models with graph breaks is a whole-module wrapper: the
    attribute holding the compiled model is swapped for the loop and put back afterwards. With
    :class:`TRTRuntimeSettings` (or :class:`~lightning_trt_rtx.TRTRuntimePrecision`) in the same
    Trainer, settings are applied outside the graphs in either callback order; under
    ``whole_graph_capture`` the engines of a wrapped (graph-break) model leave the capture to the
    wrapper for the loop. Targets with and without graph breaks each run their own graph (see
    :mod:`lightning_trt_rtx.graphs`); ``graphs`` (and the settings callback's ``figures[i].graphs``)
    says what each target ran, read at its first call in the loop::

        trainer = Trainer(callbacks=[TRTCudaGraphs(), TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture")])

    Args:
        targets: names of the LightningModule attributes that hold compiled models; by default every
            child module with TensorRT engines (and every MutableTorchTensorRTModule attribute).
        loops: the loops to serve: ``"predict"`` (default), ``"validate"``, ``"test"``.
    """

    def __init__(self, targets: list[str] | None = None, loops: Sequence[Loop] = ("predict",)) -> None:
        self.targets = check_targets(targets)
        self.loops = _check_loops(loops)
        self.graphs = ""  # what each target ran in the last loop, read at its first call (as figures.graphs)
        self._scopes: GraphScopes | None = None  # graphs alone, without a settings session

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        session = trainer_session(trainer)
        if session is not None and not session.closed:
            session.serve(pl_module)
            session.open_graphs(self.targets)
        elif self._scopes is None:
            scopes = GraphScopes(pl_module, self.targets, rank=trainer.global_rank)
            scopes.open()
            self._scopes = scopes

    def _close(self, trainer: Trainer) -> None:
        session = trainer_session(trainer)
        if session is not None:
            session.close_graphs()
            self.graphs = session.figures.graphs or self.graphs
        if self._scopes is not None:
            scopes, self._scopes = self._scopes, None
            scopes.close()
            self.graphs = scopes.describe()

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close(trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close(trainer)


class TRTHostPredictions(Callback):
    """Collect predictions on the host without a stall per batch (use with ``return_predictions=False``).

    ``trainer.predict(..., return_predictions=True)`` copies every prediction to the host when its step
    ends and waits for the copy, so the host cannot queue the next batch while the GPU still works.
    This callback queues each prediction's copy into pinned host memory on the GPU's stream instead
    (no wait) and waits once, when the loop ends::

        collector = TRTHostPredictions()
        trainer = Trainer(callbacks=[TRTRuntimeSettings(), collector])
        trainer.predict(model, loader, return_predictions=False)
        collector.predictions     # like trainer.predict's return: a list per dataloader if several

    The predictions are pinned host tensors (the structure of each step's return is kept; non-tensor
    leaves as they are). On a CPU loop they are kept as returned.
    """

    def __init__(self) -> None:
        self.predictions: list[Any] = []
        self._copies: dict[int, transfers.HostCopies] = {}
        self._kept: dict[int, list[Any]] = {}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.predictions, self._copies, self._kept = [], {}, {}
        if trainer.predict_loop.return_predictions:
            info("TRTHostPredictions: return_predictions=True also copies every prediction to the host and waits"
                 " for it; pass return_predictions=False to trainer.predict to keep the GPU busy.",
                 rank=trainer.global_rank, rank_zero=True)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            self._kept.setdefault(dataloader_idx, []).append(outputs)
            return
        if dataloader_idx not in self._copies:
            self._copies[dataloader_idx] = transfers.HostCopies(device)
        self._copies[dataloader_idx].add(outputs)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for index, copies in self._copies.items():
            self._kept.setdefault(index, []).extend(copies.collect())
        per_loader = [self._kept.get(i, []) for i in range(max(trainer.predict_loop.num_dataloaders, 1))]
        self.predictions = per_loader[0] if len(per_loader) == 1 else per_loader
        self._copies, self._kept = {}, {}

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._copies, self._kept = {}, {}
