"""Inference with Lightning Fabric: a hand-written loop served through ``ServingSession``, one per rank and run.

    python examples/fabric_predict.py                     # 2 GPUs (or the one), 2 runs: the second starts warm
    python examples/fabric_predict.py --devices 1 --runs 3 --model mlp

Fabric launches one process per device (``fabric.launch()``); each rank compiles the model with
torch_tensorrt (``examples/_model.py``) and serves its share of the data::

    fabric = L.Fabric(accelerator="cuda", devices=2)
    fabric.launch()
    with ServingSession(model, settings, rank=fabric.global_rank, local_rank=fabric.local_rank,
                        node_rank=fabric.node_rank, world_size=fabric.world_size) as session:
        for batch in loader:
            model(batch)
    print(session.figures.summary())

Each run compiles fresh engines and opens a fresh session, which reads this GPU's kernel cache from
disk (one file per physical GPU under ``--cache-dir``) and saves it when the run ends. Run 1 starts
from whatever is there (``--clear-cache``: cold); run 2 loads the file run 1 saved: ``warm``. Every
run prints each rank's figures (first batch, steady time per batch, what its cache loaded and saved)
and, from run 2 on, each rank's first batch against run 1's.

Without an NVIDIA GPU and torch-tensorrt-rtx it says so and runs the same loop eagerly on CPU
(``accelerator="cpu"``, ``--devices`` processes over gloo), with the session attached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NCCL's NVLink multicast off
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _model import (  # noqa: E402
    DEFAULT_CACHE_DIR,
    MODELS,
    SyntheticDataset,
    cache_template,
    clear_cache,
    figures_dict,
    model_spec,
    prepare_model,
)
from torch.utils.data import DataLoader  # noqa: E402

from lightning_trt_rtx import ServingSession, TRTSettings  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", type=int, default=None, help="GPUs, or CPU processes without one (default: 2, or the one GPU)"
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="conv", help="conv: JIT-heavy; mlp: launch-bound")
    parser.add_argument("--batch-size", type=int, default=None, help="compiled batch size (default: the model's)")
    parser.add_argument("--batches", type=int, default=20, help="batches per rank and run (default: 20)")
    parser.add_argument("--runs", type=int, default=2, help="runs; from the second on, every rank starts warm")
    parser.add_argument(
        "--cuda-graph-strategy", choices=("disabled", "whole_graph_capture", "auto"), default="disabled",
        help="TensorRT-RTX CUDA graphs (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="kernel cache directory (default: %(default)s)")
    parser.add_argument("--clear-cache", action="store_true", help="remove this example's cache files first")
    parser.add_argument("--summary-json", default=None, help="write every run's per-rank figures here (rank 0)")
    args = parser.parse_args(argv)
    counts = (args.devices, args.batches, args.runs, args.batch_size)
    counts = tuple(1 if n is None else n for n in counts)  # None: the default
    if min(counts) < 1:
        parser.error("--devices, --batches, --runs and --batch-size must be positive")
    args.batch_size = args.batch_size or model_spec(args.model).batch_size
    args.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
    return args


def why_not_tensorrt() -> str | None:
    """Why this host cannot serve with TensorRT-RTX (None: it can)."""
    import importlib.metadata

    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU and none is available here"
    try:
        importlib.metadata.version("torch-tensorrt-rtx")
    except importlib.metadata.PackageNotFoundError:
        return "torch-tensorrt-rtx is not installed (`pip install 'lightning-trt-rtx[rtx]'`)"
    return None


def gather(fabric: Any, value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order."""
    if fabric.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def run_once(fabric: Any, args: argparse.Namespace, run: int, on_gpu: bool) -> dict:
    """Compile (on a GPU), serve ``--batches`` batches through a fresh session, return this rank's row."""
    import time

    start = time.perf_counter()
    model, dtype, compiled = prepare_model(args.model, fabric.device, args.batch_size, use_tensorrt=on_gpu)
    compile_s = time.perf_counter() - start
    samples = args.batches * args.batch_size * fabric.world_size
    dataset = SyntheticDataset(args.model, samples, dtype)
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=args.batch_size, drop_last=True))

    settings = TRTSettings(cuda_graph_strategy=args.cuda_graph_strategy, runtime_cache=cache_template(args.cache_dir))
    outputs = 0
    with torch.inference_mode():
        with ServingSession(
            model, settings, rank=fabric.global_rank, local_rank=fabric.local_rank,
            node_rank=fabric.node_rank, world_size=fabric.world_size,
        ) as session:  # fmt: skip
            fabric.barrier()  # every rank has compiled: the first batch waits for no peer still compiling
            session.loop_started(batches=len(loader))  # "auto" tries graphs only where the loop is long enough
            for batch in loader:
                session.batch_started(batch)  # under "auto", a new input shape starts a new trial
                outputs += len(model(batch))
                session.batch_ended()
            session.loop_ended()
    figures = session.figures  # complete once the session has closed: the cache was saved
    return {
        "run": run,
        "rank": fabric.global_rank,
        "device": str(fabric.device),
        "compiled": compiled,
        "compile_s": compile_s,
        "predictions": outputs,
        "first_batch_ms": figures.first_batch_ms,
        "mean_batch_ms": figures.mean_batch_ms,
        "summary": figures.summary(),
        "figures": figures_dict(figures),
    }


def print_run(rows: list[dict], first: list[dict] | None) -> None:
    run = rows[0]["run"]
    label = "compiled with torch_tensorrt" if rows[0]["compiled"] else "eager, no engines"
    print(f"run {run} ({label}): {len(rows)} rank(s), {sum(r['predictions'] for r in rows)} predictions")
    for r in rows:
        vs = ""
        if first is not None and r["compiled"] and first[r["rank"]]["first_batch_ms"] > 0:
            cold = first[r["rank"]]["first_batch_ms"]
            vs = f" (run 1: {cold:.1f} ms, {r['first_batch_ms'] / cold:.2f}x)"
        print(
            f"  rank {r['rank']} on {r['device']}: first batch {r['first_batch_ms']:.1f} ms{vs},"
            f" then {r['mean_batch_ms']:.3f} ms per batch; cache {r['figures']['cache_source']}"
        )
        print(f"    {r['summary']}")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    import lightning as L

    args = parse_args(argv)
    reason = why_not_tensorrt()
    on_gpu = reason is None
    if args.devices is None:
        args.devices = min(2, torch.cuda.device_count()) if on_gpu else 2
    fabric = L.Fabric(accelerator="cuda" if on_gpu else "cpu", devices=args.devices)
    fabric.launch()
    if fabric.global_rank == 0:
        if not on_gpu:
            print(f"{reason}: running the same loop eagerly on CPU ({args.devices} process(es)).", flush=True)
        if args.clear_cache:
            clear_cache(args.cache_dir)
    fabric.barrier()
    runs: list[list[dict]] = []
    try:
        for run in range(1, args.runs + 1):
            rows = gather(fabric, run_once(fabric, args, run, on_gpu))
            runs.append(rows)
            if fabric.global_rank == 0:
                print_run(rows, runs[0] if run > 1 else None)
        if fabric.global_rank == 0 and args.summary_json:
            with open(args.summary_json, "w", encoding="utf-8") as f:
                json.dump({"devices": args.devices, "model": args.model, "runs": runs}, f, indent=2)
    finally:
        from _model import destroy_process_group

        destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
