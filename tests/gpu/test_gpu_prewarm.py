"""Prewarm against real TensorRT-RTX engines (``pytest -m gpu``): the goal of issue 13, item 3.

A program with a dynamic batch is prewarmed by the command line (``python -m lightning_trt_rtx prewarm``)
in one process, which fills this GPU's cache file. A fresh process then loads that file (``warm``),
prewarms the same shapes in-process (kernels from the cache), and times the first real call at every
prewarmed shape against that shape's steady time, calls going round the shapes as a mixed-shape job's
would. The goal: every first call within 2x of its steady time.

This module is also the fresh process: ``python -m tests.gpu.test_gpu_prewarm PROGRAM TEMPLATE SHAPE...``
prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import run_if

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = ("1x3x64x64", "16x3x64x64", "64x3x64x64")
STEADY_ROUNDS = 30


class DynamicConv(torch.nn.Module):
    """Convolutions over a dynamic batch of 64x64 images: kernels specialize per batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def dynamic_program(tmp_path_factory) -> str:
    """DynamicConv compiled for batches 1..64 and saved with torch_tensorrt.save."""
    import torch_tensorrt

    torch.manual_seed(0)
    spec = torch_tensorrt.Input(
        min_shape=(1, 3, 64, 64), opt_shape=(16, 3, 64, 64), max_shape=(64, 3, 64, 64), dtype=torch.float32, name="x"
    )
    compiled = torch_tensorrt.compile(DynamicConv().cuda().eval(), ir="dynamo", inputs=[spec], min_block_size=1)
    path = str(tmp_path_factory.mktemp("program") / "dynamic.ep")
    torch_tensorrt.save(compiled, path, arg_inputs=[spec])
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)),
    )


@run_if(min_cuda_gpus=1, rtx=True)
def test_after_prewarm_the_first_call_at_every_shape_is_within_2x_of_steady(dynamic_program, tmp_path):
    template = str(tmp_path / "caches" / "gpu-{gpu}.bin")
    args = [a for shape in SHAPES for a in ("--shape", shape)]
    cli = _run("-m", "lightning_trt_rtx", "prewarm", dynamic_program, *args, "--cache", template, "--device", "0")
    assert cli.returncode == 0, f"{cli.stdout}\n{cli.stderr}"
    lines = cli.stdout.splitlines()
    cold_ms = {line.split(":")[0]: float(line.split()[3]) for line in lines if "first call" in line}
    assert set(cold_ms) == set(SHAPES), lines
    assert lines[-1].startswith("saved ") and "bytes of GPU" in lines[-1], lines

    proc = _run("-m", "tests.gpu.test_gpu_prewarm", dynamic_program, template, *SHAPES)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    print(f"\n[{row['device']}] command line, cold (ms): {cold_ms}")
    print(f"fresh process: cache {row['cache_source']} ({row['cache_bytes']} bytes loaded),"
          f" prewarm (ms) {row['prewarm_ms']}, first call (ms) {row['first_ms']}, steady (ms) {row['steady_ms']}")
    assert row["cache_source"] == "warm" and row["cache_bytes"] > 0
    assert row["prewarmed"] == len(SHAPES)
    assert sum(row["prewarm_ms"].values()) < sum(cold_ms.values()) / 2  # the kernels came from the file
    first, steady = row["first_ms"], row["steady_ms"]
    slow = {s: (first[s], steady[s]) for s in SHAPES if first[s] > 2 * steady[s]}
    assert not slow, f"first call above 2x steady (first, steady ms): {slow}"


def worker(program_path: str, template: str, shapes: list[str]) -> dict:
    """The fresh process: serve with the cache, prewarm in-process, time first and steady calls per shape."""
    from lightning_trt_rtx import ServingSession, TRTSettings, load_program
    from lightning_trt_rtx.prewarm import example_inputs

    program = load_program(program_path)
    examples = dict(zip(shapes, example_inputs(shapes, "float32", "cuda")))
    with ServingSession(program, TRTSettings(runtime_cache=template)) as session:
        records = session.prewarm(list(examples.values()))
        first = {shape: _timed(program, x) for shape, x in examples.items()}
        calls: dict[str, list[float]] = {shape: [] for shape in shapes}
        for _ in range(STEADY_ROUNDS):  # round the shapes, as a job with mixed batch sizes would
            for shape, x in examples.items():
                calls[shape].append(_timed(program, x))
    figures = session.figures
    return {
        "device": torch.cuda.get_device_name(),
        "cache_source": figures.cache_source,
        "cache_bytes": figures.cache_bytes,
        "prewarmed": figures.prewarmed,
        "prewarm_ms": {r.text: r.first_call_ms for r in records},
        "first_ms": first,
        "steady_ms": {shape: statistics.median(times) for shape, times in calls.items()},
    }


def _timed(program: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        program(*example)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], sys.argv[2], sys.argv[3:])))
