"""Lightning callbacks: TensorRT-RTX runtime settings and a shared kernel cache, and scoped CUDA graphs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal, Optional, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_trt_rtx import report
from lightning_trt_rtx.session import ServingSession
from lightning_trt_rtx.settings import DEFAULT_CACHE, TRTSettings

log = logging.getLogger(__name__)

Loop = Literal["predict", "validate", "test"]
_LOOPS = ("predict", "validate", "test")


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

    def on_predict_start(self, trainer, pl_module):  # noqa: D102
        self._hook(trainer, pl_module, "_start")

    def on_validation_start(self, trainer, pl_module):  # noqa: D102
        self._hook(trainer, pl_module, "_start")

    def on_test_start(self, trainer, pl_module):  # noqa: D102
        self._hook(trainer, pl_module, "_start")

    def on_predict_end(self, trainer, pl_module):  # noqa: D102
        self._hook(trainer, pl_module, "_end")

    def on_validation_end(self, trainer, pl_module):  # noqa: D102
        self._hook(trainer, pl_module, "_end")

    def on_test_end(self, trainer, pl_module):  # noqa: D102
        self._hook(trainer, pl_module, "_end")


class TRTRuntimeSettings(_LoopHooks):
    """Serve every TensorRT-RTX engine of the model with runtime settings and a per-rank kernel cache.

    Settings reach each engine before its first execute (one execution context per engine), the
    kernel cache is loaded before the first batch and saved when the loop ends, also after an
    exception or Ctrl-C, and every engine gets its prior settings back afterwards::

        trainer = Trainer(callbacks=[TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture")])
        trainer.predict(model, dataloader)

    Args:
        cuda_graph_strategy: ``"disabled"`` or ``"whole_graph_capture"``.
        dynamic_shapes_kernel_specialization_strategy: ``"lazy"``, ``"eager"`` or ``"none"``.
        runtime_cache: kernel-cache path template (placeholders ``{rank}``, ``{local_rank}``,
            ``{node_rank}``, ``{world_size}``, ``{sm}``, ``{trt}``, ``{cuda}``, ``{host}``; fsspec URLs
            work), or ``None`` for no cache. The default is one file per global rank under
            ``~/.cache/lightning-trt-rtx`` (``$LIGHTNING_TRT_RTX_CACHE_DIR``), keyed by GPU and versions.
        loops: the loops to serve: ``"predict"`` (default), ``"validate"``, ``"test"``.
        print_table: print every rank's figures as one table on rank zero when serving ends.
    """

    def __init__(
        self,
        cuda_graph_strategy: Literal["disabled", "whole_graph_capture"] = "disabled",
        dynamic_shapes_kernel_specialization_strategy: Literal["lazy", "eager", "none"] = "lazy",
        runtime_cache: Optional[str] = DEFAULT_CACHE,
        loops: Sequence[Loop] = ("predict",),
        print_table: bool = True,
    ) -> None:
        self.settings = TRTSettings(
            cuda_graph_strategy=cuda_graph_strategy,
            dynamic_shapes_kernel_specialization_strategy=dynamic_shapes_kernel_specialization_strategy,
            runtime_cache=runtime_cache,
        )
        self.loops = _check_loops(loops)
        self.print_table = print_table
        self.figures: list[report.RankFigures] = []
        self._serving: Optional[ServingSession] = None
        self.checkpoint_settings: Optional[dict[str, Any]] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._serves_stage(stage):
            return
        session = ServingSession.of(pl_module)
        session.configure(self.settings, type(self).__name__, trainer)
        # engines that exist now get their settings before any context is created; no warning yet,
        # configure_model (which runs after this hook) may still create them
        session.attach(warn_if_none=False)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        session = ServingSession.of(pl_module)
        session.configure(self.settings, type(self).__name__, trainer)
        session.attach()  # engines made in configure_model / reset by a checkpoint restore
        session.open_graphs()
        session.loop_started()
        self._serving = session  # the per-batch hooks below are on the hot path: no lookups there

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._serving = None
        session = ServingSession.of(pl_module)
        session.loop_ended()
        if trainer.state.fn != TrainerFn.FITTING:
            session.close()
        # inside fit the validation loop comes back every epoch: the engines keep their settings
        # (and execution contexts) until teardown saves and restores once

    # --- per batch: one attribute test when not serving, a timestamp when serving -----------------

    def _batch_start(self) -> None:
        if self._serving is not None:
            self._serving.batch_started()

    def _batch_end(self) -> None:
        if self._serving is not None:
            self._serving.batch_ended()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        self._batch_start()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        self._batch_start()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        self._batch_start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        self._batch_end()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        self._batch_end()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        self._batch_end()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips on_predict_end and teardown after an error or Ctrl-C: save here, never raise
        self._serving = None
        try:
            ServingSession.of(pl_module).close()
        except Exception as err:
            log.warning("Closing the TensorRT-RTX serving session after %r failed: %s", exception, err)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self._serves_stage(stage):
            return
        session = ServingSession.of(pl_module)
        session.close()  # a loop with zero batches runs no on_*_end hook
        # every rank reaches teardown once, whatever its batch count: the one place to gather
        self.figures = report.gather(session.figures)
        if trainer.logger is not None:
            for row in self.figures:
                trainer.logger.log_metrics(row.metrics(prefix=f"trt_rtx/rank{row.rank}"), step=trainer.global_step)
        if self.print_table and trainer.is_global_zero:
            rank_zero_info(f"TensorRT-RTX serving ({self.settings.cuda_graph_strategy}):\n{report.table(self.figures)}")

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "loops": list(self.loops)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # what a checkpoint says it was served with; this callback's own arguments still decide
        self.checkpoint_settings = dict(state_dict.get("settings", {}))


class TRTCudaGraphs(_LoopHooks):
    """Run the model's compiled submodules inside ``torch_tensorrt.runtime.enable_cudagraphs``.

    The scope opens when the loop starts and closes when it ends (on exception too), restoring
    torch_tensorrt's process-global CUDA-graphs mode. Calls are routed through what
    ``enable_cudagraphs`` returns, which for models with graph breaks is a new wrapper: the
    attribute holding the compiled model is swapped for the loop and put back afterwards. With
    :class:`TRTRuntimeSettings` in the same Trainer, settings are applied outside the graphs in
    either callback order, and ``whole_graph_capture`` goes through ``enable_cudagraphs`` itself::

        trainer = Trainer(callbacks=[TRTCudaGraphs(), TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture")])

    Args:
        targets: names of the LightningModule attributes that hold compiled models; by default every
            child module with TensorRT engines (and every MutableTorchTensorRTModule attribute).
        loops: the loops to serve: ``"predict"`` (default), ``"validate"``, ``"test"``.
    """

    def __init__(self, targets: Optional[list[str]] = None, loops: Sequence[Loop] = ("predict",)) -> None:
        if targets is not None and not isinstance(targets, (str, bytes)) and isinstance(targets, Iterable):
            targets = list(targets)  # an iterator would be consumed by the check below
        if targets is not None and (
            not isinstance(targets, list) or not all(isinstance(t, str) and t.isidentifier() for t in targets)
        ):
            raise TypeError(f"targets must be a list of attribute names (identifiers) or None; got {targets!r}.")
        if targets == []:
            raise ValueError("targets is empty: name the attributes to capture, or pass None for every compiled one.")
        self.targets = list(targets) if targets is not None else None
        self.loops = _check_loops(loops)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._serves_stage(stage):
            ServingSession.of(pl_module).request_graphs(self.targets, trainer)

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ServingSession.of(pl_module).open_graphs()

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ServingSession.of(pl_module).close_graphs()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        ServingSession.of(pl_module).close_graphs()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        ServingSession.of(pl_module).close_graphs()
