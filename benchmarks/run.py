"""The benchmark runner: one command, every measurement in a fresh process, medians of repetitions.

    python benchmarks/run.py --out benchmarks/results            # about 5 minutes on one H200
    python benchmarks/run.py --out benchmarks/results --quick    # fewer repetitions and batches
    python benchmarks/run.py --out benchmarks/results --two-gpu  # adds the 2-GPU figures (2-3 minutes)

Needs an NVIDIA GPU and torch-tensorrt-rtx; anywhere else it exits with status 2 and says why.

Measurements (goals in brackets):

1. warm start [<= 0.10]: first-batch latency inside ``Trainer.predict`` (execution-context creation
   and kernel JIT included) with this rank's warm kernel cache, over the same with an empty cache.
   The conv net (14 conv layers of distinct shapes) is compiled and saved once; every repetition
   is a cold process then a warm process that only load the saved program, so compile time is
   never measured. The CUDA driver's own JIT cache is disabled in these processes
   (``CUDA_CACHE_DISABLE=1``), so only the kernel cache is measured (``--driver-jit-cache`` keeps it).
2. CUDA graphs [>= 2.5x]: per-batch latency inside ``Trainer.predict`` without and with
   ``cuda_graph_strategy="whole_graph_capture"`` (``mlp-deep``: 32-layer 256-wide MLP, fp16, batch
   8); the same two settings on a bare loop of engine calls are reported alongside.
3. integration overhead [<= 2%]: the TRTRuntimeSettings callback vs the same settings applied by
   hand in the LightningModule (``setup`` assigns ``RuntimeSettings`` with one shared
   ``RuntimeCache`` to every TorchTensorRTModule; ``on_predict_end`` saves it): the median over
   repetitions of the per-batch ratio, each pair from one round; one compiled module serves
   every variant, with twice the repetitions and batches of the others. A third variant applies
   the settings through this package's core layer in the module (no callback), to tell a cost of
   the callback's hooks from one of the settings themselves.
4. Lightning vs a hand-written loop [<= 1.2x]: ``Trainer.predict`` vs a loop over the same
   DataLoader with the same engine and settings (batch to device, ``predict_step``); a cProfile
   of one ``Trainer.predict`` is written to ``lightning_profile.txt``.
5. ``--two-gpu``: ``examples/distributed_predict.py`` on 2 ranks (a cold run, then a warm one) and
   then on 1 rank (warm, from rank 0's file): steady throughput of the warm runs [>= 1.8x], and
   each rank's first batch warm / cold [<= 0.10].

Per-batch latency is the mean over all batches after the first (from the end of the first batch
to ``on_predict_epoch_end``, before any callback's end-of-loop cache save; CUDA-synchronized,
``time.perf_counter``); each variant of one measurement
runs in the same process, interleaved, the first round a warm-up that is left out. Writes
``results.md``, ``results.json`` and ``results.png`` (when matplotlib is importable) to ``--out``,
each naming the GPU model, and rewrites them after every measurement (an interrupted run keeps
what it measured); logs and programs go to ``--out/work`` (git-ignored).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NCCL's NVLink multicast off
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
for _path in (ROOT, EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)

EXIT_NO_GPU = 2
TASK_TIMEOUT_S = 600
# Test-only: run every task's plumbing eagerly on CPU (no engines, figures meaningless, results
# stamped as a dry run). The CPU test suite uses it; a real run never sets it.
DRY_RUN_ENV = "LIGHTNING_TRT_RTX_BENCH_DRY_RUN"


def dry_run() -> bool:
    return os.environ.get(DRY_RUN_ENV) == "1"


# key: (comparison, goal, how the goal reads)
GOALS: dict[str, tuple[str, float, str]] = {
    "warm_start": ("<=", 0.10, "<= 0.10"),
    "graphs": (">=", 2.5, ">= 2.5x"),
    "integration_overhead": ("<=", 2.0, "<= 2%"),
    "lightning_vs_loop": ("<=", 1.2, "<= 1.2x"),
    "two_gpu_throughput": (">=", 1.8, ">= 1.8x"),
    "two_gpu_warm_start": ("<=", 0.10, "<= 0.10 on every rank"),
}


def goal_met(key: str, value: Optional[float]) -> Optional[bool]:
    if value is None or key not in GOALS:
        return None
    op, goal, _ = GOALS[key]
    return value <= goal if op == "<=" else value >= goal


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ==================================================================================================
# tasks: each runs in its own process (``--_task NAME --_spec JSON``) and writes a JSON result
# ==================================================================================================


def _device() -> Any:
    import torch

    return torch.device("cpu") if dry_run() else torch.device("cuda", torch.cuda.current_device())


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _trainer(callbacks: list) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu" if dry_run() else "gpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def _predict(model: Any, data: Any, callbacks: list) -> None:
    _trainer(callbacks).predict(model, datamodule=data, return_predictions=False)


def _versions() -> dict[str, str]:
    import importlib.metadata

    import torch

    from lightning_trt_rtx import _backend

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("lightning", "torch-tensorrt-rtx", "torch-tensorrt"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    versions["tensorrt"] = _backend.trt_version() or "?"
    return versions


def task_prep(spec: dict) -> dict:
    """Compile the conv net once, check it against eager, save the program for the warm-start runs."""
    import torch
    from _model import build_model, compile_tensorrt, device_name, save_program

    from lightning_trt_rtx import _backend

    if dry_run():
        return {
            "gpu": device_name(),
            "capability": "cpu",
            "gpus": 0,
            "versions": _versions(),
            "rtx": _backend.is_rtx_build(),
        }
    _backend.torch_tensorrt()
    device = torch.device("cuda", 0)
    net = build_model("conv").to(device)
    x = torch.randn(spec["batch_size"], 3, 32, 32, device=device)
    start = time.perf_counter()
    compiled = compile_tensorrt(net, x)
    compile_s = time.perf_counter() - start
    save_program(compiled, spec["program"], x)  # before anything runs it: the saved engine is untouched
    with torch.inference_mode():
        diff = (compiled(x) - net(x)).abs().max().item()
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu": device_name(),
        "capability": f"sm{major}{minor}",
        "gpus": torch.cuda.device_count(),
        "versions": _versions(),
        "rtx": _backend.is_rtx_build(),
        "conv_compile_s": compile_s,
        "conv_max_abs_diff": diff,
        "program_bytes": os.path.getsize(spec["program"]),
    }


def task_first_batch(spec: dict) -> dict:
    """One warm-start repetition: load the saved program, predict a few batches, report the first."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings, _backend

    cache_dir = spec["cache_dir"]
    if spec["cold"] and os.path.isdir(cache_dir):
        for name in os.listdir(cache_dir):
            os.remove(os.path.join(cache_dir, name))
    _backend.torch_tensorrt()  # import outside the timed window
    settings = TRTRuntimeSettings(runtime_cache=os.path.join(cache_dir, "rank{rank}.bin"), print_table=False)
    timer = BatchTimer()
    model = CompiledPredictor("conv", spec["batch_size"], program=None if dry_run() else spec["program"])
    _predict(model, SyntheticDataModule("conv", spec["batch_size"], spec["batches"]), [settings, timer])
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


def _engine_loop(model: Any, settings: Any, calls: int) -> float:
    """Per-call ms of the bare engine(s) under ``settings`` (no Lightning, no data loading)."""
    import torch
    from _model import model_spec

    from lightning_trt_rtx import cache, engines

    shared = cache.open_shared(settings.runtime_cache, cache.Placement.current())
    binding = engines.EngineBinding(model.net)
    binding.apply(settings.to_runtime_settings(shared.handle))
    try:
        x = torch.randn(model.batch_size, *model_spec(model.model_name).input_shape, device=_device())
        x = x.to(model.input_dtype)
        with torch.inference_mode():
            for _ in range(10):  # context creation and capture stay out of the timing
                model.net(x)
            _sync()
            start = time.perf_counter()
            for _ in range(calls):
                model.net(x)
            _sync()
        return (time.perf_counter() - start) * 1e3 / calls
    finally:
        binding.restore()


def _hand_loop(model: Any, data: Any, settings: Any) -> dict:
    """What Trainer.predict does per batch, by hand: same DataLoader, same engine, same settings."""
    import torch

    from lightning_trt_rtx import cache, engines

    shared = cache.open_shared(settings.runtime_cache, cache.Placement.current())
    binding = engines.EngineBinding(model.net)
    binding.apply(settings.to_runtime_settings(shared.handle))
    device = _device()
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
                    _sync()
                    first_end = time.perf_counter()
        _sync()
        end = time.perf_counter()
    finally:
        binding.restore()
    return {"first_batch_ms": (first_end - start) * 1e3, "per_batch_ms": (end - first_end) * 1e3 / max(batches - 1, 1)}


def task_graphs(spec: dict) -> dict:
    """Per-batch latency in Trainer.predict, default vs whole-graph capture, interleaved; bare engine too."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    template = os.path.join(spec["cache_dir"], "rank{rank}.bin")
    model = CompiledPredictor(spec["model"], spec["batch_size"])
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    strategies = ("disabled", "whole_graph_capture")
    out: dict[str, list] = {f"{kind}_{s}": [] for kind in ("lightning", "figures", "engine") for s in strategies}
    for rep in range(spec["reps"] + 1):
        for strategy in strategies if rep % 2 == 0 else strategies[::-1]:
            settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)
            timer = BatchTimer()
            _predict(model, data, [settings, timer])
            engine_ms = _engine_loop(model, settings.settings, spec["batches"])
            if rep == 0:
                continue  # warm-up round
            out[f"lightning_{strategy}"].append(timer.per_batch_ms)
            out[f"figures_{strategy}"].append(settings.figures[0].mean_batch_ms)
            out[f"engine_{strategy}"].append(engine_ms)
    return {"reps": out, "compile_s": model.compile_s}


class _ManualSettingsPredictor:
    """Factory for the hand-applied variants (defined lazily: importing Lightning is slow)."""

    cls: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.cls is not None:
            return cls.cls
        from _model import CompiledPredictor

        from lightning_trt_rtx import _backend
        from lightning_trt_rtx.session import ServingSession
        from lightning_trt_rtx.settings import TRTSettings

        class ManualSettingsPredictor(CompiledPredictor):
            """The same settings applied in the LightningModule, without the callback.

            ``by_hand="manual"``: what one would write with upstream's API alone: ``setup`` gives
            every TorchTensorRTModule ``RuntimeSettings`` holding one ``RuntimeCache`` (loaded from
            ``cache_dir``/manual.bin); ``on_predict_end`` saves it. ``by_hand="core"``: the package's own
            ``ServingSession`` (what the callback drives) opened in ``setup`` and closed in
            ``on_predict_end``, without the callback's per-batch hooks: it tells a cost of those
            hooks apart from one of the settings and cache the package applies.
            ``by_hand=None``: a plain CompiledPredictor (the callback's variant).
            """

            def __init__(self, model_name: str, batch_size: int, cache_dir: str, cuda_graph_strategy: str) -> None:
                super().__init__(model_name, batch_size)
                self.cache_dir = cache_dir
                self.cuda_graph_strategy = cuda_graph_strategy
                self.by_hand: Optional[str] = "manual"
                self.runtime_cache: Any = None

            def setup(self, stage: str) -> None:
                super().setup(stage)
                if self.by_hand == "manual":
                    runtime = _backend.torch_tensorrt().runtime
                    if self.runtime_cache is None:
                        self.runtime_cache = runtime.RuntimeCache(path=os.path.join(self.cache_dir, "manual.bin"))
                        self.runtime_cache.load()
                    settings = runtime.RuntimeSettings(
                        cuda_graph_strategy=self.cuda_graph_strategy, runtime_cache=self.runtime_cache
                    )
                    for module in self.net.modules():
                        if isinstance(module, runtime.TorchTensorRTModule):
                            module.runtime_settings = settings
                elif self.by_hand == "core":
                    settings = TRTSettings(
                        cuda_graph_strategy=self.cuda_graph_strategy,
                        runtime_cache=os.path.join(self.cache_dir, "core.bin"),
                    )
                    session = ServingSession.of(self)
                    session.configure(settings, "benchmark core variant", self.trainer)
                    session.attach()

            def on_predict_end(self) -> None:
                if self.by_hand == "manual":
                    self.runtime_cache.save()
                elif self.by_hand == "core":
                    ServingSession.of(self).close()  # saves the cache, restores the engines

        cls.cls = ManualSettingsPredictor
        return cls.cls


OVERHEAD_VARIANTS = ("callback", "manual", "core")


def task_overhead(spec: dict) -> dict:
    """Per-batch latency: the callback vs the same settings applied by hand, interleaved, one engine."""
    from _model import BatchTimer, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    strategy = spec["strategy"]
    template = os.path.join(spec["cache_dir"], "callback", "rank{rank}.bin")
    # one compiled module for every variant: only the way of applying the settings differs
    model = _ManualSettingsPredictor.get()(spec["model"], spec["batch_size"], spec["cache_dir"], strategy)
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    out: dict[str, list] = {variant: [] for variant in OVERHEAD_VARIANTS}
    for rep in range(spec["reps"] + 1):
        shift = rep % len(OVERHEAD_VARIANTS)  # every variant takes every place in the order in turn
        for variant in OVERHEAD_VARIANTS[shift:] + OVERHEAD_VARIANTS[:shift]:
            timer = BatchTimer()
            model.by_hand = None if variant == "callback" else variant
            callbacks: list = [timer]
            if variant == "callback":
                settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)
                callbacks.insert(0, settings)
            _predict(model, data, callbacks)
            if rep:
                out[variant].append(timer.per_batch_ms)
    return {"reps": out}


def task_loop(spec: dict) -> dict:
    """Per-batch latency: Trainer.predict vs a hand-written loop, same engine and settings, interleaved."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    template = os.path.join(spec["cache_dir"], "rank{rank}.bin")
    model = CompiledPredictor(spec["model"], spec["batch_size"])
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    out: dict[str, list] = {"lightning": [], "loop": []}

    def lightning() -> float:
        settings = TRTRuntimeSettings(cuda_graph_strategy=spec["strategy"], runtime_cache=template, print_table=False)
        timer = BatchTimer()
        _predict(model, data, [settings, timer])
        return timer.per_batch_ms

    def loop() -> float:
        from lightning_trt_rtx.settings import TRTSettings

        return _hand_loop(model, data, TRTSettings(cuda_graph_strategy=spec["strategy"], runtime_cache=template))[
            "per_batch_ms"
        ]

    for rep in range(spec["reps"] + 1):  # Lightning first in the warm-up round: it compiles the model
        for variant in ("lightning", "loop") if rep % 2 == 0 else ("loop", "lightning"):
            ms = lightning() if variant == "lightning" else loop()
            if rep:
                out[variant].append(ms)
    result: dict[str, Any] = {"reps": out}
    if spec.get("profile"):
        result["profile"] = _profile(lambda: lightning(), spec["profile"], spec["batches"])
    return result


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


TASKS: dict[str, Callable[[dict], dict]] = {
    "prep": task_prep,
    "first-batch": task_first_batch,
    "graphs": task_graphs,
    "overhead": task_overhead,
    "loop": task_loop,
}


# ==================================================================================================
# the runner
# ==================================================================================================


class Runner:
    def __init__(self, out: str, verbose: bool = False) -> None:
        self.out = out
        self.work = os.path.join(out, "work")
        self.logs = os.path.join(self.work, "logs")
        os.makedirs(self.logs, exist_ok=True)
        with open(os.path.join(self.work, ".gitignore"), "w", encoding="utf-8") as f:
            f.write("*\n")
        self.verbose = verbose
        self.count = 0

    def task(self, name: str, spec: dict, env: Optional[dict] = None) -> dict:
        """Run one task in a fresh process; its JSON result, or an exception with the log's tail."""
        self.count += 1
        result_path = os.path.join(self.work, f"{self.count:02d}-{name}.json")
        log_path = os.path.join(self.logs, f"{self.count:02d}-{name}.log")
        command = [sys.executable, os.path.abspath(__file__), "--_task", name, "--_spec", json.dumps(spec)]
        command += ["--_result", result_path]
        child_env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"), PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        return self._run(command, child_env, log_path, result_path, name)

    def script(self, name: str, command: list[str], result_path: str) -> dict:
        log_path = os.path.join(self.logs, f"{name}.log")
        env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"), PYTHONUNBUFFERED="1")
        return self._run(command, env, log_path, result_path, name)

    def _run(self, command: list[str], env: dict, log_path: str, result_path: str, name: str) -> dict:
        start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            try:
                proc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=TASK_TIMEOUT_S)
                code: Any = proc.returncode
            except subprocess.TimeoutExpired:
                code = f"timeout after {TASK_TIMEOUT_S} s"
        seconds = time.perf_counter() - start
        if self.verbose:
            print(f"    [{name}] {seconds:.1f} s, log {log_path}", flush=True)
        if code != 0 or not os.path.isfile(result_path):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-40:])
            raise RuntimeError(f"{name} failed (exit {code}); last lines of {log_path}:\n{tail}")
        with open(result_path, encoding="utf-8") as f:
            return json.load(f)


def measure_warm_start(runner: Runner, cfg: dict, driver_jit_cache: bool) -> dict:
    program = os.path.join(runner.work, "conv.ep")
    cache_dir = os.path.join(runner.work, "cache-warm-start")
    os.makedirs(cache_dir, exist_ok=True)
    env = {} if driver_jit_cache else {"CUDA_CACHE_DISABLE": "1"}
    base = {"program": program, "cache_dir": cache_dir, "batch_size": 32, "batches": 3}
    cold, warm = [], []
    for _ in range(cfg["first_batch_reps"]):
        cold.append(runner.task("first-batch", {**base, "cold": True}, env))
        warm.append(runner.task("first-batch", {**base, "cold": False}, env))
    cold_ms = median([r["first_batch_ms"] for r in cold])
    warm_ms = median([r["first_batch_ms"] for r in warm])
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
            "program_load_s": median([r["load_program_s"] for r in cold + warm]),
            "driver_jit_cache": "on" if driver_jit_cache else "off (CUDA_CACHE_DISABLE=1)",
        },
    }


def measure_graphs(runner: Runner, cfg: dict) -> dict:
    spec = {"model": "mlp-deep", "batch_size": 8, "batches": cfg["batches"], "reps": cfg["reps"]}
    spec["cache_dir"] = os.path.join(runner.work, "cache-graphs")
    result = runner.task("graphs", spec)["reps"]
    default = median(result["lightning_disabled"])
    graphs = median(result["lightning_whole_graph_capture"])
    engine_default = median(result["engine_disabled"])
    engine_graphs = median(result["engine_whole_graph_capture"])
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


def paired_pct(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per repetition, how much slower ``a`` ran than ``b`` in % (both from the same round)."""
    return [(x / y - 1.0) * 100 for x, y in zip(a, b) if y > 0]


def measure_overhead(runner: Runner, cfg: dict) -> dict:
    spec = {"model": "mlp", "batch_size": 8, "batches": 2 * cfg["batches"], "reps": 2 * cfg["reps"]}
    spec.update(strategy="disabled", cache_dir=os.path.join(runner.work, "cache-overhead"))
    result = runner.task("overhead", spec)["reps"]
    callback, manual = median(result["callback"]), median(result["manual"])
    # paired: the variants of one round ran within seconds of each other, so a drift of the host's speed cancels
    pairs = paired_pct(result["callback"], result["manual"])
    core_pairs = paired_pct(result["core"], result["manual"])
    pct = median(pairs) if pairs else None
    slower = sum(p > 0 for p in pairs)
    return {
        "key": "integration_overhead",
        "measurement": "integration overhead: TRTRuntimeSettings callback vs the same settings applied by hand"
        " (8x1024 MLP, batch 8, per batch; median of paired repetitions)",
        "value": pct,
        "display": f"{pct:+.2f}% (callback slower in {slower} of {len(pairs)} pairs, {min(pairs):+.1f}% to"
        f" {max(pairs):+.1f}%; medians {callback * 1e3:.0f} us vs {manual * 1e3:.0f} us per batch)"
        if pct is not None
        else "n/a",
        "pair": {"labels": ["by hand", "callback"], "values": [manual * 1e3, callback * 1e3], "unit": "us per batch"},
        "details": {
            "per_batch_ms": result,
            "paired_pct_callback_vs_manual": pairs,
            # the package's core layer applied in the module: the settings' cost without the callback's hooks
            "paired_pct_core_vs_manual": core_pairs,
            "median_pct_core_vs_manual": median(core_pairs) if core_pairs else None,
        },
    }


def measure_loop(runner: Runner, cfg: dict, profile: bool) -> dict:
    spec = {"model": "mlp", "batch_size": 8, "batches": cfg["batches"], "reps": cfg["reps"], "strategy": "disabled"}
    spec["cache_dir"] = os.path.join(runner.work, "cache-loop")
    if profile:
        spec["profile"] = os.path.join(runner.out, "lightning_profile.txt")
    result = runner.task("loop", spec)
    reps = result["reps"]
    lightning, loop = median(reps["lightning"]), median(reps["loop"])
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


def measure_two_gpu(runner: Runner, cfg: dict) -> list[dict]:
    """2 ranks cold then warm, then 1 rank warm from rank 0's file: throughput of the warm runs, warm/cold per rank."""
    cache_dir = os.path.join(runner.work, "cache-distributed")
    summaries = {}
    for devices, runs in ((2, 2), (1, 1)):
        path = os.path.join(runner.work, f"distributed-{devices}.json")
        command = [
            sys.executable, os.path.join(EXAMPLES, "distributed_predict.py"),
            "--devices", str(devices), "--runs", str(runs), "--model", "conv",
            "--batches", str(cfg["two_gpu_batches"]), "--cache-dir", cache_dir,
            "--output-dir", os.path.join(runner.work, f"predictions-{devices}"),
            "--summary-json", path,
        ] + (["--clear-cache"] if devices == 2 else [])  # fmt: skip
        summaries[devices] = runner.script(f"distributed-{devices}", command, path)
    one, two = summaries[1]["runs"][-1], summaries[2]["runs"][-1]
    speedup = two["steady_samples_per_s"] / one["steady_samples_per_s"] if one["steady_samples_per_s"] else None
    cold_run, warm_run = summaries[2]["runs"][0], summaries[2]["runs"][-1]
    ratios = [
        w["first_batch_ms"] / c["first_batch_ms"] if c["first_batch_ms"] else float("nan")
        for c, w in zip(cold_run["ranks"], warm_run["ranks"])
    ]

    def ranks(run: dict) -> list[dict]:
        keys = ("batches", "per_batch_ms", "first_batch_ms", "loop_s")
        return [{k: r[k] for k in keys} for r in run["ranks"]]

    throughput = {
        "key": "two_gpu_throughput",
        "measurement": "2 GPUs vs 1: steady throughput of examples/distributed_predict.py"
        " (conv net, batch 32, warm runs)",
        "value": speedup,
        "display": f"{speedup:.2f}x ({two['steady_samples_per_s']:.0f} vs {one['steady_samples_per_s']:.0f} samples/s)"
        if speedup
        else "n/a",
        "pair": {
            "labels": ["1 GPU", "2 GPUs"],
            "values": [one["steady_samples_per_s"], two["steady_samples_per_s"]],
            "unit": "samples/s",
        },
        "details": {
            "samples_per_s_including_first_batch": [one["samples_per_s"], two["samples_per_s"]],
            "batches": cfg["two_gpu_batches"],
            "ranks_1_gpu": ranks(one),
            "ranks_2_gpus": ranks(two),
        },
    }
    warm = {
        "key": "two_gpu_warm_start",
        "measurement": "2 GPUs: first batch warm / cold on each rank (distributed_predict.py, run 2 / run 1)",
        "value": max(ratios) if ratios else None,
        "display": ", ".join(f"rank {i}: {r:.3f}" for i, r in enumerate(ratios)),
        "details": {
            "cold_first_batch_ms": [r["first_batch_ms"] for r in cold_run["ranks"]],
            "warm_first_batch_ms": [r["first_batch_ms"] for r in warm_run["ranks"]],
            "warm_cache_source": [(r.get("figures") or {}).get("cache_source") for r in warm_run["ranks"]],
        },
    }
    return [throughput, warm]


# ==================================================================================================
# outputs
# ==================================================================================================


def write_results(results: dict, out: str) -> list[str]:
    """results.json, results.md and (with matplotlib) results.png under ``out``; returns the paths."""
    os.makedirs(out, exist_ok=True)
    rows = results["measurements"]
    for row in rows:
        row["goal"] = GOALS[row["key"]][2] if row["key"] in GOALS else ""
        row["met"] = goal_met(row["key"], row.get("value"))
    written = []
    png = os.path.join(out, "results.png")
    plot_note = _plot(results, png)
    results["plot"] = plot_note or "results.png"
    path = os.path.join(out, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
    written.append(path)
    path = os.path.join(out, "results.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(results))
    written.append(path)
    if plot_note is None:
        written.append(png)
    return written


def _met(value: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[value]


def markdown(results: dict) -> str:
    gpu, date = results["gpu"], results["date"]
    versions = results.get("versions", {})
    lines = [
        "# lightning-trt-rtx benchmark results",
        "",
        f"GPU: **{gpu}** · date {date} · "
        + " · ".join(f"{k} {v}" for k, v in versions.items())
        + f" · `{results.get('command', 'python benchmarks/run.py')}` · {results.get('runtime_s', 0):.0f} s in all",
        "",
        "| measurement | value | goal | met? | GPU | date |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["measurements"]:
        value = row.get("display") or ("failed" if row.get("error") else "n/a")
        lines.append(
            f"| {row['measurement']} | {value} | {row.get('goal', '')} | {_met(row.get('met'))} | {gpu} | {date} |"
        )
    lines += ["", "## Method", ""]
    lines += [f"- {line}" for line in results.get("method", [])]
    lines += ["", "## Details", ""]
    for row in results["measurements"]:
        lines.append(f"### {row['measurement']}")
        if row.get("error"):
            lines += ["", "```", row["error"].rstrip(), "```", ""]
            continue
        lines += ["", "```json", json.dumps(row.get("details", {}), indent=1, default=str), "```", ""]
    if results.get("plot") and results["plot"] != "results.png":
        lines += [f"results.png: {results['plot']}", ""]
    return "\n".join(lines)


def _plot(results: dict, path: str) -> Optional[str]:
    """Bar pairs of each measurement; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in results["measurements"] if r.get("pair")]
    if not rows:
        return "skipped: no measurement to plot"
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        pair = row["pair"]
        bars = ax.bar(pair["labels"], pair["values"], color=["#9aa5b1", "#76b900"])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in pair["values"]], fontsize=8)
        ax.set_ylabel(pair["unit"], fontsize=8)
        title = row["key"].replace("_", " ")
        met = {True: "goal met", False: "goal missed", None: ""}[row.get("met")]
        ax.set_title(f"{title}\n{row.get('goal', '')} {met}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"lightning-trt-rtx on {results['gpu']} ({results['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


METHOD = [
    "Every measurement runs in fresh processes (subprocesses of benchmarks/run.py); within one, the variants"
    " being compared alternate, the first round is a warm-up left out, and the figure is the median of the rest.",
    "Per-batch latency: mean over the batches after the first, from the end of the first batch to the end of the"
    " loop at on_predict_epoch_end, before any end-of-loop cache save (torch.cuda.synchronize,"
    " time.perf_counter). Trainer.predict runs with return_predictions=False,"
    " no logger, no progress bar.",
    "Warm start: the conv net (14 conv layers of distinct shapes) is compiled once and saved with"
    " torch_tensorrt.save; each repetition is a cold process (cache files removed) then a warm process, both"
    " loading that program with the CUDA driver's JIT cache off, timed by the callback's figures.first_batch_ms"
    " (context creation and kernel JIT or cache load included).",
    "Integration overhead: one compiled module serves three variants in one process, in rotating order; only the"
    " way the settings are applied differs: the callback, upstream's API in setup/on_predict_end of the"
    " LightningModule (the baseline), or this package's core layer there (no callback). The figure is the median"
    " over repetitions of callback / baseline - 1, each pair from the same round.",
    "2 GPUs: distributed_predict.py runs on 2 ranks (cold, then warm), then on 1 rank (warm, from rank 0's file)."
    " Throughput is all ranks' samples after their first batch over the union of their wall-clock windows.",
]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="results folder")
    parser.add_argument("--quick", action="store_true", help="2 repetitions, 200 batches (about 2 minutes)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 5, quick 2)")
    parser.add_argument(
        "--batches", type=int, default=None, help="batches for per-batch latency (default 1000, quick 200)"
    )
    parser.add_argument("--two-gpu", action="store_true", help="also measure examples/distributed_predict.py on 2 GPUs")
    parser.add_argument(
        "--driver-jit-cache", action="store_true", help="keep the CUDA driver's JIT cache in warm-start runs"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile of Trainer.predict")
    parser.add_argument(
        "--only", nargs="+", choices=("warm_start", "graphs", "overhead", "loop", "two_gpu"), default=None
    )
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--_task", choices=sorted(TASKS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_spec", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._task:
        result = TASKS[args._task](json.loads(args._spec))
        with open(args._result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
        return 0

    import torch

    from lightning_trt_rtx import _backend

    if not torch.cuda.is_available() and not dry_run():
        print(
            "benchmarks/run.py needs an NVIDIA GPU with torch-tensorrt-rtx, and CUDA is not available here:"
            " nothing was measured. Run it on a GPU host (see benchmarks/README.md).",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    if not _backend.is_available():
        print(
            f"benchmarks/run.py needs torch-tensorrt-rtx, which is not installed: `{_backend.INSTALL_HINT}`."
            " Nothing was measured.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU

    wanted = set(args.only or ("warm_start", "graphs", "overhead", "loop") + (("two_gpu",) if args.two_gpu else ()))
    reps = args.reps or (2 if args.quick else 5)
    cfg = {
        "reps": reps,
        "first_batch_reps": reps,
        "batches": args.batches or (200 if args.quick else 1000),
        "two_gpu_batches": 2000 if args.quick else 8000,  # long enough that the ranks' start skew is noise
    }
    out = os.path.abspath(args.out)
    runner = Runner(out, verbose=args.verbose)
    start = time.perf_counter()
    print(f"benchmarks: results to {out} ({reps} repetitions, {cfg['batches']} batches per latency run)", flush=True)
    print("  preparing: compiling and saving the conv net ...", flush=True)
    prep = runner.task("prep", {"program": os.path.join(runner.work, "conv.ep"), "batch_size": 32})
    print(
        f"  GPU: {prep['gpu']} ({prep['capability']}), conv net compiled in {prep.get('conv_compile_s', 0):.1f} s",
        flush=True,
    )
    results: dict[str, Any] = {
        "gpu": prep["gpu"],
        "capability": prep["capability"],
        "date": datetime.date.today().isoformat(),
        "versions": prep["versions"],
        "rtx_build": prep["rtx"],
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": cfg,
        "prep": prep,
        "method": METHOD,
        "measurements": [],
    }
    if dry_run():
        results["gpu"] = "cpu (DRY RUN: plumbing check, no engines, not measurements)"
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "warm_start",
            "warm start (cold/warm processes)",
            lambda: measure_warm_start(runner, cfg, args.driver_jit_cache),
        ),
        ("graphs", "whole-graph capture", lambda: measure_graphs(runner, cfg)),
        ("overhead", "callback vs by hand", lambda: measure_overhead(runner, cfg)),
        ("loop", "Trainer.predict vs hand loop", lambda: measure_loop(runner, cfg, not args.no_profile)),
        ("two_gpu", "2 GPUs vs 1", lambda: measure_two_gpu(runner, cfg)),
    ]
    failed = False
    for key, label, step in steps:
        if key not in wanted:
            continue
        if key == "two_gpu" and prep["gpus"] < 2:
            print(f"  {label}: skipped, {prep['gpus']} GPU visible", flush=True)
            results["measurements"].append(
                {"key": "two_gpu_throughput", "measurement": "2 GPUs vs 1 (skipped: fewer than 2 GPUs)", "value": None}
            )
            continue
        step_start = time.perf_counter()
        print(f"  {label} ...", flush=True)
        try:
            measured = step()
        except Exception as err:  # one failed measurement must not lose the others
            failed = True
            print(f"  {label}: FAILED\n{err}", file=sys.stderr, flush=True)
            results["measurements"].append({"key": key, "measurement": label, "value": None, "error": str(err)})
            continue
        for row in measured if isinstance(measured, list) else [measured]:
            results["measurements"].append(row)
            print(
                f"    {row['measurement']}: {row.get('display')} ({time.perf_counter() - step_start:.0f} s)", flush=True
            )
        results["runtime_s"] = time.perf_counter() - start
        write_results(results, out)  # after each measurement: an interrupted run keeps what it measured
    results["runtime_s"] = time.perf_counter() - start
    written = write_results(results, out)
    print()
    print(markdown(results).split("## Method")[0].rstrip())
    print()
    print(
        "wrote "
        + ", ".join(written)
        + (f" (results.png {results['plot']})" if results["plot"] != "results.png" else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
