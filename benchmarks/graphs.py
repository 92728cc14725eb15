"""CUDA graphs [goal >= 2.5x]: per-batch latency in ``Trainer.predict`` without and with whole-graph capture.

``mlp-deep`` (32-layer 256-wide MLP, fp16, batch 8): ``cuda_graph_strategy="disabled"`` vs
``"whole_graph_capture"``, interleaved in one process (the order alternates each round, the first
round a warm-up left out), median over repetitions. The same two settings on a bare loop of engine
calls (no Lightning, no data loading) are reported alongside.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks import harness

STRATEGIES = ("disabled", "whole_graph_capture")


def _engine_loop(model: Any, settings: Any, calls: int) -> float:
    """Per-call ms of the bare engine(s) under ``settings`` (no Lightning, no data loading)."""
    import torch
    from _model import model_spec

    binding = harness.bind_engines(model.net, settings)
    try:
        x = torch.randn(model.batch_size, *model_spec(model.model_name).input_shape, device=harness.device())
        x = x.to(model.input_dtype)
        with torch.inference_mode():
            for _ in range(10):  # context creation and capture stay out of the timing
                model.net(x)
            harness.sync()
            start = time.perf_counter()
            for _ in range(calls):
                model.net(x)
            harness.sync()
        return (time.perf_counter() - start) * 1e3 / calls
    finally:
        binding.restore()


def task(spec: dict) -> dict:
    """Per-batch latency in Trainer.predict, default vs whole-graph capture, interleaved; bare engine too."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    template = os.path.join(spec["cache_dir"], "gpu-{gpu}.bin")
    model = CompiledPredictor(spec["model"], spec["batch_size"])
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    out: dict[str, list] = {f"{kind}_{s}": [] for kind in ("lightning", "figures", "engine") for s in STRATEGIES}
    for rep in range(spec["reps"] + 1):
        for strategy in STRATEGIES if rep % 2 == 0 else STRATEGIES[::-1]:
            settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)
            timer = BatchTimer()
            harness.predict(model, data, [settings, timer])
            engine_ms = _engine_loop(model, settings.settings, spec["batches"])
            if rep == 0:
                continue  # warm-up round
            out[f"lightning_{strategy}"].append(timer.per_batch_ms)
            out[f"figures_{strategy}"].append(settings.figures[0].mean_batch_ms)
            out[f"engine_{strategy}"].append(engine_ms)
    return {"reps": out, "compile_s": model.compile_s}


def measure(runner: harness.Runner, cfg: dict) -> dict:
    spec = {"model": "mlp-deep", "batch_size": 8, "batches": cfg["batches"], "reps": cfg["reps"]}
    spec["cache_dir"] = os.path.join(runner.work, "cache-graphs")
    result = runner.task("graphs", spec)["reps"]
    default = harness.median(result["lightning_disabled"])
    graphs = harness.median(result["lightning_whole_graph_capture"])
    engine_default = harness.median(result["engine_disabled"])
    engine_graphs = harness.median(result["engine_whole_graph_capture"])
    return {
        "key": "graphs",
        "measurement": "whole-graph capture: per-batch speedup in Trainer.predict (32x256 MLP, fp16, batch 8)",
        "value": default / graphs if graphs > 0 else None,
        "display": f"{default / graphs:.2f}x ({default * 1e3:.0f} us -> {graphs * 1e3:.0f} us per batch)"
        if graphs > 0
        else "n/a",
        "pair": {
            "labels": ["default", "whole_graph_capture"],
            "values": [default * 1e3, graphs * 1e3],
            "unit": "us per batch",
        },
        "details": {
            "lightning_per_batch_ms": {
                "disabled": result["lightning_disabled"],
                "whole_graph_capture": result["lightning_whole_graph_capture"],
            },
            "callback_figures_mean_batch_ms": {
                "disabled": result["figures_disabled"],
                "whole_graph_capture": result["figures_whole_graph_capture"],
            },
            "engine_only_per_call_ms": {
                "disabled": result["engine_disabled"],
                "whole_graph_capture": result["engine_whole_graph_capture"],
            },
            "engine_only_speedup": engine_default / engine_graphs if engine_graphs > 0 else None,
        },
    }
