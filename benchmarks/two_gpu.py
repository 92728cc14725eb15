"""2 GPUs (``--two-gpu``): ``examples/distributed_predict.py`` on 2 ranks, then 1, then 2 with the GPU order swapped.

Three runs of the example, all with one cache directory, the first two GPUs in the order CUDA
numbers them (``A,B``: the first two entries of ``CUDA_VISIBLE_DEVICES``, else ``0,1``):

1. ``CUDA_VISIBLE_DEVICES=A,B``, 2 ranks, ``--runs 2 --clear-cache``: a cold run, then a warm one;
2. ``CUDA_VISIBLE_DEVICES=A,B``, 1 rank, warm from rank 0's file;
3. ``CUDA_VISIBLE_DEVICES=B,A``, 2 ranks, ``--runs 2``: every rank now runs on the other GPU, and
   each GPU under the other device number. A cache applies only on the GPU that filled it under the
   same device number (measured), so the first swapped run is cold and keeps the first order's files;
   the second swapped run is the warm start this order gets from then on.

Rows:

- ``two_gpu_throughput`` [>= 1.8x]: steady throughput of run 1's warm run over run 2's (all ranks'
  samples after their first batch over the union of their wall-clock windows);
- ``two_gpu_warm_start`` [<= 0.10 on every rank]: each rank's first batch, warm run / cold run;
- ``two_gpu_swapped_warm_start`` [<= 0.10 on every rank]: each rank's first batch in run 3's second
  run over that rank's first batch in the cold run (the first swapped run's figures are in the
  details), with the cache source each rank reported (``warm``, ``seeded``, ``other-gpu``,
  ``unverified``, ``cold``, ``corrupt``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from benchmarks import harness

SWAPPED_KEY = "two_gpu_swapped_warm_start"


def gpu_order() -> tuple[str, str]:
    """The first two GPUs as CUDA numbers them here: ``CUDA_VISIBLE_DEVICES``' first two entries, else 0 and 1."""
    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return (visible[0], visible[1]) if len(visible) >= 2 else ("0", "1")


def _example(
    runner: harness.Runner, name: str, devices: int, runs: int, cfg: dict, visible: str, clear: bool = False
) -> dict:
    """One ``distributed_predict.py`` job (``runs`` runs) under ``CUDA_VISIBLE_DEVICES=visible``; its summary."""
    path = os.path.join(runner.work, f"{name}.json")
    command = [
        sys.executable, os.path.join(harness.EXAMPLES, "distributed_predict.py"),
        "--devices", str(devices), "--runs", str(runs), "--model", "conv",
        "--batches", str(cfg["two_gpu_batches"]), "--cache-dir", os.path.join(runner.work, "cache-distributed"),
        "--output-dir", os.path.join(runner.work, name.replace("distributed", "predictions")),
        "--summary-json", path,
    ] + (["--clear-cache"] if clear else [])  # fmt: skip
    return runner.script(name, command, path, env={"CUDA_VISIBLE_DEVICES": visible})


def cache_source(rank: dict) -> str | None:
    """The cache source a rank reported in the example's summary (its figures are ``asdict(RankFigures)``)."""
    fig = rank.get("figures") or {}
    if "cache_source" in fig:
        return fig["cache_source"]
    if "cache" in fig:
        return (fig["cache"] or {}).get("source", "none")
    return None


def _gpu(rank: dict) -> str | None:
    """The physical GPU a rank ran on (the figures' ``gpu``: the UUID's first 8 hex digits; the ``-N``
    device-number suffix is dropped), if reported."""
    gpu = (rank.get("figures") or {}).get("gpu")
    return gpu.split("-")[0] if gpu else gpu


def _ratios(runs: list[dict], cold_run: dict) -> list[float]:
    return [
        r["first_batch_ms"] / c["first_batch_ms"] if c["first_batch_ms"] else float("nan")
        for c, r in zip(cold_run["ranks"], runs)
    ]


def measure(runner: harness.Runner, cfg: dict) -> list[dict]:
    """The three jobs, then the rows; a failed swapped job leaves the first two rows standing."""
    first, second = gpu_order()
    in_order, swapped_order = f"{first},{second}", f"{second},{first}"
    two = _example(runner, "distributed-2", 2, 2, cfg, in_order, clear=True)
    one = _example(runner, "distributed-1", 1, 1, cfg, in_order)
    try:
        swapped: Any = _example(runner, "distributed-2-swapped", 2, 2, cfg, swapped_order)
    except RuntimeError as err:
        swapped = err
    return rows(two, one, swapped, cfg, (in_order, swapped_order))


def rows(two: dict, one: dict, swapped: Any, cfg: dict, orders: tuple[str, str]) -> list[dict]:
    """Result rows from the example's summaries (``swapped``: a summary, or the exception its job raised)."""
    one_run, two_run = one["runs"][-1], two["runs"][-1]
    speedup = (
        two_run["steady_samples_per_s"] / one_run["steady_samples_per_s"] if one_run["steady_samples_per_s"] else None
    )
    cold_run, warm_run = two["runs"][0], two["runs"][-1]
    ratios = _ratios(warm_run["ranks"], cold_run)

    def ranks(run: dict) -> list[dict]:
        keys = ("batches", "per_batch_ms", "first_batch_ms", "loop_s")
        return [{k: r[k] for k in keys} for r in run["ranks"]]

    throughput = {
        "key": "two_gpu_throughput",
        "measurement": "2 GPUs vs 1: steady throughput of examples/distributed_predict.py"
        " (conv net, batch 32, warm runs)",
        "value": speedup,
        "display": f"{speedup:.2f}x ({two_run['steady_samples_per_s']:.0f} vs"
        f" {one_run['steady_samples_per_s']:.0f} samples/s)"
        if speedup
        else "n/a",
        "pair": {
            "labels": ["1 GPU", "2 GPUs"],
            "values": [one_run["steady_samples_per_s"], two_run["steady_samples_per_s"]],
            "unit": "samples/s",
        },
        "details": {
            "samples_per_s_including_first_batch": [one_run["samples_per_s"], two_run["samples_per_s"]],
            "batches": cfg["two_gpu_batches"],
            "cuda_visible_devices": orders[0],
            "ranks_1_gpu": ranks(one_run),
            "ranks_2_gpus": ranks(two_run),
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
            "warm_cache_source": [cache_source(r) for r in warm_run["ranks"]],
            "gpu_per_rank": [_gpu(r) for r in cold_run["ranks"]],
        },
    }
    return [throughput, warm, swapped_row(swapped, cold_run, orders)]


def swapped_row(swapped: Any, cold_run: dict, orders: tuple[str, str]) -> dict:
    """Each rank's first batch with the GPU order swapped over its cold first batch, and its cache source."""
    measurement = (
        f"2 GPUs, order swapped (CUDA_VISIBLE_DEVICES={orders[1]} after {orders[0]}, same cache directory):"
        " first batch / cold first batch on each rank"
    )
    if isinstance(swapped, BaseException):
        return {"key": SWAPPED_KEY, "measurement": measurement, "value": None, "error": str(swapped)}
    ranks = swapped["runs"][-1]["ranks"]
    ratios = _ratios(ranks, cold_run)
    sources = [cache_source(r) for r in ranks]
    cold_gpus, swapped_gpus = [_gpu(r) for r in cold_run["ranks"]], [_gpu(r) for r in ranks]
    # which physical GPU each rank ran on is known only with distinct GPU ids (not "cpu", not missing)
    known = all(g and g != "cpu" for g in cold_gpus + swapped_gpus) and len(set(cold_gpus)) == len(cold_gpus)
    # the same physical GPU's cold first batch: with the order swapped, rank 0 runs where rank 1 ran cold
    cold_by_gpu = {g: r["first_batch_ms"] for g, r in zip(cold_gpus, cold_run["ranks"])} if known else {}
    same_gpu = [
        r["first_batch_ms"] / cold_by_gpu[g] if cold_by_gpu.get(g) else None for g, r in zip(swapped_gpus, ranks)
    ]
    return {
        "key": SWAPPED_KEY,
        "measurement": measurement,
        "value": max(ratios) if ratios else None,
        "display": ", ".join(f"rank {i}: {r:.3f} ({s})" for i, (r, s) in enumerate(zip(ratios, sources))),
        "details": {
            "cuda_visible_devices": {"cold": orders[0], "swapped": orders[1]},
            "cold_first_batch_ms": [r["first_batch_ms"] for r in cold_run["ranks"]],
            "swapped_first_batch_ms": [r["first_batch_ms"] for r in ranks],
            "swapped_over_cold_per_rank": ratios,
            "swapped_cache_source": sources,
            "gpu_per_rank": {"cold": cold_gpus, "swapped": swapped_gpus},
            "gpus_swapped": swapped_gpus == cold_gpus[::-1] if known else None,
            "swapped_over_same_gpu_cold": same_gpu,
            "swapped_per_batch_ms": [r["per_batch_ms"] for r in ranks],
            "first_swapped_run": {
                "cache_source": [cache_source(r) for r in swapped["runs"][0]["ranks"]],
                "over_cold_per_rank": _ratios(swapped["runs"][0]["ranks"], cold_run),
            },
        },
    }
