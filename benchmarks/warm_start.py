"""Warm start [goal <= 0.10]: first batch with this GPU's warm kernel cache over the same with an empty cache.

Each repetition is a cold process (cache files removed) then a warm process; both only load the conv
net that :func:`benchmarks.harness.task_prep` compiled and saved, so compile time is never measured.
The figure is the callback's ``first_batch_ms`` (execution-context creation and kernel JIT or cache
load included), median over repetitions. The CUDA driver's own JIT cache is off in these processes
(``CUDA_CACHE_DISABLE=1``) unless ``--driver-jit-cache``.
"""

from __future__ import annotations

import os

from benchmarks import harness


def task(spec: dict) -> dict:
    """One warm-start repetition: load the saved program, predict a few batches, report the first."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings, _backend

    cache_dir = spec["cache_dir"]
    if spec["cold"] and os.path.isdir(cache_dir):
        for name in os.listdir(cache_dir):
            os.remove(os.path.join(cache_dir, name))
    _backend.torch_tensorrt()  # import outside the timed window
    settings = TRTRuntimeSettings(runtime_cache=os.path.join(cache_dir, "gpu-{gpu}.bin"), print_table=False)
    timer = BatchTimer()
    model = CompiledPredictor("conv", spec["batch_size"], program=None if harness.dry_run() else spec["program"])
    harness.predict(model, SyntheticDataModule("conv", spec["batch_size"], spec["batches"]), [settings, timer])
    (fig,) = settings.figures
    return {
        "cold": spec["cold"],
        "first_batch_ms": fig.first_batch_ms,
        "timer_first_batch_ms": timer.first_batch_ms,
        "per_batch_ms": fig.mean_batch_ms,
        "engines": fig.engines,
        "cache_source": fig.cache_source,
        "cache_bytes": fig.cache_bytes,
        "saved_bytes": fig.saved_bytes,
        "cache_path": fig.cache_path,
        "load_program_s": model.compile_s,
    }


def measure(runner: harness.Runner, cfg: dict, driver_jit_cache: bool) -> dict:
    program = os.path.join(runner.work, "conv.ep")  # written by the "prep" task
    cache_dir = os.path.join(runner.work, "cache-warm-start")
    os.makedirs(cache_dir, exist_ok=True)
    env = {} if driver_jit_cache else {"CUDA_CACHE_DISABLE": "1"}
    base = {"program": program, "cache_dir": cache_dir, "batch_size": 32, "batches": 3}
    cold, warm = [], []
    for _ in range(cfg["first_batch_reps"]):
        cold.append(runner.task("first-batch", {**base, "cold": True}, env))
        warm.append(runner.task("first-batch", {**base, "cold": False}, env))
    cold_ms = harness.median([r["first_batch_ms"] for r in cold])
    warm_ms = harness.median([r["first_batch_ms"] for r in warm])
    return {
        "key": "warm_start",
        "measurement": "warm start: first batch in Trainer.predict, warm kernel cache / cold (conv net, batch 32)",
        "value": warm_ms / cold_ms if cold_ms > 0 else None,
        "display": f"{warm_ms / cold_ms:.3f} ({warm_ms:.1f} ms warm / {cold_ms:.1f} ms cold)" if cold_ms > 0 else "n/a",
        "pair": {"labels": ["cold cache", "warm cache"], "values": [cold_ms, warm_ms], "unit": "ms (first batch)"},
        "details": {
            "cold_first_batch_ms": [r["first_batch_ms"] for r in cold],
            "warm_first_batch_ms": [r["first_batch_ms"] for r in warm],
            "warm_cache_source": sorted({r["cache_source"] for r in warm}),
            "cache_bytes": warm[-1]["cache_bytes"] if warm else 0,
            "engines": cold[-1]["engines"] if cold else 0,
            "program_load_s": harness.median([r["load_program_s"] for r in cold + warm]),
            "driver_jit_cache": "on" if driver_jit_cache else "off (CUDA_CACHE_DISABLE=1)",
        },
    }
