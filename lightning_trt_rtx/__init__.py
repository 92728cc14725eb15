"""TensorRT-RTX runtime settings, scoped CUDA graphs and a shared kernel cache for PyTorch Lightning."""

from lightning_trt_rtx._backend import load_program
from lightning_trt_rtx.callbacks import TRTCudaGraphs, TRTRuntimeSettings
from lightning_trt_rtx.plugin import TRTRuntimePrecision
from lightning_trt_rtx.settings import TRTSettings

__version__ = "0.1.0"
__all__ = ["load_program", "TRTCudaGraphs", "TRTRuntimePrecision", "TRTRuntimeSettings", "TRTSettings"]
