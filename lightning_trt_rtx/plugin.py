"""A Precision plugin that serves TensorRT-RTX engines, for users who configure runtime via plugins."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.accelerators import CPUAccelerator, MPSAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from typing_extensions import override

from lightning_trt_rtx._messages import info, warn
from lightning_trt_rtx.prewarm import PrewarmSpec
from lightning_trt_rtx.session import ServingSession
from lightning_trt_rtx.settings import DEFAULT_CACHE, CudaGraphStrategy, KernelStrategy, TRTSettings

log = logging.getLogger(__name__)

PrecisionName = Literal["32-true", "16-mixed", "bf16-mixed"]
_PRECISIONS: tuple[str, ...] = get_args(PrecisionName)


def _inner_precision(precision: str | Precision, device: str) -> Precision:
    """The precision plugin Lightning would build for ``Trainer(precision=...)`` on ``device``."""
    if isinstance(precision, Precision):
        if isinstance(precision, TRTRuntimePrecision):
            raise TypeError("TRTRuntimePrecision cannot wrap another TRTRuntimePrecision.")
        return precision
    if precision == "32-true":
        return Precision()
    if precision in ("16-mixed", "bf16-mixed"):
        if precision == "16-mixed" and device == "cpu":
            warn(
                "TRTRuntimePrecision('16-mixed') on a CPU Trainer: AMP with fp16 is not supported on CPU. Using"
                " 'bf16-mixed' instead, as Trainer(precision='16-mixed') does.",
                rank_zero=True,
                once=True,
            )
            precision = "bf16-mixed"
        return MixedPrecision(precision, device=device)  # type: ignore[arg-type]
    raise ValueError(
        f"Invalid precision {precision!r}. Valid choices: {list(_PRECISIONS)} or a Precision plugin instance."
    )


class TRTRuntimePrecision(Precision):
    """Wraps the precision you would otherwise use and serves the model's TensorRT-RTX engines.

    Settings and this GPU's kernel cache are applied in ``convert_module`` (the earliest point where
    the model and its engines exist, before anything runs) and the cache is saved in ``teardown``,
    which Lightning runs on success and after exceptions. Everything else is the wrapped precision's,
    built for the Trainer's accelerator as ``Trainer(precision=...)`` would::

        trainer = Trainer(plugins=[TRTRuntimePrecision("bf16-mixed", cuda_graph_strategy="whole_graph_capture")])

    With the :class:`~lightning_trt_rtx.TRTRuntimeSettings` callback in the same Trainer, the
    callback's session serves the run (settings applied and the cache saved once, one report); the
    two must be given equal settings.

    Args:
        precision: ``"32-true"`` (default), ``"16-mixed"``, ``"bf16-mixed"`` or a Precision instance.
        cuda_graph_strategy: ``"disabled"``, ``"whole_graph_capture"`` or ``"auto"`` (see ``TRTRuntimeSettings``;
            the plugin times its steps, and without a batch to read, one trial decides for the run).
        dynamic_shapes_kernel_specialization_strategy: ``"lazy"``, ``"eager"`` or ``"none"``.
        runtime_cache: kernel-cache path template, ``"default"`` or ``None`` (see ``TRTSettings``).
        prewarm_shapes, prewarm_dtype, prewarm_target: as for ``TRTRuntimeSettings``: input shapes to
            compile this GPU's kernels for before the first step (the plugin has no loop-start hook: it
            prewarms as the first predict, validation or test step starts, on the model's device).
    """

    def __init__(
        self,
        precision: PrecisionName | Precision = "32-true",
        cuda_graph_strategy: CudaGraphStrategy = "disabled",
        dynamic_shapes_kernel_specialization_strategy: KernelStrategy = "lazy",
        runtime_cache: str | None = DEFAULT_CACHE,
        prewarm_shapes: list[str] | None = None,
        prewarm_dtype: str = "float16",
        prewarm_target: str | None = None,
    ) -> None:
        super().__init__()
        self.prewarm_spec = PrewarmSpec.from_args(prewarm_shapes, prewarm_dtype, prewarm_target)
        self._requested = precision
        # the device is the Trainer's accelerator's, known at convert_module; until then, a guess
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self.inner = _inner_precision(precision, self._device)
        self.precision = self.inner.precision
        self.settings = TRTSettings(
            cuda_graph_strategy=cuda_graph_strategy,
            dynamic_shapes_kernel_specialization_strategy=dynamic_shapes_kernel_specialization_strategy,
            runtime_cache=runtime_cache,
        )
        self.session: ServingSession | None = None  # this plugin's own run, when no callback serves it

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from lightning_trt_rtx.callbacks import serving_session

        trainer = getattr(module, "_trainer", None)
        if trainer is not None and isinstance(self._requested, str) and _autocast_device(trainer) != self._device:
            # rebuilt only when the guess was wrong: a second fit keeps the wrapped precision's state
            self._device = _autocast_device(trainer)
            self.inner = _inner_precision(self._requested, self._device)
            self.precision = self.inner.precision
        converted = self.inner.convert_module(module)
        # DDP ignores the return value: the settings go onto the engines in place
        callback_session = serving_session(trainer) if trainer is not None else None
        if callback_session is not None and callback_session is not self.session:
            callback_session.serve(module)  # the callback's run: it saves and reports
            return converted
        if self.session is not None:
            self.session.close()
        self.session = (
            ServingSession.for_trainer(trainer, self.settings) if trainer is not None
            else ServingSession(settings=self.settings)
        )
        self.session.serve(module)
        return converted

    @override
    def teardown(self) -> None:
        try:
            session, self.session = self.session, None
            if session is not None:
                figures = session.close()
                info(figures.summary(), rank=session.ranks.rank, rank_zero=True)
        except Exception as err:  # teardown also runs after the user's exception: never mask it
            log.warning("Closing the TensorRT-RTX serving session failed: %s", err)
        finally:
            self.inner.teardown()

    # --- prewarm: the first step of a loop is the first point the model is on its device ----------

    def _prewarm(self) -> None:
        session = self.session  # with the callback, its session serves the run and it prewarms at loop start
        if self.prewarm_spec is not None and session is not None and session.module is not None:
            self.prewarm_spec.run(session, session.module)  # once per session

    @contextmanager
    def _step(self) -> Generator[None, None, None]:
        """Prewarm before the first step; under ``"auto"``, each step is a batch of its trial (with the
        callback, the callback's session times the batches)."""
        self._prewarm()
        session = self.session if self.session is not None and self.session.auto is not None else None
        if session is not None:
            session.batch_started()
        yield
        if session is not None:
            session.batch_ended()

    @contextmanager
    def predict_step_context(self) -> Generator[None, None, None]:
        with self._step(), super().predict_step_context():
            yield

    @contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        with self._step(), super().val_step_context():
            yield

    @contextmanager
    def test_step_context(self) -> Generator[None, None, None]:
        with self._step(), super().test_step_context():
            yield

    # --- everything else is the wrapped precision's ---------------------------------------------

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return self.inner.tensor_init_context()

    def module_init_context(self) -> AbstractContextManager:
        return self.inner.module_init_context()

    def forward_context(self) -> AbstractContextManager:
        return self.inner.forward_context()

    def convert_input(self, data: Any) -> Any:
        return self.inner.convert_input(data)

    def convert_output(self, data: Any) -> Any:
        return self.inner.convert_output(data)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def pre_backward(self, tensor: Any, module: Any) -> Any:
        return self.inner.pre_backward(tensor, module)

    def backward(self, tensor: Any, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        self.inner.backward(tensor, model, optimizer, *args, **kwargs)

    def post_backward(self, tensor: Any, module: Any) -> Any:
        return self.inner.post_backward(tensor, module)

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self.inner.optimizer_step(optimizer, model, closure, **kwargs)

    def clip_gradients(self, optimizer: Any, clip_val: Any = 0.0, gradient_clip_algorithm: Any = None) -> None:
        algorithm = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
        self.inner.clip_gradients(optimizer, clip_val, **algorithm)


def _autocast_device(trainer: Any) -> str:
    """The autocast device Lightning's own connector picks: the accelerator's, ``cuda`` for GPUs."""
    accelerator = trainer.accelerator
    if isinstance(accelerator, CPUAccelerator):
        return "cpu"
    return "mps" if isinstance(accelerator, MPSAccelerator) else "cuda"
