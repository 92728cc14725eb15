"""TensorRT-RTX runtime settings, scoped CUDA graphs and a per-GPU kernel cache for PyTorch Lightning.

The public names are imported on first use (PEP 562), so ``python -m lightning_trt_rtx cache ...``
starts without importing torch or Lightning.
"""

from typing import TYPE_CHECKING, Any

from lightning_trt_rtx import _messages

__version__ = "0.2.0"
__all__ = [
    "load_program",
    "ServingSession",
    "TRTCudaGraphs",
    "TRTHostPredictions",
    "TRTRuntimePrecision",
    "TRTRuntimeSettings",
    "TRTSettings",
]

_messages.install()

_WHERE = {
    "load_program": "lightning_trt_rtx._backend",
    "ServingSession": "lightning_trt_rtx.session",
    "TRTCudaGraphs": "lightning_trt_rtx.callbacks",
    "TRTHostPredictions": "lightning_trt_rtx.callbacks",
    "TRTRuntimeSettings": "lightning_trt_rtx.callbacks",
    "TRTRuntimePrecision": "lightning_trt_rtx.plugin",
    "TRTSettings": "lightning_trt_rtx.settings",
}

if TYPE_CHECKING:
    from lightning_trt_rtx._backend import load_program
    from lightning_trt_rtx.callbacks import TRTCudaGraphs, TRTHostPredictions, TRTRuntimeSettings
    from lightning_trt_rtx.plugin import TRTRuntimePrecision
    from lightning_trt_rtx.session import ServingSession
    from lightning_trt_rtx.settings import TRTSettings


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lightning_trt_rtx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
