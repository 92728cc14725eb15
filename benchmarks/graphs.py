"""Whole-graph capture in ``Trainer.predict`` [never slower than the default; close to the bare engine].

Models (random weights, fp16 on the GPU): ``mlp`` (8 x 1024, batch 8), ``mlp-deep`` (32 x 256,
batch 8), ``resnet18`` (torchvision, batch 1, 224x224) and ``encoder`` (4 transformer blocks, width
256, 64 tokens, batch 1), compiled in the process; and two programs saved with ``torch_tensorrt.save``
and served with ``load_program`` (the deployment path the README recommends): ``resnet50-b32-loaded``
(torchvision ResNet-50, batch 32) and ``vit-b16-b8-loaded`` (ViT-B/16, batch 8), over the serving-efficiency
step's CPU dataset. For each, in one process, per batch in ``Trainer.predict`` over the same loader
(a new batch tensor every step, uploaded ahead of the engine):

* ``default``: ``cuda_graph_strategy="disabled"``;
* ``upstream``: ``"whole_graph_capture"`` with the addresses left to torch-tensorrt
  (``LIGHTNING_TRT_RTX_STABLE_ADDRESSES=0``: how whole-graph capture behaved before this package held them);
* ``stable``: ``"whole_graph_capture"`` as the package serves it (addresses held once they move);
* ``site``: ``"whole_graph_capture"`` with ``LIGHTNING_TRT_RTX_STABLE_ADDRESSES=graphs``: each call site captured
  by the package in a CUDA graph of its own, the engines' own capture off;
* ``auto``: ``cuda_graph_strategy="auto"`` as a later loop of the process runs it: it starts with the decision
  its earlier loops made for the model (and checks it on one window);
* ``auto-first``: ``"auto"`` with nothing remembered, as a process's first loop: the three above tried on
  the loop's first batches where the loop is long enough to win a switch back, the fastest kept, the
  trial's cost in the per-batch time. Each auto variant remembers apart from the others
  (:func:`lightning_trt_rtx.auto.separate_memory`), so ``auto-first`` never wipes what ``auto`` learnt;
* ``empty``: a LightningModule whose ``predict_step`` returns its batch (Lightning's own cost per batch);
* ``default-kept``, ``upstream-kept``, ``stable-kept``, ``site-kept``, ``auto-kept``: the same with a callback
  that keeps every prediction on the GPU (as a writer batching its writes would), so an engine's outputs cannot land
  where the last ones were: the case holding the addresses is for. (``return_predictions=True`` is not
  that case: Lightning copies each prediction to the host, and the GPU tensor is freed.)

interleaved (the order rotates every round, the first round a warm-up left out; each auto variant runs
right after the default it is compared with), then the bare engine
on one fixed input, without and with graphs, and with graphs and the addresses wrapper; and the
wrapper's own cost per steady call, on an engine faked at the package's boundary (Python only).
Goals: ``auto`` at least as fast as ``default`` by the median of every model and no repetition under
0.95x; ``auto`` at least 0.95x the fastest candidate of each model; ``auto-first`` at least as fast as
``default`` by the median of every model (the trial costs less than it wins over the loop); per batch
``graphs - empty <= 1.25 x`` the bare engine with graphs (graphs: the faster of ``stable`` and
``site``); the wrapper's steady call within 5 us of the
engine's own.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Any
from unittest import mock

from benchmarks import harness, serving_efficiency

LOADED = ("resnet50-b32-loaded", "vit-b16-b8-loaded")  # serving_efficiency's programs, served with load_program
MODELS = ("mlp", "mlp-deep", "resnet18", "encoder", *LOADED)
# each auto variant runs right after the default it is compared with, so a repetition's ratio is of two loops
# seconds apart (the host's speed drifts by up to 2x between loops of one round on a shared host)
VARIANTS = (
    "default", "auto", "auto-first", "upstream", "stable", "site", "empty",
    "default-kept", "auto-kept", "upstream-kept", "stable-kept", "site-kept",
)  # fmt: skip
AUTO = ("auto", "auto-first", "auto-kept")
CANDIDATES = ("default", "site", "upstream", "stable")  # what auto chooses from


def _variant(name: str, template: str) -> tuple[list, dict[str, str]]:
    """The callbacks and environment of one variant (the timer is added by the caller)."""
    from lightning_trt_rtx import TRTRuntimeSettings, addresses

    name = name.removesuffix("-kept")
    if name == "empty":
        return [], {}
    strategy = {"default": "disabled", "auto": "auto", "auto-first": "auto"}.get(name, "whole_graph_capture")
    # not whatever the shell has
    env = {addresses.ENABLED_ENV: {"upstream": "0", "site": "graphs"}.get(name, "1")}
    return [TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)], env


def task(spec: dict) -> dict:
    """One model: per-batch ms of every variant in Trainer.predict, interleaved; then the bare engine."""
    import torch
    from _model import BatchTimer, CompiledPredictor, EchoPredictor, KeepOnGPU, SyntheticDataModule, model_spec

    from lightning_trt_rtx import TRTSettings, auto

    template = os.path.join(spec["cache_dir"], "gpu-{gpu}.bin")
    if spec["model"] in LOADED:
        model, data, x = _loaded(spec)
    else:
        model = CompiledPredictor(spec["model"], spec["batch_size"])
        data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    per_batch: dict[str, list[float]] = {v: [] for v in VARIANTS}
    capture: dict[str, str] = {}
    kept: dict[str, list[str]] = {v: [] for v in AUTO}  # what auto kept, each repetition
    first: dict[str, list[float]] = {v: [] for v in VARIANTS}  # each loop's first batch (ms), from the figures
    # what "auto" and "auto-kept" decided, each apart (the other's workload decides nothing for it); "auto-first"
    # starts each loop with nothing remembered, as a process's first loop
    memories = {name: weakref.WeakKeyDictionary() for name in ("auto", "auto-kept")}
    for rep in range(spec["reps"] + 1):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for name in order:
            callbacks, env = _variant(name, template)
            timer = BatchTimer()
            if name.endswith("-kept"):
                callbacks.append(KeepOnGPU())  # dropped with the variant's callbacks after the loop
            memory = auto.separate_memory(memories.get(name)) if name in AUTO else contextlib.nullcontext()
            with memory, mock.patch.dict(os.environ, env):  # set for this variant, put back after
                harness.predict(EchoPredictor() if name == "empty" else model, data, [*callbacks, timer])
            if rep == 0:
                continue  # warm-up round: compile, JIT, first captures
            per_batch[name].append(timer.per_batch_ms)
            if callbacks and name.split("-")[0] != "default":  # whether the graphs could replay, as the figures say
                capture[name] = callbacks[0].figures[0].capture
            if name in kept:
                kept[name].append(callbacks[0].figures[0].auto)
            if callbacks and callbacks[0].figures:
                first[name].append(callbacks[0].figures[0].first_batch_ms)
    if spec["model"] not in LOADED:
        x = torch.randn(model.batch_size, *model_spec(spec["model"]).input_shape, device=harness.device())
        x = x.to(model.input_dtype)
    bare = {
        s: harness.bare_engine_ms(model.net, x,
                                  TRTSettings(cuda_graph_strategy=s, runtime_cache=template), spec["batches"])
        for s in ("disabled", "whole_graph_capture")
    }  # fmt: skip
    wgc = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=template)
    bare["whole_graph_capture_held"] = harness.bare_engine_ms(model.net, x, wgc, spec["batches"], hold=True)
    return {"per_batch_ms": per_batch, "capture": capture, "auto": kept, "bare_ms": bare, "first_batch_ms": first,
            "wrapper_us": wrapper_overhead_us(*((200, 2) if harness.dry_run() else ())),
            "compile_s": getattr(model, "compile_s", 0.0)}  # fmt: skip


def _loaded(spec: dict) -> tuple[Any, Any, Any]:
    """A saved program served with ``load_program`` (the serving-efficiency step's), a DataModule over its
    CPU samples, and one batch on the GPU for the bare engine."""
    import torch
    from lightning.pytorch import LightningDataModule
    from torch.utils.data import DataLoader

    from benchmarks import real_models

    net, samples, batch = serving_efficiency._net_and_samples(spec["model"], spec["work"])
    dataset = serving_efficiency._Samples(samples, spec["batches"] * batch)

    class Data(LightningDataModule):
        def predict_dataloader(self) -> DataLoader:
            return DataLoader(dataset, batch_size=batch)  # type: ignore[arg-type]

    return real_models._served(net), Data(), torch.stack(samples[:batch]).to(harness.device())


def wrapper_overhead_us(calls: int = 20000, rounds: int = 15) -> dict[str, float]:
    """The addresses wrapper's cost per steady call (same shapes, same addresses), Python only: an engine
    faked at the package's boundary (real settings; returns the same output every call) called as it is
    and through the wrapper, interleaved, the fastest round of each (the least disturbed by the host)."""
    import timeit

    import torch

    from lightning_trt_rtx import _backend
    from lightning_trt_rtx.addresses import StableAddresses
    from lightning_trt_rtx.engines import Engine

    settings = _backend.runtime_settings_class()(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)

    class Steady(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.runtime_settings = settings
            self.out = torch.zeros(8, 256)
            self.use_pre_allocated_outputs, self.unowned = False, True

        def set_output_tensors_as_unowned(self, enabled: bool) -> None:
            self.unowned = enabled

        def are_output_tensors_unowned(self) -> bool:
            return self.unowned

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out

    bare, wrapped, x = Steady(), Steady(), torch.zeros(8, 256)
    stable = StableAddresses([Engine("steady", "module", wrapped)])
    stable.install()
    try:
        with torch.inference_mode():
            for _ in range(10):
                wrapped(x)
            times: dict[str, list[float]] = {"engine": [], "wrapped": []}
            for _ in range(rounds):
                times["engine"].append(timeit.timeit(lambda: bare(x), number=calls) / calls * 1e6)
                times["wrapped"].append(timeit.timeit(lambda: wrapped(x), number=calls) / calls * 1e6)
    finally:
        stable.uninstall()
    engine, held = min(times["engine"]), min(times["wrapped"])
    return {"engine_us": engine, "wrapped_us": held, "overhead_us": held - engine}


def _models() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # resnet18 and the two programs need it
        print("    resnet18 and the loaded programs skipped: torchvision is not installed"
              " (pip install 'lightning-trt-rtx[bench]')", flush=True)  # fmt: skip
        return [m for m in MODELS if m != "resnet18" and m not in LOADED]
    return list(MODELS)


def measure(runner: harness.Runner, cfg: dict) -> list[dict]:
    """The rows: the 32x256 MLP's speedup (the first goal), auto against the default and the fastest candidate,
    the wrapper's cost, the cost over the bare engine, and the host's noise (no goal: how to read the others)."""
    from _model import model_spec

    results: dict[str, dict] = {}
    failed: list[dict] = []
    for name in _models():
        if cfg.get("models") and name not in cfg["models"]:
            continue
        batch_size = serving_efficiency.MODELS[name][1] if name in LOADED else model_spec(name).batch_size
        spec = {"model": name, "batch_size": batch_size, "batches": cfg["batches"], "work": runner.work}
        spec.update(reps=cfg["reps"], cache_dir=os.path.join(runner.work, f"cache-graphs-{name}"))
        try:
            results[name] = runner.task("graphs", spec)
        except Exception as err:  # one model failing keeps the others' figures
            failed.append({"key": f"graphs_{name}", "measurement": f"whole-graph capture, {name}", "value": None,
                           "error": str(err)})  # fmt: skip
    table = {name: _summary(r) for name, r in results.items()}
    ratios = [  # every round of every model, predictions dropped and kept
        d / a
        for r in results.values()
        for kept in ("", "-kept")
        for d, a in zip(r["per_batch_ms"]["default" + kept], r["per_batch_ms"]["auto" + kept])
    ]
    slowest = min(ratios) if ratios else None
    medians = [t[f"auto{kept}_speedup"] for t in table.values() for kept in ("", "_kept")]
    worst = min(medians) if medians else None
    of_best = [t[f"auto{kept}_of_best"] for t in table.values() for kept in ("", "_kept")]
    worst_of_best = min(of_best) if of_best else None
    first = {name: t["auto_first_speedup"] for name, t in table.items()}
    worst_first = min(first.values()) if first else None
    overhead = max((r["wrapper_us"]["overhead_us"] for r in results.values()), default=None)
    over = {  # the package's faster graphs: held addresses or call-site graphs
        name: min(t["stable_minus_empty_over_bare_graphs"], t["site_minus_empty_over_bare_graphs"])
        for name, t in table.items()
    }
    worst_over = max(over.values()) if over else None
    noise = {name: t["host_noise"] for name, t in table.items()}
    worst_noise = max((max(n.values()) for n in noise.values()), default=None)
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
            "measurement": "cuda_graph_strategy='auto' vs default, per-batch median of the worst model, predictions"
            " dropped or kept (default / auto)",
            "value": worst,
            "display": f"{worst:.2f}x (per model, median, dropped / kept: "
            + ", ".join(f"{n} {t['auto_speedup']:.2f}x / {t['auto_kept_speedup']:.2f}x" for n, t in table.items())
            + f"; slowest repetition {slowest:.2f}x)"
            if worst is not None and slowest is not None
            else "n/a",
            "details": table,
        }
    )
    rows.append(
        {
            "key": "graphs_never_slower_any_repetition",
            "measurement": "cuda_graph_strategy='auto' vs default, slowest repetition of any model (default / auto)",
            "value": slowest,
            "display": f"{slowest:.2f}x" if slowest is not None else "n/a",
        }
    )
    rows.append(
        {
            "key": "graphs_auto_vs_best",
            "measurement": "cuda_graph_strategy='auto' vs the fastest of default / upstream capture / held addresses,"
            " per-batch medians, worst model (fastest / auto)",
            "value": worst_of_best,
            "display": _with_kept(
                worst_of_best,
                {n: f"{t['auto_of_best']:.2f}x / {t['auto_kept_of_best']:.2f}x" for n, t in table.items()},
                {n: t["auto"] for n, t in table.items()},
            ),
        }
    )
    rows.append(
        {
            "key": "graphs_auto_first_loop",
            "measurement": "cuda_graph_strategy='auto' with nothing remembered (its trial in the per-batch time) vs"
            " default, per-batch median of the worst model (default / auto)",
            "value": worst_first,
            "display": _with_kept(
                worst_first, {n: f"{v:.2f}x" for n, v in first.items()}, {n: t["auto_first"] for n, t in table.items()}
            ),
        }
    )
    rows.append(
        {
            "key": "graphs_addresses_overhead",
            "measurement": "held addresses: the wrapper's cost per steady call over the engine's own (Python, an"
            " engine faked at the package's boundary; worst model's process)",
            "value": overhead,
            "display": f"{overhead:.2f} us (bare engine with graphs, ms per call, as upstream / held: "
            + ", ".join(f"{n} {t['bare_ms']['whole_graph_capture']:.4f} /"
                        f" {t['bare_ms']['whole_graph_capture_held']:.4f}" for n, t in table.items())
            + ")"
            if overhead is not None
            else "n/a",
            "details": {n: r["wrapper_us"] for n, r in results.items()},
        }
    )  # fmt: skip
    rows.append(
        {
            "key": "graphs_vs_bare",
            "measurement": "(Trainer.predict with graphs - empty Trainer.predict) / bare engine with graphs (worst;"
            " the faster of held addresses and call-site graphs)",
            "value": worst_over,
            "display": f"{worst_over:.2f}x ("
            + ", ".join(
                f"{n} {v:.2f}x (held {table[n]['stable_minus_empty_over_bare_graphs']:.2f}x,"
                f" call-site graphs {table[n]['site_minus_empty_over_bare_graphs']:.2f}x)"
                for n, v in over.items()
            )
            + ")"
            if worst_over is not None
            else "n/a",
            "details": {name: {"median_ms": t["median_ms"], "bare_ms": t["bare_ms"]} for name, t in table.items()},
        }
    )
    rows.append(
        {
            "key": "graphs_host_noise",
            "measurement": "host noise: the same loop's slowest over its fastest repetition, worst model (empty loop"
            " / default); a ratio between variants within this spread may be the host's own",
            "value": worst_noise,
            "display": f"{worst_noise:.2f}x ("
            + ", ".join(f"{n} {v['empty']:.2f}x / {v['default']:.2f}x" for n, v in noise.items())
            + ")"
            if worst_noise is not None
            else "n/a",
            "details": noise,
        }
    )
    return rows


def _with_kept(worst: float | None, per_model: dict[str, str], kept: dict[str, list[str]]) -> str:
    """A row's display: the worst figure, each model's, and what auto kept in each model's first repetition."""
    if worst is None:
        return "n/a"
    figures = ", ".join(f"{name} {figure}" for name, figure in per_model.items())
    kept_text = "; ".join(f"{name}: {reps[0] if reps else '-'}" for name, reps in kept.items())
    return f"{worst:.2f}x ({figures}; kept: {kept_text})"


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
        "stable_minus_empty_over_bare_graphs": _ratio(median["stable"] - median["empty"], bare["whole_graph_capture"]),
        "site_minus_empty_over_bare_graphs": _ratio(median["site"] - median["empty"], bare["whole_graph_capture"]),
        "site_speedup": _ratio(median["default"], median["site"]),
        **{
            f"auto{kept.replace('-', '_')}_speedup": _ratio(median["default" + kept], median["auto" + kept])
            for kept in ("", "-kept")
        },
        **{  # auto against the fastest candidate of this model
            f"auto{kept.replace('-', '_')}_of_best": _ratio(
                min(median[c + kept] for c in CANDIDATES), median["auto" + kept]
            )
            for kept in ("", "-kept")
        },
        "auto_first_speedup": _ratio(median["default"], median["auto-first"]),
        # the same loop run again: how far apart the host puts its repetitions
        "host_noise": {
            v: _ratio(max(per_batch[v]), min(per_batch[v])) if per_batch[v] else float("nan")
            for v in ("empty", "default")
        },
        "auto": result["auto"]["auto"],
        "auto_kept": result["auto"]["auto-kept"],
        "auto_first": result["auto"]["auto-first"],
        "first_batch_ms": result.get("first_batch_ms", {}),
        "wrapper_us": result["wrapper_us"],
        "capture": result["capture"],
        "compile_s": result["compile_s"],
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")
