"""A Precision plugin that serves TensorRT-RTX engines, for users who configure runtime via plugins."""

from __future__ import annotations

import logging
import weakref
from contextlib import AbstractContextManager
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_trt_rtx import report
from lightning_trt_rtx.session import ServingSession
from lightning_trt_rtx.settings import DEFAULT_CACHE, TRTSettings

log = logging.getLogger(__name__)

_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")


def _inner_precision(precision: Union[str, Precision]) -> Precision:
    if isinstance(precision, Precision):
        if isinstance(precision, TRTRuntimePrecision):
            raise TypeError("TRTRuntimePrecision cannot wrap another TRTRuntimePrecision.")
        return precision
    if precision == "32-true":
        return Precision()
    if precision in ("16-mixed", "bf16-mixed"):
        return MixedPrecision(precision, device="cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(
        f"Invalid precision {precision!r}. Valid choices: {list(_PRECISIONS)} or a Precision plugin instance."
    )


class TRTRuntimePrecision(Precision):
    """Wraps the precision you would otherwise use and serves the model's TensorRT-RTX engines.

    Settings and the shared kernel cache are applied in ``convert_module`` (the earliest point where
    the model and its engines exist, before anything runs) and the cache is saved in ``teardown``,
    which Lightning runs on success and after exceptions. Everything else is the wrapped precision's::

        trainer = Trainer(plugins=[TRTRuntimePrecision("bf16-mixed", cuda_graph_strategy="whole_graph_capture")])

    With the :class:`~lightning_trt_rtx.TRTRuntimeSettings` callback in the same Trainer the two share
    one session: settings are applied and the cache saved once (their settings must agree).

    Args:
        precision: ``"32-true"`` (default), ``"16-mixed"``, ``"bf16-mixed"`` or a Precision instance.
        cuda_graph_strategy: ``"disabled"`` or ``"whole_graph_capture"``.
        dynamic_shapes_kernel_specialization_strategy: ``"lazy"``, ``"eager"`` or ``"none"``.
        runtime_cache: kernel-cache path template, or ``None`` (see ``TRTSettings``).
    """

    def __init__(
        self,
        precision: Union[Literal["32-true", "16-mixed", "bf16-mixed"], Precision] = "32-true",
        cuda_graph_strategy: Literal["disabled", "whole_graph_capture"] = "disabled",
        dynamic_shapes_kernel_specialization_strategy: Literal["lazy", "eager", "none"] = "lazy",
        runtime_cache: Optional[str] = DEFAULT_CACHE,
    ) -> None:
        super().__init__()
        self.inner = _inner_precision(precision)
        self.precision = self.inner.precision
        self.settings = TRTSettings(
            cuda_graph_strategy=cuda_graph_strategy,
            dynamic_shapes_kernel_specialization_strategy=dynamic_shapes_kernel_specialization_strategy,
            runtime_cache=runtime_cache,
        )
        self._module: Optional["weakref.ref[torch.nn.Module]"] = None

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        converted = self.inner.convert_module(module)
        # DDP ignores the return value: the settings go onto the engines in place
        session = ServingSession.of(module)
        session.configure(self.settings, type(self).__name__, getattr(module, "_trainer", None))
        session.attach()
        self._module = weakref.ref(module)
        return converted

    def teardown(self) -> None:
        try:
            module = self._module() if self._module is not None else None
            # the callback, when present, has closed the session already and reports the figures
            if module is not None and ServingSession.of(module).close():
                figures = ServingSession.of(module).figures
                rank_zero_info(
                    f"TensorRT-RTX serving: {figures.engines} engine(s), kernel cache {figures.cache_source}"
                    f" ({report.format_bytes(figures.cache_bytes)} loaded, {report.format_bytes(figures.saved_bytes)}"
                    f" saved) {figures.cache_path}"
                )
        except Exception as err:  # teardown also runs after the user's exception: never mask it
            log.warning("Closing the TensorRT-RTX serving session failed: %s", err)
        finally:
            self.inner.teardown()

    # --- everything else is the wrapped precision's ---------------------------------------------

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

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        return self.inner.optimizer_step(optimizer, model, closure, **kwargs)

    def clip_gradients(self, optimizer: Any, clip_val: Any = 0.0, gradient_clip_algorithm: Any = None) -> None:
        algorithm = {} if gradient_clip_algorithm is None else {"gradient_clip_algorithm": gradient_clip_algorithm}
        self.inner.clip_gradients(optimizer, clip_val, **algorithm)
