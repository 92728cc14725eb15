"""The benchmark runner: one command, every measurement in a fresh process, medians of repetitions.

    python benchmarks/run.py --out benchmarks/results            # long: graphs runs four models; split it with --only
    python benchmarks/run.py --out benchmarks/results --quick    # fewer repetitions and batches
    python benchmarks/run.py --out benchmarks/results --two-gpu  # adds the 2-GPU figures (a few minutes more)
    python benchmarks/run.py --only real_models dynamic_shapes  # ResNet-50, ViT-B/16, BERT; dynamic shapes

Needs an NVIDIA GPU and torch-tensorrt-rtx; anywhere else it exits with status 2 and says why.

This file is the command line only. Each benchmark is one module beside it, sharing harness.py:

    harness.py     goals, medians, the quiet Trainer, the task runner, results files, GPU and versions
    warm_start.py  first batch, warm kernel cache / cold                    [<= 0.10]
    graphs.py      per batch, default / whole-graph capture                 [>= 2.5x]
    overhead.py    per batch, TRTRuntimeSettings callback vs by hand        [<= 2%]
    loop.py        per batch, Trainer.predict vs a hand-written loop        [<= 1.2x]
    two_gpu.py     examples/distributed_predict.py: 2 GPUs vs 1 [>= 1.8x], warm / cold per rank and
                   with the GPU order swapped [<= 0.10] (``--two-gpu``)
    serving_efficiency.py  bare engine / Trainer.predict per batch: ResNet-50, ViT-B/16 (compiled and loaded),
                   the encoder, the MLP; CPU / worker / GPU sources, prediction paths [>= 0.95]
    real_models.py ResNet-50 (batch 1, 32), ViT-B/16, a BERT-sized encoder: compile time, first batch cold /
                   warm, time until steady, per batch eager / TRT-RTX / graphs / bare engine (``--real-models``)
    dynamic_shapes.py  the encoder over a seeded stream of lengths: lazy / eager / none, cold / warm,
                   bucketed / not; which setting to pick (``--dynamic-shapes``)

Writes ``results.md``, ``results.json`` and ``results.png`` (when matplotlib is importable) to
``--out``, each naming the GPU model, and rewrites them after every measurement (an interrupted run
keeps what it measured); logs and programs go to ``--out/work`` (git-ignored). benchmarks/README.md
describes the method and the statistics.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
# Run as a script, Python puts benchmarks/ itself first on sys.path: import its modules as the package
# ``benchmarks`` from the repository root instead, so names like ``loop`` or ``graphs`` shadow nothing.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(HERE)]
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks import (  # noqa: E402
    dynamic_shapes,
    graphs,
    harness,
    loop,
    overhead,
    real_models,
    serving_efficiency,
    two_gpu,
    warm_start,
)

# ``--_task NAME``: what runs inside each fresh process (see harness.Runner.task)
TASKS: dict[str, Callable[[dict], dict]] = {
    "prep": harness.task_prep,
    "first-batch": warm_start.task,
    "graphs": graphs.task,
    "overhead": overhead.task,
    "loop": loop.task,
    "real-prep": real_models.task_prep,
    "real-serve": real_models.task_serve,
    "real-steady": real_models.task_steady,
    "dynamic-shapes": dynamic_shapes.task,
    "serving-efficiency": serving_efficiency.task,
}


STEPS = ("warm_start", "graphs", "overhead", "loop", "real_models", "dynamic_shapes", "serving_efficiency", "two_gpu")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(harness.ROOT, "benchmarks", "results"), help="results folder")
    parser.add_argument(
        "--quick", action="store_true", help="2 repetitions, 200 batches (on H200, about 4 minutes with --models mlp)"
    )
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
        "--real-models", action="store_true", help="also measure ResNet-50, ViT-B/16 and a BERT-sized encoder"
    )
    parser.add_argument(
        "--dynamic-shapes", action="store_true", help="also measure the encoder over a stream of sequence lengths"
    )
    parser.add_argument(
        "--stream-batches", type=int, default=64, help="batches in the dynamic-shapes stream (default 64)"
    )
    parser.add_argument(
        "--dynamic-strategies", nargs="+", choices=("lazy", "eager", "none"), default=None,
        help="kernel-specialization strategies the dynamic-shapes step compares (default: all three)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None)
    parser.add_argument(
        "--models", nargs="+", choices=sorted({*graphs.MODELS, *real_models.MODELS, *serving_efficiency.MODELS}),
        default=None, help="only these models in the graphs, real-model and serving-efficiency steps",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--_task", choices=sorted(TASKS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_spec", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_batches < 1:
        parser.error("--stream-batches must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._task:
        result = TASKS[args._task](json.loads(args._spec))
        with open(args._result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
        return 0

    import torch

    from lightning_trt_rtx import _backend

    if not torch.cuda.is_available() and not harness.dry_run():
        print(
            "benchmarks/run.py needs an NVIDIA GPU with torch-tensorrt-rtx, and CUDA is not available here:"
            " nothing was measured. Run it on a GPU host (see benchmarks/README.md).",
            file=sys.stderr,
        )
        return harness.EXIT_NO_GPU
    if not _backend.is_available():
        print(
            f"benchmarks/run.py needs torch-tensorrt-rtx, which is not installed: `{_backend.INSTALL_HINT}`."
            " Nothing was measured.",
            file=sys.stderr,
        )
        return harness.EXIT_NO_GPU

    extra = [k for k, on in (("real_models", args.real_models), ("dynamic_shapes", args.dynamic_shapes),
                             ("two_gpu", args.two_gpu)) if on]  # fmt: skip
    wanted = set(args.only or ["warm_start", "graphs", "overhead", "loop", *extra])
    reps = args.reps or (2 if args.quick else 5)
    cfg = {
        "reps": reps,
        "first_batch_reps": reps,
        "batches": args.batches or (200 if args.quick else 1000),
        "two_gpu_batches": 2000 if args.quick else 8000,  # long enough that the ranks' start skew is noise
        # real models: repetitions (cold/warm processes, steady rounds), batches per steady run, and how long
        # each cold/warm run goes on (at least this many batches and seconds, so a cold run can settle)
        "real_reps": args.reps or (1 if args.quick else 2),
        "real_batches": args.batches or (100 if args.quick else 300),
        "real_min_batches": args.batches or (50 if args.quick else 200),
        "real_min_seconds": 0.0 if harness.dry_run() else (3.0 if args.quick else 6.0),
        "real_max_batches": 20000,
        # dynamic shapes: the stream's batches, and the steady pass's rounds over its distinct shapes
        "stream_batches": args.stream_batches,
        "dynamic_strategies": args.dynamic_strategies or ["lazy", "eager", "none"],
        "steady_rounds": 3 if args.quick else 5,
        "models": args.models,
    }
    out = os.path.abspath(args.out)
    runner = harness.Runner(out, verbose=args.verbose)
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
        "method": harness.METHOD,
        "measurements": [],
    }
    if harness.dry_run():
        results["gpu"] = "cpu (DRY RUN: plumbing check, no engines, not measurements)"
    steps: list[tuple[str, str, Callable[[], Any]]] = [
        (
            "warm_start",
            "warm start (cold/warm processes)",
            lambda: warm_start.measure(runner, cfg, args.driver_jit_cache),
        ),
        ("graphs", "whole-graph capture", lambda: graphs.measure(runner, cfg)),
        ("overhead", "callback vs by hand", lambda: overhead.measure(runner, cfg)),
        ("loop", "Trainer.predict vs hand loop", lambda: loop.measure(runner, cfg, not args.no_profile)),
        ("real_models", "real models", lambda: real_models.measure(runner, cfg)),
        ("dynamic_shapes", "dynamic shapes (lazy / eager / none)", lambda: dynamic_shapes.measure(runner, cfg)),
        ("serving_efficiency", "serving efficiency (bare engine / Trainer.predict)",
         lambda: serving_efficiency.measure(runner, cfg)),
        ("two_gpu", "2 GPUs vs 1", lambda: two_gpu.measure(runner, cfg)),
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
            if row.get("error"):  # one row of a step failed, its other rows stand (two_gpu's swapped run)
                failed = True
                print(f"    {row['measurement']}: FAILED\n{row['error']}", file=sys.stderr, flush=True)
                continue
            print(
                f"    {row['measurement']}: {row.get('display')} ({time.perf_counter() - step_start:.0f} s)", flush=True
            )
        results["runtime_s"] = time.perf_counter() - start
        harness.write_results(results, out)  # after each measurement: an interrupted run keeps what it measured
    results["runtime_s"] = time.perf_counter() - start
    written = harness.write_results(results, out)
    print()
    print(harness.markdown(results).split("## Method")[0].rstrip())
    print()
    print(
        "wrote "
        + ", ".join(written)
        + (f" (results.png {results['plot']})" if results["plot"] != "results.png" else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
