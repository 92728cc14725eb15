"""Serving efficiency (``--only serving_efficiency``): the bare engine's time per batch / Trainer.predict's.

The yardstick is the engine itself. Per model, in one fresh process:

* the **bare engine**: its input already on the GPU, no Lightning, default and whole-graph capture; the
  faster of the two is the reference;
* **Trainer.predict** with ``TRTRuntimeSettings`` over a map-style CPU dataset (samples collated by the
  DataLoader), per batch (``_model.BatchTimer``: the mean after the first batch), for each source:
  ``cpu`` (no workers, pageable), ``workers`` (4 workers, ``pin_memory=True``), ``workers-unpinned`` (4
  workers, ``pin_memory=False``: the uploads stage), ``gpu`` (batches already on the GPU), and ``cpu-off``
  (the CPU source with ``upload_ahead=False``: Lightning's own transfer, the baseline before uploads
  ahead); each under default settings and whole-graph capture, after a warm-up run of each strategy from the
  CPU source that is left out (the first runs of a process are slower: page faults, pinned-memory
  allocation);
* ``cuda_graph_strategy="auto"`` on the CPU source (its trial included in the per-batch time);
* on the CPU source with the faster of default and whole-graph capture, what happens to the predictions: ``dropped``
  (``return_predictions=False``), ``gpu-writer`` (a writer that keeps them on the GPU), ``host-writer``
  (a ``BasePredictionWriter`` that writes host tensors: ``.cpu()`` per batch), ``returned``
  (``return_predictions=True``) and ``host-collect`` (:class:`~lightning_trt_rtx.TRTHostPredictions`);
* an **empty** Trainer.predict (``predict_step`` returns its batch) over the CPU source, for the MLP's goal.

Models (fp16, random weights): ResNet-50 batch 32 and ViT-B/16 batch 8, each compiled in the process and
also saved then served with ``load_program``; the BERT-sized encoder batch 8 at 128 tokens; the 32x256 MLP
batch 8. Efficiency = bare / Trainer.predict per batch (1.0: the engine's own speed).

Rows (``key`` starting ``serving_efficiency``), one per model form: the efficiency from the CPU source with
predictions dropped under the faster strategy [>= 0.95]; per model the host-collection path
[``serving_efficiency_host``, >= 0.85]; the MLP's (Trainer.predict - empty) / bare [<= 1.25]. Every other
figure is in the row's details.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks import harness

# name: (builder, batch size, form); the builders are real_models' and graphs' (the MLP)
MODELS: dict[str, tuple[str, int, str]] = {
    "resnet50-b32": ("resnet50-b32", 32, "compiled"),
    "resnet50-b32-loaded": ("resnet50-b32", 32, "loaded"),
    "vit-b16-b8": ("vit-b16-b8", 8, "compiled"),
    "vit-b16-b8-loaded": ("vit-b16-b8", 8, "loaded"),
    "bert-b8": ("bert-b8", 8, "compiled"),
    "mlp-b8": ("mlp", 8, "compiled"),
}
SOURCES = ("cpu", "workers", "workers-unpinned", "gpu", "cpu-off")
STRATEGIES = ("disabled", "whole_graph_capture")
PREDICTIONS = ("dropped", "gpu-writer", "host-writer", "returned", "host-collect")
POOL_SAMPLES = 64  # distinct samples the dataset cycles through


def available_models() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return [m for m in MODELS if not m.startswith(("resnet", "vit"))]
    return list(MODELS)


# --- inside a task ----------------------------------------------------------------------------------


class _Samples:
    """A map-style dataset of ``length`` samples cycling through a pool (a real collate per batch)."""

    def __init__(self, pool: list[Any], length: int) -> None:
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.pool[index % len(self.pool)]


def _net_and_samples(name: str, work: str) -> tuple[Any, list[Any], int]:
    """The served net (compiled here, or saved and loaded), a pool of CPU samples, the batch size."""
    import torch

    from benchmarks import real_models

    builder, batch, form = MODELS[name]
    gpu = harness.device()
    if builder == "mlp":
        from _model import model_spec, prepare_model

        net, dtype, _ = prepare_model("mlp", gpu, batch)
        generator = torch.Generator().manual_seed(0)
        shape = model_spec("mlp").input_shape
        samples = [torch.randn(shape, generator=generator).to(dtype) for _ in range(POOL_SAMPLES)]
        return net, samples, batch
    program = os.path.join(work, f"{builder}.ep")
    if not os.path.isfile(program):
        real_models.task_prep({"model": builder, "program": program})
    net = real_models._load(builder, program)
    if form == "compiled" and not harness.dry_run():
        net = _compiled(builder)
    batches = real_models._inputs(builder, count=max(1, POOL_SAMPLES // batch))
    samples = [row for b in batches for row in b]
    return net.to(gpu) if not harness.dry_run() else net, samples, batch


def _compiled(builder: str) -> Any:
    """``builder`` compiled in this process (torch_tensorrt.compile; the encoder as real_models compiles it)."""
    import torch

    from benchmarks import real_models

    gpu = harness.device()
    net = real_models._build(builder)
    x = real_models._inputs(builder, 1)[0].to(gpu)
    if real_models.MODELS[builder][0] == "text":
        from _text_model import compile_text_encoder

        return compile_text_encoder(net, gpu, batch_size=real_models.MODELS[builder][1])
    from _model import compile_tensorrt
    from _text_model import no_mha_fastpath

    net = net.to(device=gpu, dtype=torch.float16)
    with no_mha_fastpath():
        return compile_tensorrt(net, x)


def task(spec: dict) -> dict:
    """One model: bare engine, then Trainer.predict per source x strategy, then per prediction path."""
    import torch
    from _model import BatchTimer, EchoPredictor, KeepOnGPU
    from lightning.pytorch.callbacks import BasePredictionWriter
    from torch.utils.data import DataLoader

    from benchmarks import real_models
    from lightning_trt_rtx import TRTHostPredictions, TRTRuntimeSettings, TRTSettings

    name = spec["model"]
    template = os.path.join(spec["cache_dir"], "gpu-{gpu}.bin")
    os.makedirs(spec["cache_dir"], exist_ok=True)
    net, samples, batch_size = _net_and_samples(name, spec["work"])
    served = real_models._served(net)

    class HostWriter(BasePredictionWriter):
        def __init__(self) -> None:
            super().__init__(write_interval="batch")
            self.written: list = []

        def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, *args: Any) -> None:
            self.written.append(prediction.cpu())

    length = spec["batches"] * batch_size
    dataset = _Samples(samples, length)
    gpu_batches = [torch.stack(samples[i : i + batch_size]).to(harness.device())
                   for i in range(0, len(samples) - batch_size + 1, batch_size)]  # fmt: skip

    def loader(source: str) -> Any:
        if source == "gpu":
            return DataLoader(_Samples(gpu_batches, spec["batches"]), batch_size=None)
        workers = 4 if source.startswith("workers") else 0
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=source == "workers",
                          persistent_workers=False)  # fmt: skip

    def run(module: Any, source: str, strategy: str | None, predictions: str = "dropped") -> dict:
        timer = BatchTimer()
        callbacks: list = []
        settings = None
        if strategy is not None:
            settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False,
                                          upload_ahead=source != "cpu-off")  # fmt: skip
            callbacks.append(settings)
        writers = {"gpu-writer": KeepOnGPU, "host-writer": HostWriter, "host-collect": TRTHostPredictions}
        extra = writers.get(predictions)
        if extra is not None:
            callbacks.append(extra())
        harness.trainer([*callbacks, timer]).predict(module, loader(source),
                                                     return_predictions=predictions == "returned")  # fmt: skip
        row: dict[str, Any] = {"per_batch_ms": timer.per_batch_ms}
        if settings is not None and settings.figures:
            figures = settings.figures[0]
            row.update(step_gpu_ms=figures.step_gpu_ms, uploads=figures.uploads, capture=figures.capture,
                       auto=figures.auto)  # fmt: skip
        return row

    x = torch.stack(samples[:batch_size]).to(harness.device())
    bare = {
        s: harness.bare_engine_ms(net, x, TRTSettings(cuda_graph_strategy=s, runtime_cache=template), spec["batches"])
        for s in STRATEGIES
    }  # fmt: skip
    run(served, "gpu", "disabled")  # warm-up: contexts, kernels, the cache file
    for strategy in STRATEGIES:  # warm-up from the CPU source (left out): the first runs of a process are slower
        run(served, "cpu", strategy)
    per_source = {source: {s: run(served, source, s) for s in STRATEGIES} for source in SOURCES}
    per_source["cpu"]["auto"] = run(served, "cpu", "auto")  # the package's choice, its trial included
    best = min(STRATEGIES, key=lambda s: per_source["cpu"][s]["per_batch_ms"])
    per_predictions = {p: run(served, "cpu", best, p) for p in PREDICTIONS}
    empty = run(EchoPredictor(), "cpu", None)
    return {
        "model": name,
        "bare_ms": bare,
        "sources": per_source,
        "best_strategy": best,
        "predictions": per_predictions,
        "empty_ms": empty["per_batch_ms"],
    }


# --- in the parent ----------------------------------------------------------------------------------


def measure(runner: harness.Runner, cfg: dict) -> list[dict]:
    models = [m for m in available_models() if not cfg.get("models") or m in cfg["models"]]
    rows: list[dict] = []
    for name in models:
        spec = {"model": name, "batches": cfg["batches"], "work": runner.work,
                "cache_dir": os.path.join(runner.work, "efficiency-cache", name)}  # fmt: skip
        try:
            rows.extend(summarize(runner.task("serving-efficiency", spec)))
        except Exception as err:  # one model failing keeps the others
            rows.append({"key": f"serving_efficiency_{name}", "measurement": f"serving efficiency ({name})",
                         "value": None, "error": str(err)})  # fmt: skip
    return rows


def summarize(raw: dict) -> list[dict]:
    """The result rows of one model's task figures."""
    name = raw["model"]
    bare = min(raw["bare_ms"].values())
    best = raw["best_strategy"]
    efficiency = {
        source: {s: bare / r["per_batch_ms"] if r["per_batch_ms"] > 0 else None for s, r in by.items()}
        for source, by in raw["sources"].items()
    }
    by_predictions = {p: bare / r["per_batch_ms"] if r["per_batch_ms"] > 0 else None
                      for p, r in raw["predictions"].items()}  # fmt: skip
    headline = max(v for v in efficiency["cpu"].values() if v is not None)
    details = {"bare_ms": raw["bare_ms"], "best_strategy": best, "efficiency": efficiency,
               "efficiency_by_predictions": by_predictions, "raw": raw}  # fmt: skip
    ms = {s: raw["sources"]["cpu"][s]["per_batch_ms"] for s in raw["sources"]["cpu"]}
    rows = [{
        "key": f"serving_efficiency_{name}",
        "measurement": f"serving efficiency: bare engine / Trainer.predict per batch, CPU dataset ({name})",
        "value": headline,
        "display": (f"{headline:.2f} (bare {bare:.3f} ms; predict {ms['disabled']:.3f} ms default,"
                    f" {ms['whole_graph_capture']:.3f} ms graphs, {ms['auto']:.3f} ms auto; without uploads ahead"
                    f" {bare / min(r['per_batch_ms'] for r in raw['sources']['cpu-off'].values()):.2f})"),
        "details": details,
    }]  # fmt: skip
    host = by_predictions.get("host-collect")
    rows.append({
        "key": f"serving_efficiency_host_{name}",
        "measurement": f"serving efficiency with predictions collected on the host (TRTHostPredictions) ({name})",
        "value": host,
        "display": (f"{host:.2f} (returned: {by_predictions['returned']:.2f},"
                    f" host writer: {by_predictions['host-writer']:.2f})") if host else "-",
    })  # fmt: skip
    if name.startswith("mlp"):
        cost = (raw["sources"]["cpu"][best]["per_batch_ms"] - raw["empty_ms"]) / bare
        rows.append({
            "key": "serving_efficiency_mlp_cost",
            "measurement": "32x256 MLP: (Trainer.predict - empty Trainer.predict) / bare engine, per batch",
            "value": cost,
            "display": f"{cost:.2f}x (empty loop {raw['empty_ms']:.3f} ms)",
        })  # fmt: skip
    return rows
