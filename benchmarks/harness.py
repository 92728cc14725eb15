"""What every benchmark shares: paths, goals, statistics, the quiet Trainer, the task runner, results files.

A benchmark module (``warm_start``, ``graphs``, ``overhead``, ``loop``, ``two_gpu``) has up to two parts:

- ``task(spec) -> dict``: runs inside a fresh process (``run.py --_task NAME``) and returns raw figures;
- ``measure(runner, cfg) -> row(s)``: runs in the parent, starts tasks through :class:`Runner`, and
  turns their figures into result rows: ``{"key", "measurement", "value", "display", "pair", "details"}``.

Nothing here imports torch or Lightning at module level, so ``run.py --help`` is quick.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NCCL's NVLink multicast off
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
RUN_PY = os.path.join(HERE, "run.py")  # every task runs as ``python benchmarks/run.py --_task NAME``
for _path in (ROOT, EXAMPLES):  # the package, and the examples' ``_model`` the tasks import
    if _path not in sys.path:
        sys.path.insert(0, _path)

EXIT_NO_GPU = 2
TASK_TIMEOUT_S = 600
# Test-only: run every task's plumbing eagerly on CPU (no engines, figures meaningless, results
# stamped as a dry run). The CPU test suite uses it; a real run never sets it.
DRY_RUN_ENV = "LIGHTNING_TRT_RTX_BENCH_DRY_RUN"


def dry_run() -> bool:
    return os.environ.get(DRY_RUN_ENV) == "1"


# ==================================================================================================
# goals and statistics
# ==================================================================================================

# key: (comparison, goal, how the goal reads)
GOALS: dict[str, tuple[str, float, str]] = {
    "warm_start": ("<=", 0.10, "<= 0.10"),
    "graphs": (">=", 2.5, ">= 2.5x"),
    "graphs_never_slower": (">=", 1.0, ">= 1.0x (median, every model)"),
    "graphs_never_slower_any_repetition": (">=", 0.95, ">= 0.95x in every repetition"),
    "graphs_auto_vs_best": (">=", 0.95, ">= 0.95x the fastest candidate"),
    "graphs_auto_first_loop": (">=", 1.0, ">= 1.0x (median, every model)"),
    "graphs_addresses_overhead": ("<=", 5.0, "<= 5 us per call"),
    "graphs_vs_bare": ("<=", 1.25, "<= 1.25x"),
    "integration_overhead": ("<=", 2.0, "<= 2%"),
    "lightning_vs_loop": ("<=", 1.2, "<= 1.2x"),
    "two_gpu_throughput": (">=", 1.8, ">= 1.8x"),
    "two_gpu_warm_start": ("<=", 0.10, "<= 0.10 on every rank"),
    "two_gpu_swapped_warm_start": ("<=", 0.10, "<= 0.10 on every rank"),
    "serving_efficiency": (">=", 0.95, ">= 0.95"),
    "serving_efficiency_host": (">=", 0.85, ">= 0.85"),
    "serving_efficiency_mlp_cost": ("<=", 1.25, "<= 1.25x"),
}


def goal_key(key: str) -> str:
    """The goal a row's key answers to: ``serving_efficiency_<model>`` rows share one."""
    if key in GOALS:
        return key
    for prefix in ("serving_efficiency_host", "serving_efficiency"):
        if key.startswith(prefix + "_"):
            return prefix
    return key


def goal_met(key: str, value: float | None) -> bool | None:
    key = goal_key(key)
    if value is None or key not in GOALS:
        return None
    op, goal, _ = GOALS[key]
    return value <= goal if op == "<=" else value >= goal


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def paired_pct(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per repetition, how much slower ``a`` ran than ``b`` in % (both from the same round)."""
    return [(x / y - 1.0) * 100 for x, y in zip(a, b) if y > 0]


# ==================================================================================================
# inside a task: the device, the quiet Trainer, settings applied without Lightning
# ==================================================================================================


def device() -> Any:
    import torch

    return torch.device("cpu") if dry_run() else torch.device("cuda", torch.cuda.current_device())


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def trainer(callbacks: list) -> Any:
    """A Trainer that prints and saves nothing: no logger, progress bar, model summary or checkpoints."""
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


def predict(model: Any, data: Any, callbacks: list) -> None:
    trainer(callbacks).predict(model, datamodule=data, return_predictions=False)


def bind_engines(net: Any, settings: Any) -> Any:
    """Give every engine under ``net`` the ``TRTSettings`` with a fresh run cache, no Lightning involved.

    Returns the ``EngineBinding``; call its ``restore()`` when done. The cache is not saved.
    """
    from lightning_trt_rtx import cache, engines

    run_cache = cache.RunCache(settings.runtime_cache, cache.Placement.current())
    binding = engines.EngineBinding(net)
    binding.apply(settings.to_runtime_settings(run_cache.handle))
    return binding


def prepare_cache_dir(cache_dir: str, cold: bool) -> str:
    """``cache_dir``, emptied first for a cold process; torch_tensorrt imported here, outside the timed window."""
    from lightning_trt_rtx import _backend

    if cold and os.path.isdir(cache_dir):
        for entry in os.listdir(cache_dir):
            os.remove(os.path.join(cache_dir, entry))
    os.makedirs(cache_dir, exist_ok=True)
    _backend.torch_tensorrt()
    return cache_dir


def served_figures(figures: Any, cache_dir: str) -> dict[str, Any]:
    """What a cold or warm process reports of its one ``Trainer.predict``: the callback's figures and the
    size of the cache files it left in ``cache_dir``."""
    files = [os.path.join(cache_dir, f) for f in os.listdir(cache_dir) if f.endswith(".bin")]
    return {
        "first_batch_ms": figures.first_batch_ms,
        "engines": figures.engines,
        "cache_source": figures.cache_source,
        "cache_bytes": figures.cache_bytes,
        "saved_bytes": figures.saved_bytes,
        "cache_file_bytes": sum(os.path.getsize(f) for f in files),
    }


def bare_engine_ms(net: Any, x: Any, settings: Any, calls: int, hold: bool = False) -> float:
    """Per-call ms of the engine(s) under ``net`` with the ``TRTSettings`` on one fixed input ``x`` (no
    Lightning, no loader). ``net`` is moved to ``x``'s device first: Lightning's teardown leaves it on the CPU.
    ``hold``: through the package's addresses wrapper (``lightning_trt_rtx.addresses``)."""
    import torch

    from lightning_trt_rtx.addresses import StableAddresses

    net.to(x.device)
    binding = bind_engines(net, settings)
    stable = StableAddresses(binding.engines) if hold else None
    if stable is not None:
        stable.install()
    try:
        with torch.inference_mode():
            for _ in range(10):  # context creation and capture stay out of the timing
                net(x)
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                net(x)
            sync()
        return (time.perf_counter() - start) * 1e3 / calls
    finally:
        if stable is not None:
            stable.uninstall()
        binding.restore()


# ==================================================================================================
# the environment: GPU, versions, and the conv net every warm-start repetition loads
# ==================================================================================================


def versions() -> dict[str, str]:
    import importlib.metadata

    import torch

    from lightning_trt_rtx import _backend

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("lightning", "torch-tensorrt-rtx", "torch-tensorrt"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    found["tensorrt"] = _backend.trt_version() or "?"
    return found


def task_prep(spec: dict) -> dict:
    """The GPU and versions; compile the conv net once, check it against eager, save it for the warm-start runs."""
    import torch
    from _model import build_model, compile_tensorrt, device_name, save_program

    from lightning_trt_rtx import _backend

    if dry_run():
        return {
            "gpu": device_name(),
            "capability": "cpu",
            "gpus": 0,
            "versions": versions(),
            "rtx": _backend.is_rtx_build(),
        }
    _backend.torch_tensorrt()
    gpu = torch.device("cuda", 0)
    net = build_model("conv").to(gpu)
    x = torch.randn(spec["batch_size"], 3, 32, 32, device=gpu)
    start = time.perf_counter()
    compiled = compile_tensorrt(net, x)
    compile_s = time.perf_counter() - start
    save_program(compiled, spec["program"], x)  # before anything runs it: the saved engine is untouched
    with torch.inference_mode():
        diff = (compiled(x) - net(x)).abs().max().item()
    major, minor = torch.cuda.get_device_capability(gpu)
    return {
        "gpu": device_name(),
        "capability": f"sm{major}{minor}",
        "gpus": torch.cuda.device_count(),
        "versions": versions(),
        "rtx": _backend.is_rtx_build(),
        "conv_compile_s": compile_s,
        "conv_max_abs_diff": diff,
        "program_bytes": os.path.getsize(spec["program"]),
    }


# ==================================================================================================
# the runner: every task and script in a fresh process, its log kept, its JSON result read back
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

    def task(self, name: str, spec: dict, env: dict | None = None) -> dict:
        """Run one task in a fresh process; its JSON result, or an exception with the log's tail."""
        self.count += 1
        result_path = os.path.join(self.work, f"{self.count:02d}-{name}.json")
        log_path = os.path.join(self.logs, f"{self.count:02d}-{name}.log")
        command = [sys.executable, RUN_PY, "--_task", name, "--_spec", json.dumps(spec)]
        command += ["--_result", result_path]
        child_env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"), PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        return self._run(command, child_env, log_path, result_path, name)

    def script(self, name: str, command: list[str], result_path: str, env: dict | None = None) -> dict:
        """Run a script (an example) that writes a JSON result to ``result_path``; ``env`` adds to the environment."""
        log_path = os.path.join(self.logs, f"{name}.log")
        child_env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"), PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        return self._run(command, child_env, log_path, result_path, name)

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


# ==================================================================================================
# outputs: results.json, results.md, results.png
# ==================================================================================================


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
    " LightningModule (the baseline), or this package's ServingSession there (no callback). The figure is the"
    " median over repetitions of callback / baseline - 1, each pair from the same round.",
    "2 GPUs: distributed_predict.py runs on 2 ranks (cold, then warm), then on 1 rank (warm, from rank 0's file),"
    " then on 2 ranks again with the GPU order swapped (CUDA_VISIBLE_DEVICES=1,0, same cache directory): each"
    " rank's first batch there over its first batch in the cold run, with the cache source it reported."
    " Throughput is all ranks' samples after their first batch over the union of their wall-clock windows.",
]


def write_results(results: dict, out: str) -> list[str]:
    """results.json, results.md and (with matplotlib) results.png under ``out``; returns the paths."""
    os.makedirs(out, exist_ok=True)
    rows = results["measurements"]
    for row in rows:
        row["goal"] = GOALS[goal_key(row["key"])][2] if goal_key(row["key"]) in GOALS else ""
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


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[value]


def markdown(results: dict) -> str:
    gpu, date = results["gpu"], results["date"]
    found = results.get("versions", {})
    lines = [
        "# lightning-trt-rtx benchmark results",
        "",
        f"GPU: **{gpu}** · date {date} · "
        + " · ".join(f"{k} {v}" for k, v in found.items())
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


def _plot(results: dict, path: str) -> str | None:
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


# ==================================================================================================
# per-batch times and the "until steady" point (real_models, dynamic_shapes)
# ==================================================================================================

STEADY_WINDOW = 5  # batches in each rolling median
STEADY_FACTOR = 1.2  # "steady": within this factor of the final median


def steady_point(times_ms: Sequence[float], window: int = STEADY_WINDOW, factor: float = STEADY_FACTOR) -> dict:
    """Where a run's batch times reach steady speed.

    ``final_median_ms``: the median of the second half of the batches. The steady index ``k`` is the first
    batch whose own time is within ``factor`` x that median and from which on the median of every
    ``window`` consecutive batches that starts in the first half (at ``k`` or later) is too, or, for a run
    not settled within its first half, every such window at ``k`` or later; ``until_ms``
    is the time of the batches before it (``sum(times_ms[:k])``: the first batch, and any slow ones after
    it). A single slow batch (a host hiccup) moves no window's median, and the second half is the steady
    state by definition: a burst of slow batches there (another process on the host) is part of what
    the final median measures, not a sign the run had not settled (on H200 such a burst at batch 2300 of
    2319 once reported a warm ResNet-50 as steady only at its end). ``steady`` is False when no such batch
    exists (``k == len(times_ms)``, ``until_ms`` the whole run).
    """
    n = len(times_ms)
    if n == 0:
        return {"index": 0, "until_ms": 0.0, "final_median_ms": float("nan"), "steady": False, "window": window}
    final = median(times_ms[n // 2 :])
    limit = factor * final
    w = max(1, min(window, n))
    bad = [j for j in range(n - w + 1) if median(times_ms[j : j + w]) > limit]
    last_bad = max((j for j in bad if j < n // 2), default=-1)
    k = next((i for i in range(last_bad + 1, n) if times_ms[i] <= limit), n)
    if k >= n // 2:  # not settled within the first half: the old, strict rule (every later window)
        k = next((i for i in range(max(bad, default=-1) + 1, n) if times_ms[i] <= limit), n)
    return {
        "index": k,
        "until_ms": float(sum(times_ms[:k])),
        "final_median_ms": final,
        "steady": k < n,
        "window": w,
        "factor": factor,
    }


def batch_times() -> Any:
    """A Lightning callback recording every predict batch's time (ms) and input shape.

    Batch 0 runs from its ``on_predict_batch_start`` to its end; batch i > 0 from the end of batch i - 1
    to its own end, so the loader and Lightning's own work between batches count, as a user sees them.
    Each end is CUDA-synchronized (a per-batch sync: use ``_model.BatchTimer`` for steady means).
    """
    from lightning.pytorch import Callback

    class BatchTimes(Callback):
        def __init__(self) -> None:
            self.times_ms: list[float] = []
            self.shapes: list[list[int]] = []
            self._last: float | None = None

        def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
            self.times_ms, self.shapes, self._last = [], [], None

        def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                   dataloader_idx: int = 0) -> None:  # fmt: skip
            if self._last is None:
                self._last = time.perf_counter()

        def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                 dataloader_idx: int = 0) -> None:  # fmt: skip
            sync()
            now = time.perf_counter()
            assert self._last is not None
            self.times_ms.append((now - self._last) * 1e3)
            self._last = now
            first = batch[0] if isinstance(batch, (tuple, list)) else batch
            self.shapes.append(list(getattr(first, "shape", ())))

    return BatchTimes()
