"""Lightning vs a hand-written loop [goal <= 1.2x]: ``Trainer.predict`` vs a plain loop, per batch.

Same 8x1024 MLP engine (batch 8), same settings, same DataLoader: the hand loop does what
``Trainer.predict`` does per batch (batch to device, ``predict_step``) and nothing else. The two
alternate in one process (the first round a warm-up left out), median over repetitions. A cProfile
of one ``Trainer.predict`` is written to ``lightning_profile.txt`` (``--no-profile`` skips it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from benchmarks import harness


def _hand_loop(model: Any, data: Any, settings: Any) -> dict:
    """What Trainer.predict does per batch, by hand: same DataLoader, same engine, same settings."""
    import torch

    binding = harness.bind_engines(model.net, settings)
    device = harness.device()
    try:
        batches = 0
        start = first_end = 0.0
        model.eval()
        with torch.inference_mode():
            for i, batch in enumerate(data.predict_dataloader()):
                if i == 0:
                    start = time.perf_counter()
                batch = batch.to(device, non_blocking=True)
                model.predict_step(batch, i)
                batches += 1
                if i == 0:
                    harness.sync()
                    first_end = time.perf_counter()
        harness.sync()
        end = time.perf_counter()
    finally:
        binding.restore()
    return {"first_batch_ms": (first_end - start) * 1e3, "per_batch_ms": (end - first_end) * 1e3 / max(batches - 1, 1)}


def _profile(run: Callable[[], float], path: str, batches: int) -> str:
    """cProfile of one Trainer.predict: where Lightning's per-batch time goes."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    text = io.StringIO()
    text.write(f"cProfile of one Trainer.predict over {batches} batches (cProfile itself slows every call).\n\n")
    for key in ("tottime", "cumulative"):
        text.write(f"=== top 40 by {key} ===\n")
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(40)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.getvalue())
    return path


def task(spec: dict) -> dict:
    """Per-batch latency: Trainer.predict vs a hand-written loop, same engine and settings, interleaved."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    template = os.path.join(spec["cache_dir"], "gpu-{gpu}.bin")
    model = CompiledPredictor(spec["model"], spec["batch_size"])
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    out: dict[str, list] = {"lightning": [], "loop": []}

    def lightning() -> float:
        settings = TRTRuntimeSettings(cuda_graph_strategy=spec["strategy"], runtime_cache=template, print_table=False)
        timer = BatchTimer()
        harness.predict(model, data, [settings, timer])
        return timer.per_batch_ms

    def loop() -> float:
        from lightning_trt_rtx.settings import TRTSettings

        settings = TRTSettings(cuda_graph_strategy=spec["strategy"], runtime_cache=template)
        return _hand_loop(model, data, settings)["per_batch_ms"]

    for rep in range(spec["reps"] + 1):  # Lightning first in the warm-up round: it compiles the model
        for variant in ("lightning", "loop") if rep % 2 == 0 else ("loop", "lightning"):
            ms = lightning() if variant == "lightning" else loop()
            if rep:
                out[variant].append(ms)
    result: dict[str, Any] = {"reps": out}
    if spec.get("profile"):
        result["profile"] = _profile(lambda: lightning(), spec["profile"], spec["batches"])
    return result


def measure(runner: harness.Runner, cfg: dict, profile: bool) -> dict:
    spec = {"model": "mlp", "batch_size": 8, "batches": cfg["batches"], "reps": cfg["reps"], "strategy": "disabled"}
    spec["cache_dir"] = os.path.join(runner.work, "cache-loop")
    if profile:
        spec["profile"] = os.path.join(runner.out, "lightning_profile.txt")
    result = runner.task("loop", spec)
    reps = result["reps"]
    lightning, loop = harness.median(reps["lightning"]), harness.median(reps["loop"])
    return {
        "key": "lightning_vs_loop",
        "measurement": "Trainer.predict vs a hand-written loop: per-batch time ratio"
        " (same 8x1024 MLP engine, batch 8, default settings)",
        "value": lightning / loop if loop > 0 else None,
        "display": f"{lightning / loop:.2f}x ({lightning * 1e3:.0f} us vs {loop * 1e3:.0f} us per batch,"
        f" {(lightning - loop) * 1e3:.0f} us of Lightning per batch)"
        if loop > 0
        else "n/a",
        "pair": {
            "labels": ["hand loop", "Trainer.predict"],
            "values": [loop * 1e3, lightning * 1e3],
            "unit": "us per batch",
        },
        "details": {"per_batch_ms": reps, "profile": result.get("profile")},
    }
