"""Test gates in the manner of Lightning's ``RunIf``, and the runner for the example scripts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run_script(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the project root with it on PYTHONPATH, NCCL's NVLink multicast off."""
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"))
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    child_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout
    )


def explain(proc: subprocess.CompletedProcess, tail: int = 6000) -> str:
    """A failed script's exit code and the tails of its output, for an assertion message."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-tail:]}\n--- stderr\n{proc.stderr[-tail:]}"
