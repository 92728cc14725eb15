"""Tensor-parallel inference without a Trainer: TensorRT-RTX engines with native NCCL collectives, one per rank.

    python examples/tensor_parallel_predict.py [--gpus 2] [--runs 2] [--batches 50] [--cache-dir DIR]

It launches ``torchrun`` itself, once per run. Each rank holds one shard of an MLP (ColwiseParallel
then RowwiseParallel, so the engine ends in an all-reduce), exported and compiled with
``use_distributed_mode_trace``: torch-tensorrt-rtx 2.14 puts the all-reduce inside the TensorRT
engine as a native NCCL collective. The whole serving side is the package's public API::

    with ServingSession(settings=TRTSettings(runtime_cache=template)) as session:   # ranks from torch.distributed
        with session.engines_created():       # the settings and this GPU's kernel cache are there
            compiled = torch_tensorrt.dynamo.compile(...)   # before the engine's one context exists
        session.serve(compiled)               # already served: no second (collective) context
        torch.distributed.barrier()           # the first execute waits for no peer still compiling
        compiled(x)                           # first execute: JIT (cold) or kernels from the cache (warm)
    # exit: the cache is saved (one file per GPU), the engines get their prior settings back

What it measures is what a user waits for on each rank: the first execute after a barrier (cold in
run 1, which starts from an empty cache, warm in run 2, a fresh ``torchrun`` job that loads the
files run 1 saved) and the steady time per batch after it. It prints one ``TP {json}`` line per rank
and run, then one row per rank: its GPU, what its cache loaded, the first execute cold and warm,
their ratio (goal: <= 0.10 on every rank), the steady time per batch and the execution contexts its
engines created (one each: the settings were there before the first).

Without two NVIDIA GPUs and torch-tensorrt-rtx it says what it needs and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from lightning_trt_rtx import ServingSession, TRTSettings

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lightning-trt-rtx-example", "tensor-parallel")
GOAL = 0.10  # warm first execute / cold first execute, on every rank


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_proj = torch.nn.Linear(10, 3200)
        self.relu = torch.nn.ReLU()
        self.out_proj = torch.nn.Linear(3200, 1600)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.relu(self.in_proj(x)))


def cache_template(cache_dir: str) -> str:
    """One file per physical GPU (the package's default layout, under ``cache_dir``)."""
    return os.path.join(cache_dir, "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}.bin")


def rtx_installed() -> bool:
    """torch-tensorrt-rtx is installed (checked from package metadata, without importing it)."""
    try:
        importlib.metadata.version("torch-tensorrt-rtx")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="tensor-parallel ranks, one GPU each (default 2)")
    parser.add_argument("--runs", type=int, default=2, help="torchrun jobs; run 1 cold, the others warm (default 2)")
    parser.add_argument("--batches", type=int, default=50, help="batches per run after the first (default 50)")
    parser.add_argument(
        "--cache-dir", default=DEFAULT_CACHE_DIR, help="kernel caches: <cache-dir>/<key>/gpu-<uuid8>.bin (%(default)s)"
    )
    parser.add_argument("--keep-cache", action="store_true", help="do not clear the cache before run 1")
    parser.add_argument("--json", default=None, help="also write every run's per-rank rows to this file")
    parser.add_argument("--_run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpus < 2:
        parser.error("--gpus must be at least 2 (tensor parallelism shards over ranks)")
    if args.runs < 1 or args.batches < 1:
        parser.error("--runs and --batches must be positive")
    args.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
    return args


# --- the launcher ---------------------------------------------------------------------------------


def clear_cache(cache_dir: str) -> int:
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(cache_dir), "*", "gpu-*.bin*")):
        try:
            os.remove(path)
            removed += 1
        except OSError:
            pass
    return removed


def _launch(args: argparse.Namespace) -> int:
    """Not under torchrun: check the host, then run ``--runs`` torchrun jobs, one process per GPU each."""
    if torch.cuda.device_count() < args.gpus or not rtx_installed():
        print(
            f"tensor_parallel_predict.py needs {args.gpus} NVIDIA GPUs and torch-tensorrt-rtx"
            f" (found {torch.cuda.device_count()} GPU(s)); nothing to run here."
        )
        return 0
    removed = 0 if args.keep_cache else clear_cache(args.cache_dir)
    print(
        f"Tensor-parallel MLP on {args.gpus} GPUs, {args.runs} run(s) of 1 + {args.batches} batches;"
        f" kernel caches under {args.cache_dir} ({removed} old file(s) cleared).",
        flush=True,
    )
    env = dict(os.environ, NCCL_NVLS_ENABLE="0")  # NVLink multicast stays off on shared hosts
    runs: list[list[dict]] = []
    with tempfile.TemporaryDirectory(prefix="trt-rtx-tp-") as tmp:
        for run in range(1, args.runs + 1):
            result = os.path.join(tmp, f"run{run}.json")
            command = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.gpus}",
                os.path.abspath(__file__),
                "--gpus", str(args.gpus), "--batches", str(args.batches), "--cache-dir", args.cache_dir,
                "--_run", str(run), "--_result", result,
            ]  # fmt: skip
            code = subprocess.call(command, env=env)
            if code != 0 or not os.path.isfile(result):
                print(f"error: run {run} failed (exit code {code}).", file=sys.stderr)
                return code or 1
            with open(result, encoding="utf-8") as f:
                rows = json.load(f)
            for row in rows:
                print("TP " + json.dumps(row), flush=True)
            runs.append(rows)
    print()
    print(format_table(runs))
    verdict = goal_line(runs)
    if verdict:
        print(verdict)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"gpus": args.gpus, "runs": runs}, f, indent=2)
    return 0


def format_table(runs: list[list[dict]]) -> str:
    """One row per rank: first execute of run 1 and of the last run, their ratio, steady time, contexts."""
    first, last = runs[0], runs[-1]
    header = ("rank", "gpu", "engines", "contexts", "cache run 1", "first execute", f"cache run {len(runs)}",
              "first execute", "warm/cold", "per batch", "max |err|", "cache file")  # fmt: skip
    rows = []
    for a, b in zip(first, last):
        ratio = b["first_execute_ms"] / a["first_execute_ms"] if len(runs) > 1 and a["first_execute_ms"] else None
        rows.append(
            (
                str(b["rank"]),
                b["gpu"],
                str(b["engines"]),
                "/".join(str(sum(r["contexts"])) for r in (a, b)) if len(runs) > 1 else str(sum(b["contexts"])),
                a["cache"],
                f"{a['first_execute_ms']:.1f} ms",
                b["cache"] if len(runs) > 1 else "-",
                f"{b['first_execute_ms']:.1f} ms" if len(runs) > 1 else "-",
                f"{ratio:.3f}" if ratio is not None else "-",
                f"{b['steady_ms']:.3f} ms",
                f"{max(r['max_abs_error'] for r in (a, b)):.1e}",
                b["cache_file"] or "-",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def goal_line(runs: list[list[dict]]) -> str | None:
    """Whether every rank's warm first execute is within GOAL of its cold one (run 1 must have been cold)."""
    if len(runs) < 2:
        return None
    first, last = runs[0], runs[-1]
    if any(r["cache"] != "cold" for r in first):
        return "warm/cold: run 1 did not start cold (--keep-cache?), so the ratio is not a warm-start figure."
    ratios = [b["first_execute_ms"] / a["first_execute_ms"] for a, b in zip(first, last) if a["first_execute_ms"]]
    met = len(ratios) == len(first) and max(ratios) <= GOAL
    return (
        f"warm start (first execute after a barrier, run {len(runs)} / run 1): "
        + ", ".join(f"rank {i} {r:.3f}" for i, r in enumerate(ratios))
        + f"; goal <= {GOAL:.2f} on every rank: {'met' if met else 'NOT met'}"
    )


# --- one rank of one run (under torchrun) ---------------------------------------------------------


def _engines(module: torch.nn.Module, module_type: Any) -> list[Any]:
    return [m for m in module.modules() if isinstance(m, module_type)]


def _serve(args: argparse.Namespace) -> list[dict] | None:
    import torch.distributed as dist
    import torch.utils._pytree
    import torch_tensorrt  # after the checks above: a TensorRT-RTX build and CUDA devices are here
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch_tensorrt.distributed import setup_nccl_for_torch_tensorrt
    from torch_tensorrt.dynamo.runtime import TorchTensorRTModule

    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_nccl_for_torch_tensorrt()
    torch.utils._pytree.register_constant(torch.distributed.tensor._dtensor_spec.DTensorSpec)

    torch.manual_seed(0)
    model = MLP().cuda()
    mesh = init_device_mesh("cuda", (world,))
    plan = {"in_proj": ColwiseParallel(input_layouts=Shard(0)), "out_proj": RowwiseParallel(output_layouts=Shard(0))}
    parallelize_module(model, mesh, plan)
    x = torch.rand(20, 10, device="cuda")

    settings = TRTSettings(runtime_cache=cache_template(args.cache_dir))
    with torch.no_grad():  # torch.export refuses inference-mode tensors
        expected = model(x)
        exported = torch.export.export(model, (x,), strict=False)
        with ServingSession(settings=settings) as session:  # rank and world size from torch.distributed
            start = time.perf_counter()
            with session.engines_created():
                compiled = torch_tensorrt.dynamo.compile(
                    exported, inputs=[x], use_explicit_typing=True, min_block_size=1,
                    device=torch.device("cuda", local_rank), use_distributed_mode_trace=True,
                    assume_dynamic_shape_support=True,
                )  # fmt: skip
            compile_s = time.perf_counter() - start
            session.serve(compiled)  # the engines already hold these settings: nothing changes
            engines = _engines(compiled, TorchTensorRTModule)

            # every rank has compiled: the first execute waits for no peer that is still compiling
            dist.barrier(device_ids=[local_rank])
            torch.cuda.synchronize()
            session.loop_started(batches=1 + args.batches)
            for _ in range(1 + args.batches):
                session.batch_started()
                got = compiled(x)
                session.batch_ended()  # synchronizes after the first batch only
            session.loop_ended()
        figures = session.figures  # filled in on exit: what the cache loaded, what was saved
    row = {
        "run": args._run,
        "rank": rank,
        "gpu": figures.gpu,
        "engines": figures.engines,
        "native_nccl": [bool(e.requires_native_multidevice) for e in engines],
        "contexts": [int(e.engine.num_execution_contexts_created()) for e in engines],
        "cache": figures.cache_source,
        "applies": figures.cache.applies if figures.cache is not None else "-",
        "compile_s": round(compile_s, 2),
        "first_execute_ms": round(figures.first_batch_ms, 2),
        "steady_ms": round(figures.mean_batch_ms, 4),
        "max_abs_error": float((got - expected).abs().max()),
        "cache_bytes": figures.cache_bytes,
        "saved_bytes": figures.saved_bytes,
        "cache_file": figures.cache_path,
        "summary": figures.summary(),
    }
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    return rows if rank == 0 else None


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if "LOCAL_RANK" not in os.environ:
        return _launch(args)
    if args._run is None:  # torchrun started this script directly: one run, rows on stdout
        args._run = 1
    rows = _serve(args)
    if rows is not None:
        if args._result:
            with open(args._result, "w", encoding="utf-8") as f:
                json.dump(rows, f)
        else:
            for row in rows:
                print("TP " + json.dumps(row))
    sys.stdout.flush()
    # upstream's advice for NCCL engines: skip interpreter teardown (TensorRT/CUDA destructors can
    # crash there); the cache was saved when the session closed
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
