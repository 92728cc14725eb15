"""A Precision plugin that serves TensorRT-RTX engines and is the precision it wraps (plugins=[...] users)."""

from __future__ import annotations

import logging
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator, MPSAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from typing_extensions import override

from lightning_trt_rtx import _predict_loop
from lightning_trt_rtx._messages import info, warn
from lightning_trt_rtx.prewarm import PrewarmSpec
from lightning_trt_rtx.session import ServingSession, trainer_session
from lightning_trt_rtx.settings import DEFAULT_CACHE, CudaGraphStrategy, KernelStrategy, TRTSettings, check_flag

log = logging.getLogger(__name__)

PrecisionName = Literal["32-true", "16-mixed", "bf16-mixed"]
_PRECISIONS: tuple[str, ...] = get_args(PrecisionName)


def _wrapped_class(precision: Any) -> type[Precision]:
    """The class of the precision ``TRTRuntimePrecision(precision)`` is: Lightning's for a name, the
    instance's own for a Precision instance."""
    if isinstance(precision, TRTRuntimePrecision):
        raise TypeError("TRTRuntimePrecision cannot wrap another TRTRuntimePrecision.")
    if isinstance(precision, Precision):
        return type(precision)
    if isinstance(precision, str) and precision in _PRECISIONS:
        return Precision if precision == "32-true" else MixedPrecision
    raise ValueError(
        f"Invalid precision {precision!r}. Valid choices: {list(_PRECISIONS)} or a Precision plugin instance."
    )


_COMPOSED: dict[tuple[type, type], type] = {}


def _compose(base: type[TRTRuntimePrecision], wrapped: type[Precision]) -> type[TRTRuntimePrecision]:
    """``base`` (TRTRuntimePrecision or a subclass) on top of ``wrapped``: one class per pair.

    Its ``__qualname__`` is the wrapped class's: Lightning files a precision's state (a GradScaler's) in
    checkpoints under that name, so checkpoints move between ``Trainer(precision=...)`` and the plugin.
    """
    if issubclass(base, wrapped):
        return base
    composed = _COMPOSED.get((base, wrapped))
    if composed is None:
        namespace = {
            "__module__": base.__module__,
            "__qualname__": wrapped.__qualname__,
            "__doc__": base.__doc__,
            "_composed": True,
            "_wrapped": wrapped,
        }
        composed = type(f"{base.__name__}[{wrapped.__name__}]", (base, wrapped), namespace)
        _COMPOSED[(base, wrapped)] = composed
    return composed


def _base(cls: type[TRTRuntimePrecision]) -> type[TRTRuntimePrecision]:
    """The class a composed class was made from: TRTRuntimePrecision or the user's subclass of it."""
    return cls.__bases__[0] if cls.__dict__.get("_composed") else cls


def _unpickle(base: type[TRTRuntimePrecision], wrapped: type[Precision]) -> TRTRuntimePrecision:
    """An empty instance of ``base`` on top of ``wrapped`` (pickle then restores its state)."""
    return object.__new__(_compose(base, wrapped))


class TRTRuntimePrecision(Precision):
    """Serves the model's TensorRT-RTX engines and IS the precision you would otherwise use.

    ``TRTRuntimePrecision("bf16-mixed", ...)`` is an instance of a subclass of both this class and
    Lightning's ``MixedPrecision`` (``"32-true"``: ``Precision``; a Precision instance: that instance's
    class, with its state), built for the Trainer's accelerator as ``Trainer(precision=...)`` would. So
    Lightning sees the precision it wraps: ``trainer.precision``, ``trainer.scaler``, ``ThroughputMonitor``'s
    dtype, a strategy's precision check (``TRTRuntimePrecision(FSDPPrecision("bf16-mixed"))`` for FSDP)
    and checkpoints (its state is filed under the wrapped class's name)::

        trainer = Trainer(plugins=[TRTRuntimePrecision("bf16-mixed", cuda_graph_strategy="whole_graph_capture")])

    Settings and this GPU's kernel cache are applied in ``convert_module`` (the earliest point where
    the model and its engines exist, before anything runs) and the cache is saved in ``teardown``,
    which Lightning runs on success and after exceptions; everything else is the wrapped precision's.

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

    serves_runs = True  # owns its run's session when no callback does (see session.trainer_session)
    _composed = False
    _wrapped: type[Precision] = Precision

    def __init__(
        self,
        precision: PrecisionName | Precision = "32-true",
        cuda_graph_strategy: CudaGraphStrategy = "disabled",
        dynamic_shapes_kernel_specialization_strategy: KernelStrategy = "lazy",
        runtime_cache: str | None = DEFAULT_CACHE,
        prewarm_shapes: list[str] | None = None,
        prewarm_dtype: str = "float16",
        prewarm_target: str | None = None,
        upload_ahead: bool = True,
    ) -> None:
        check_flag("upload_ahead", upload_ahead)
        wrapped = _wrapped_class(precision)
        prewarm_spec = PrewarmSpec.from_args(prewarm_shapes, prewarm_dtype, prewarm_target)
        settings = TRTSettings(
            cuda_graph_strategy=cuda_graph_strategy,
            dynamic_shapes_kernel_specialization_strategy=dynamic_shapes_kernel_specialization_strategy,
            runtime_cache=runtime_cache,
        )
        # this object becomes an instance of the wrapped class too (a factory in __new__ would hide
        # these typed arguments from LightningCLI, which reads a class's __new__ before its __init__)
        self.__class__ = _compose(_base(type(self)), wrapped)
        if isinstance(precision, Precision):
            self.__dict__.update(vars(precision))  # the instance's state (its scaler, device, config ...)
        self.prewarm_spec, self.settings, self.upload_ahead = prewarm_spec, settings, upload_ahead
        self._trainer: Trainer | None = None  # the Trainer of this plugin's own run
        self.session: ServingSession | None = None  # this plugin's own run, when no callback serves it
        self._prewarmed: ServingSession | None = None
        # a precision given by name is built again for the Trainer's accelerator, known at convert_module
        self._name = precision if isinstance(precision, str) else None
        self._device = "cuda" if torch.cuda.is_available() else "cpu"  # until then, a guess
        self._init_wrapped()

    def _init_wrapped(self) -> None:
        """The wrapped precision's own ``__init__``, as ``Trainer(precision=self._name)`` on ``self._device``."""
        name = self._name
        if name is None or name == "32-true":
            return
        if name == "16-mixed" and self._device == "cpu":
            warn(
                "TRTRuntimePrecision('16-mixed') on a CPU Trainer: AMP with fp16 is not supported on CPU. Using"
                " 'bf16-mixed' instead, as Trainer(precision='16-mixed') does.",
                rank_zero=True,
                once=True,
            )
            name = "bf16-mixed"
        MixedPrecision.__init__(self, name, device=self._device)  # type: ignore[arg-type]

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpickle, (_base(type(self)), type(self)._wrapped), self.__dict__

    def __repr__(self) -> str:
        settings = getattr(self, "settings", None)
        return f"TRTRuntimePrecision({type(self)._wrapped.__name__}({self.precision!r}), {settings})"

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        trainer = _trainer_of(module)
        if trainer is not None and self._name is not None and _autocast_device(trainer) != self._device:
            # built again only when the guess was wrong: a second fit keeps the precision's state
            self._device = _autocast_device(trainer)
            self._init_wrapped()
        converted = super().convert_module(module)
        # DDP ignores the return value: the settings go onto the engines in place
        callback_session = trainer_session(trainer) if trainer is not None else None
        if callback_session is not None and callback_session is not self.session:
            _check_agrees(callback_session, self)
            if self.prewarm_spec is not None:  # the callback prewarms at its loop's start
                callback_session.prewarm_spec = self.prewarm_spec
            callback_session.serve(module)  # the callback's run: it saves and reports
            return converted
        if self.session is not None:
            self.session.close()
        self.session = (
            ServingSession.for_trainer(trainer, self.settings) if trainer is not None
            else ServingSession(settings=self.settings)
        )
        self._trainer = trainer
        self.session.serve(module)
        return converted

    @override
    def teardown(self) -> None:
        try:
            session, self.session, self._prewarmed, self._trainer = self.session, None, None, None
            if session is not None:
                figures = session.close()
                info(figures.summary(), rank=session.ranks.rank, rank_zero=True)
        except Exception as err:  # teardown also runs after the user's exception: never mask it
            warn(f"Closing the TensorRT-RTX serving session failed: {err}", logger=log.name)
        finally:
            super().teardown()

    # --- prewarm: the first step of a loop is the first point the model is on its device ----------

    def _prewarm(self) -> None:
        session = self.session  # with the callback, its session serves the run and it prewarms at loop start
        if self.prewarm_spec is None or session is None or session.module is None or self._prewarmed is session:
            return
        self._prewarmed = session  # tried once per session (a skipped prewarm is not tried at every step)
        self.prewarm_spec.run(session, session.module)

    @contextmanager
    def _step(self) -> Generator[None, None, None]:
        """Prewarm before the first step; under ``"auto"``, each validation or test step is a batch of its
        loop's trial, the loop started at its first step with Lightning's batch count (predict steps are
        timed by :meth:`_own_predict_step`'s loop; with the callback, the callback's session times the
        batches). A loop ends at the next training step (:meth:`train_step_context`) or at teardown."""
        self._prewarm()
        session = self.session if self.session is not None and self.session.auto is not None else None
        if session is not None:
            if not session.looping and self._trainer is not None:
                _predict_loop.start_loop(session, self._trainer)
            elif not session.looping:  # served outside a Trainer: a loop of unknown length
                session.loop_started()
            session.batch_started()
        yield
        if session is not None:
            session.batch_ended()

    def _own_predict_step(self) -> ServingSession | None:
        """This plugin's own session in a predict loop (no callback serving it): on the loop's first
        step, batches from the next one on are uploaded ahead and the loop is timed."""
        session, trainer = self.session, self._trainer
        if session is None or trainer is None or session.closed or not trainer.predicting:
            return None
        if not session.looping:
            _predict_loop.upload_batches(trainer, session, self.upload_ahead)
            _predict_loop.start_loop(session, trainer)
        return session

    @override
    @contextmanager
    def predict_step_context(self) -> Generator[None, None, None]:
        self._prewarm()
        session = self._own_predict_step()
        if session is not None:
            session.batch_started()
        with super().predict_step_context():
            yield
        if session is not None:
            session.batch_ended()

    @override
    @contextmanager
    def train_step_context(self) -> Generator[None, None, None]:
        # inside fit, a validation loop has ended once training steps again: its trial's window closes
        if self.session is not None and self.session.looping:
            self.session.loop_ended()
        with super().train_step_context():
            yield

    @override
    @contextmanager
    def val_step_context(self) -> Generator[None, None, None]:
        with self._step(), super().val_step_context():
            yield

    @override
    @contextmanager
    def test_step_context(self) -> Generator[None, None, None]:
        with self._step(), super().test_step_context():
            yield


def _check_agrees(callback: ServingSession, plugin: TRTRuntimePrecision) -> None:
    """The callback's session serves the run with its settings, prewarm and uploads: the plugin's must be the
    same (prewarm and uploads where both were given)."""
    differ = []
    if callback.settings != plugin.settings:
        differ.append(f"settings {callback.settings} vs {plugin.settings}")
    if None not in (callback.prewarm_spec, plugin.prewarm_spec) and callback.prewarm_spec != plugin.prewarm_spec:
        differ.append(f"prewarm {callback.prewarm_spec} vs {plugin.prewarm_spec}")
    if callback.upload_ahead_wanted is not None and callback.upload_ahead_wanted != plugin.upload_ahead:
        differ.append(f"upload_ahead {callback.upload_ahead_wanted} vs {plugin.upload_ahead}")
    if differ:
        raise ValueError(
            "TRTRuntimeSettings and TRTRuntimePrecision configure the same model differently ("
            + "; ".join(differ)
            + "). Configure it in one place: either the TRTRuntimeSettings callback or the TRTRuntimePrecision"
            " plugin."
        )


def _trainer_of(module: torch.nn.Module) -> Trainer | None:
    """The Trainer ``module`` is attached to (``LightningModule.trainer``), None outside a Trainer."""
    if not isinstance(module, LightningModule):
        return None
    try:
        trainer = module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None
    return trainer if isinstance(trainer, Trainer) else None


def _autocast_device(trainer: Trainer) -> str:
    """The autocast device Lightning's own connector picks: the accelerator's, ``cuda`` for GPUs."""
    accelerator = trainer.accelerator
    if isinstance(accelerator, CPUAccelerator):
        return "cpu"
    return "mps" if isinstance(accelerator, MPSAccelerator) else "cuda"
