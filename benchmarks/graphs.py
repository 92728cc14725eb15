"""Whole-graph capture in ``Trainer.predict`` [never slower than the default; close to the bare engine].

Models (random weights, fp16 on the GPU): ``mlp`` (8 x 1024, batch 8), ``mlp-deep`` (32 x 256,
batch 8), ``resnet18`` (torchvision, batch 1, 224x224) and ``encoder`` (4 transformer blocks, width
256, 64 tokens, batch 1). For each, in one process, per batch in ``Trainer.predict`` over the same
loader (a new batch tensor every step):

* ``default``: ``cuda_graph_strategy="disabled"``;
* ``upstream``: ``"whole_graph_capture"`` with the addresses left to torch-tensorrt
  (``LIGHTNING_TRT_RTX_STABLE_ADDRESSES=0``: how whole-graph capture behaved before this package held them);
* ``stable``: ``"whole_graph_capture"`` as the package serves it (addresses held once they move);
* ``empty``: a LightningModule whose ``predict_step`` returns its batch (Lightning's own cost per batch);
* ``default-kept``, ``upstream-kept``, ``stable-kept``: the same with a callback that keeps every
  prediction on the GPU (as a writer batching its writes would), so an engine's outputs cannot land
  where the last ones were: the case holding the addresses is for. (``return_predictions=True`` is not
  that case: Lightning copies each prediction to the host, and the GPU tensor is freed.)

interleaved (the order rotates every round, the first round a warm-up left out), then the bare engine
on one fixed input, without and with graphs. Goals: ``stable`` at least as fast as ``default`` in
every repetition of every model, and per batch ``stable - empty <= 1.25 x`` the bare engine with graphs.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

from benchmarks import harness

MODELS = ("mlp", "mlp-deep", "resnet18", "encoder")
VARIANTS = ("default", "upstream", "stable", "empty", "default-kept", "upstream-kept", "stable-kept")


def _variant(name: str, template: str) -> tuple[list, dict[str, str]]:
    """The callbacks and environment of one variant (the timer is added by the caller)."""
    from lightning_trt_rtx import TRTRuntimeSettings, addresses

    name = name.removesuffix("-kept")
    if name == "empty":
        return [], {}
    strategy = "disabled" if name == "default" else "whole_graph_capture"
    env = {addresses.ENABLED_ENV: "0" if name == "upstream" else "1"}  # not whatever the shell has
    return [TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)], env


def task(spec: dict) -> dict:
    """One model: per-batch ms of every variant in Trainer.predict, interleaved; then the bare engine."""
    import torch
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule, model_spec
    from lightning.pytorch import Callback, LightningModule

    from lightning_trt_rtx import TRTSettings

    class Empty(LightningModule):
        def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return batch

    class KeepOnGPU(Callback):
        """Keeps every prediction on the GPU: each batch's outputs stay alive for the rest of the loop."""

        def __init__(self) -> None:
            self.kept: list = []

        def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
            self.kept.append(outputs)

    template = os.path.join(spec["cache_dir"], "gpu-{gpu}.bin")
    model = CompiledPredictor(spec["model"], spec["batch_size"])
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    per_batch: dict[str, list[float]] = {v: [] for v in VARIANTS}
    capture: dict[str, str] = {}
    for rep in range(spec["reps"] + 1):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for name in order:
            callbacks, env = _variant(name, template)
            timer = BatchTimer()
            if name.endswith("-kept"):
                callbacks.append(KeepOnGPU())  # dropped with the variant's callbacks after the loop
            with mock.patch.dict(os.environ, env):  # set for this variant, put back after
                harness.predict(Empty() if name == "empty" else model, data, [*callbacks, timer])
            if rep == 0:
                continue  # warm-up round: compile, JIT, first captures
            per_batch[name].append(timer.per_batch_ms)
            if callbacks and name.split("-")[0] != "default":  # whether the graphs could replay, as the figures say
                capture[name] = callbacks[0].figures[0].capture
    x = torch.randn(model.batch_size, *model_spec(spec["model"]).input_shape, device=harness.device())
    bare = {
        s: harness.bare_engine_ms(model.net, x.to(model.input_dtype),
                                  TRTSettings(cuda_graph_strategy=s, runtime_cache=template), spec["batches"])
        for s in ("disabled", "whole_graph_capture")
    }  # fmt: skip
    return {"per_batch_ms": per_batch, "capture": capture, "bare_ms": bare, "compile_s": model.compile_s}


def _models() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # resnet18 is the only model that needs it
        print("    resnet18 skipped: torchvision is not installed (pip install 'lightning-trt-rtx[bench]')", flush=True)
        return [m for m in MODELS if m != "resnet18"]
    return list(MODELS)


def measure(runner: harness.Runner, cfg: dict) -> list[dict]:
    """Three rows: the 32x256 MLP's speedup (the first goal), never slower, and the cost over the bare engine."""
    from _model import model_spec

    results: dict[str, dict] = {}
    failed: list[dict] = []
    for name in _models():
        if cfg.get("models") and name not in cfg["models"]:
            continue
        spec = {"model": name, "batch_size": model_spec(name).batch_size, "batches": cfg["batches"]}
        spec.update(reps=cfg["reps"], cache_dir=os.path.join(runner.work, f"cache-graphs-{name}"))
        try:
            results[name] = runner.task("graphs", spec)
        except Exception as err:  # one model failing keeps the others' figures
            failed.append({"key": f"graphs_{name}", "measurement": f"whole-graph capture, {name}", "value": None,
                           "error": str(err)})  # fmt: skip
    table = {name: _summary(r) for name, r in results.items()}
    ratios = [  # every round of every model, predictions dropped and kept
        d / s
        for r in results.values()
        for kept in ("", "-kept")
        for d, s in zip(r["per_batch_ms"]["default" + kept], r["per_batch_ms"]["stable" + kept])
    ]
    worst = min(ratios) if ratios else None
    over = {name: t["stable_minus_empty_over_bare_graphs"] for name, t in table.items()}
    worst_over = max(over.values()) if over else None
    deep = table.get("mlp-deep")
    rows = failed
    if deep is not None:
        default, stable = deep["median_ms"]["default"], deep["median_ms"]["stable"]
        rows.append(
            {
                "key": "graphs",
                "measurement": "whole-graph capture: per-batch speedup in Trainer.predict (32x256 MLP, fp16, batch 8)",
                "value": default / stable if stable > 0 else None,
                "display": f"{default / stable:.2f}x ({default * 1e3:.0f} us -> {stable * 1e3:.0f} us per batch)"
                if stable > 0
                else "n/a",
                "pair": {"labels": ["default", "whole_graph_capture"], "values": [default * 1e3, stable * 1e3],
                         "unit": "us per batch"},
                "details": deep,
            }
        )  # fmt: skip
    rows.append(
        {
            "key": "graphs_never_slower",
            "measurement": "whole-graph capture vs default, slowest repetition of any model, predictions dropped"
            " or kept (default / stable)",
            "value": worst,
            "display": f"{worst:.2f}x (per model, median, dropped / kept: "
            + ", ".join(f"{n} {t['speedup']:.2f}x / {t['kept_speedup']:.2f}x" for n, t in table.items())
            + ")"
            if worst is not None
            else "n/a",
            "details": table,
        }
    )
    rows.append(
        {
            "key": "graphs_vs_bare",
            "measurement": "(Trainer.predict with graphs - empty Trainer.predict) / bare engine with graphs (worst)",
            "value": worst_over,
            "display": f"{worst_over:.2f}x (" + ", ".join(f"{n} {v:.2f}x" for n, v in over.items()) + ")"
            if worst_over is not None
            else "n/a",
            "details": {name: {"median_ms": t["median_ms"], "bare_ms": t["bare_ms"]} for name, t in table.items()},
        }
    )
    return rows


def _summary(result: dict) -> dict:
    per_batch = result["per_batch_ms"]
    median = {v: harness.median(per_batch[v]) for v in VARIANTS}
    spread = {v: [min(per_batch[v]), max(per_batch[v])] if per_batch[v] else [] for v in VARIANTS}
    bare = result["bare_ms"]
    return {
        "median_ms": median,
        "spread_ms": spread,
        "per_rep_ms": per_batch,
        "bare_ms": bare,
        "speedup": median["default"] / median["stable"] if median["stable"] > 0 else float("nan"),
        "upstream_speedup": median["default"] / median["upstream"] if median["upstream"] > 0 else float("nan"),
        "kept_speedup": median["default-kept"] / median["stable-kept"] if median["stable-kept"] > 0 else float("nan"),
        "upstream_kept_speedup": median["default-kept"] / median["upstream-kept"]
        if median["upstream-kept"] > 0
        else float("nan"),
        "stable_minus_empty_over_bare_graphs": (median["stable"] - median["empty"]) / bare["whole_graph_capture"]
        if bare["whole_graph_capture"] > 0
        else float("nan"),
        "capture": result["capture"],
        "compile_s": result["compile_s"],
    }
