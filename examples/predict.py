"""The main job: serve a torch-tensorrt-rtx model through ``Trainer.predict`` with TRTRuntimeSettings.

    python examples/predict.py                       # conv net, 1 GPU, cache under ~/.cache/lightning-trt-rtx-example
    python examples/predict.py --model mlp --batches 200
    python examples/predict.py --devices 2           # DDP: one engine and one cache file per rank

On an NVIDIA GPU with torch-tensorrt-rtx it clears its kernel cache, then runs ``Trainer.predict``
three times, each in a fresh process (compile, then serve):

1. ``cold``:   empty kernel cache, every kernel is JIT-compiled at the first batch;
2. ``warm``:   the cache file the cold run saved is loaded: the first batch skips the JIT;
3. ``graphs``: warm cache and ``cuda_graph_strategy="whole_graph_capture"``.

and prints one table: first-batch latency cold vs warm, per-batch latency default vs graphs, and
for each rank its GPU, what its kernel cache loaded (``cold``, then ``warm``: the file this GPU
filled) and whether that applies to this GPU, its cache file (one per physical GPU,
``<cache-dir>/<key>/gpu-<uuid8>.bin``) and sizes. Without an NVIDIA GPU it says so, runs the same
Lightning job eagerly on CPU with the callback attached, prints how many predictions it made and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _model import DEFAULT_CACHE_DIR, cache_template, clear_cache, example_main, run_phases  # noqa: E402, F401  (clear_cache: tests)

PHASES = (  # name, cuda_graph_strategy, what it shows
    ("cold", "disabled", "empty kernel cache"),
    ("warm", "disabled", "kernel cache from the cold run"),
    ("graphs", "whole_graph_capture", "warm cache + whole-graph capture"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1, help="GPUs (DDP above 1), or CPU processes (default: 1)")
    parser.add_argument("--model", choices=("conv", "mlp"), default="conv", help="conv: JIT-heavy; mlp: launch-bound")
    parser.add_argument("--batch-size", type=int, default=None, help="compiled batch size (default: conv 32, mlp 8)")
    parser.add_argument("--batches", type=int, default=50, help="batches per run, split across ranks (default: 50)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="kernel cache directory (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="show the output of each run, not only on failure")
    parser.add_argument("--_phase", choices=[p[0] for p in PHASES], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.batches < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--devices, --batches and --batch-size must be positive")
    args.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
    return args


def make_trainer(args: argparse.Namespace, callbacks: list, accelerator: str) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator=accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


# --- one phase, in its own process -------------------------------------------------------------------


def run_phase(args: argparse.Namespace) -> int:
    """Compile, serve ``--batches`` through ``Trainer.predict``, write rank zero's figures to ``--_result``."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule, device_name, figures_dict

    from lightning_trt_rtx import TRTRuntimeSettings, _backend

    strategy = {p[0]: p[1] for p in PHASES}[args._phase]
    settings = TRTRuntimeSettings(
        cuda_graph_strategy=strategy, runtime_cache=cache_template(args.cache_dir), print_table=False
    )
    timer = BatchTimer()
    model = CompiledPredictor(args.model, args.batch_size)
    data = SyntheticDataModule(args.model, args.batch_size, args.batches)
    trainer = make_trainer(args, [settings, timer], accelerator="gpu")
    predictions = trainer.predict(model, datamodule=data, return_predictions=True)
    if trainer.is_global_zero and args._result:
        result = {
            "phase": args._phase,
            "cuda_graph_strategy": strategy,
            "gpu": device_name(),
            "torch_tensorrt": str(_backend.installed_version()),
            "rtx": _backend.is_rtx_build(),
            "compile_s": model.compile_s,
            "predicted_batches": len(predictions or []),
            "timer": timer.result(),
            "figures": [figures_dict(f) for f in settings.figures],
        }
        with open(args._result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


# --- the three phases, and the table -----------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    from lightning_trt_rtx.report import format_bytes, format_columns

    header = (
        "phase", "cuda graphs", "rank", "gpu", "cache", "applies", "first batch", "per batch", "cache file", "loaded",
        "saved",
    )  # fmt: skip
    rows = []
    for result in results:
        for rank, fig in enumerate(result["figures"]):
            rows.append(
                (
                    result["phase"],
                    result["cuda_graph_strategy"],
                    str(fig.get("rank", rank)),
                    fig.get("gpu", "-"),
                    fig["cache_source"],
                    fig.get("applies", "-"),
                    f"{fig['first_batch_ms']:.1f} ms",
                    f"{fig['mean_batch_ms']:.3f} ms",
                    fig["cache_path"] or "-",
                    format_bytes(fig["cache_bytes"]),
                    format_bytes(fig["saved_bytes"]),
                )
            )
    return format_columns(header, rows)


def summary_lines(by_phase: dict[str, dict]) -> list[str]:
    """Rank zero's cold/warm first batch and default/graphs per-batch, as ratios."""
    lines = []
    cold, warm, graphs = (by_phase[p]["figures"][0] for p in ("cold", "warm", "graphs"))
    if cold["first_batch_ms"] > 0:
        ratio = warm["first_batch_ms"] / cold["first_batch_ms"]
        lines.append(
            f"warm start: first batch {warm['first_batch_ms']:.1f} ms with the {warm['cache_source']} cache vs"
            f" {cold['first_batch_ms']:.1f} ms {cold['cache_source']} ({ratio:.2f}x the cold time)"
        )
    if graphs["mean_batch_ms"] > 0:
        speedup = warm["mean_batch_ms"] / graphs["mean_batch_ms"]
        lines.append(
            f"whole-graph capture: {graphs['mean_batch_ms']:.3f} ms per batch vs {warm['mean_batch_ms']:.3f} ms"
            f" without ({speedup:.2f}x faster)"
        )
    return lines


def run_gpu(args: argparse.Namespace) -> int:
    removed = clear_cache(args.cache_dir)
    print(
        f"Serving {args.model} with torch-tensorrt-rtx through Trainer.predict on {args.devices} GPU(s);"
        f" kernel cache under {args.cache_dir} ({len(removed)} old file(s) cleared)."
    )
    common = ["--devices", str(args.devices), "--model", args.model, "--batches", str(args.batches)]
    common += ["--cache-dir", args.cache_dir] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    with tempfile.TemporaryDirectory(prefix="trt-rtx-predict-") as tmp:
        phases = [(name, f"compiling; {what}", common) for name, _strategy, what in PHASES]
        results = run_phases(__file__, phases, tmp, args.verbose)
    if isinstance(results, int):
        return results
    by_phase = {r["phase"]: r for r in results}
    gpu = results[0]["gpu"]
    batch_size = args.batch_size or (32 if args.model == "conv" else 8)
    print()
    print(
        f"TensorRT-RTX serving on {gpu}: {args.model}, batch {batch_size}, {args.batches} batches,"
        f" {args.devices} rank(s), torch-tensorrt {results[0]['torch_tensorrt']}"
        f" (compile {results[0]['compile_s']:.1f} s per run, not in the figures)"
    )
    print(format_table(results))
    print()
    for line in summary_lines(by_phase):
        print(line)
    if not results[0]["rtx"]:
        print("note: this torch-tensorrt is not a TensorRT-RTX build: the runtime settings were no-ops.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"gpu": gpu, "model": args.model, "devices": args.devices, "phases": by_phase}, f, indent=2)
    return 0


def run_fallback(args: argparse.Namespace, reason: str) -> int:
    """The same Lightning job, eager, with the callback attached (it warns that there are no engines)."""
    from _model import CompiledPredictor, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # Lightning relaunches this script for the other ranks
        print(reason, flush=True)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    settings = TRTRuntimeSettings(runtime_cache=cache_template(args.cache_dir), print_table=False)
    model = CompiledPredictor(args.model, args.batch_size, use_tensorrt=False)
    data = SyntheticDataModule(args.model, args.batch_size, args.batches)
    trainer = make_trainer(args, [settings], accelerator=accelerator)
    predictions = trainer.predict(model, datamodule=data, return_predictions=True) or []
    if trainer.is_global_zero:
        samples = sum(len(p) for p in predictions)
        share = f", rank 0 of {trainer.world_size}" if trainer.world_size > 1 else ""
        print(
            f"predictions: {len(predictions)} batches, {samples} samples ({args.model}, eager on {accelerator}{share})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return example_main(parse_args(argv), run_phase, run_gpu, run_fallback)


if __name__ == "__main__":
    sys.exit(main())
