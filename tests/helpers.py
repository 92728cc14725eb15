"""Test gates in the manner of Lightning's ``RunIf``."""

from __future__ import annotations

import pytest
import torch


def run_if(min_cuda_gpus: int = 0, rtx: bool = False) -> pytest.MarkDecorator:
    """Skip unless the host has ``min_cuda_gpus`` CUDA devices (and torch-tensorrt-rtx when ``rtx``)."""
    reasons = []
    if min_cuda_gpus and torch.cuda.device_count() < min_cuda_gpus:
        reasons.append(f"needs {min_cuda_gpus} CUDA GPU(s)")
    if rtx:
        from lightning_trt_rtx import _backend

        if not _backend.is_rtx_build():
            reasons.append("needs torch-tensorrt-rtx")
    marks = [pytest.mark.skipif(bool(reasons), reason=", ".join(reasons) or "ok")]
    if min_cuda_gpus:
        marks.append(pytest.mark.gpu)
    if min_cuda_gpus > 1:
        marks.append(pytest.mark.multigpu)

    def apply(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return apply
