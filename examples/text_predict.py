"""Variable-length text through a BERT-sized encoder in ``Trainer.predict``: dynamic shapes, prewarm, kernel cache.

    python examples/text_predict.py                         # 64 batches of 8 texts, lengths 16..512, bucketed
    python examples/text_predict.py --strategy eager        # dynamic_shapes_kernel_specialization_strategy
    python examples/text_predict.py --no-buckets            # every batch at its own length (no prewarm)

The encoder (``examples/_text_model.py``: vocab 30522, width 768, 12 layers, random weights) is compiled
with torch_tensorrt for token ids of shape ``(8, 16..512)``: one engine serves every sequence length.
Each batch of 8 texts is padded to its longest text, rounded up to the next of 32, 64, 128, 256, 512
tokens (``--no-buckets``: not rounded), so the job sees at most five shapes. The callback gets the
kernel-specialization strategy, this GPU's kernel cache, and those five shapes to prewarm::

    TRTRuntimeSettings(dynamic_shapes_kernel_specialization_strategy="lazy",
                       prewarm_shapes=["8x32", "8x64", "8x128", "8x256", "8x512"], prewarm_dtype="int64",
                       prewarm_target="encoder")

On an NVIDIA GPU with torch-tensorrt-rtx it clears its kernel cache, then runs ``Trainer.predict`` twice,
each in a fresh process: ``cold`` (compiles the encoder and saves the program, empty kernel cache: the
prewarm compiles each shape's kernels) and ``warm`` (loads the saved program; the prewarm finds the
kernels in the cache file the cold run saved). With ``--devices N`` above 1 every rank compiles in both
runs (one kernel cache file per GPU). It prints one table: start-up before the first batch
(prewarm included), first batch, per batch, shapes seen, cache source and sizes. Without an NVIDIA GPU it
says so, runs the same Lightning job eagerly on CPU with the callback attached (its prewarm says it
skips: no engines, nothing to compile), prints how many predictions it made and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _model import DEFAULT_CACHE_DIR, cache_template, clear_cache, example_main, run_phases  # noqa: E402
from _text_model import BATCH_SIZE, BUCKETS, SIZES  # noqa: E402

PHASES = (  # name, what it shows
    ("cold", "compile, empty kernel cache"),
    ("warm", "saved program, kernel cache from the cold run"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=1, help="GPUs (DDP above 1), or CPU processes (default: 1)")
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help="base: BERT-base sizes; tiny: tests")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="texts per batch, compiled (default: 8)")
    parser.add_argument("--batches", type=int, default=64, help="batches per run, split across ranks (default: 64)")
    parser.add_argument(
        "--strategy", choices=("lazy", "eager", "none"), default="lazy",
        help="dynamic_shapes_kernel_specialization_strategy (default: lazy)",
    )  # fmt: skip
    parser.add_argument("--no-buckets", action="store_true", help="pad each batch to its longest text only")
    parser.add_argument("--no-prewarm", action="store_true", help="do not prewarm the bucket shapes")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="kernel cache directory (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="show the output of each run, not only on failure")
    parser.add_argument("--_phase", choices=[p[0] for p in PHASES], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_program", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.batches < 1 or args.batch_size < 1:
        parser.error("--devices, --batches and --batch-size must be positive")
    args.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
    return args


def buckets(args: argparse.Namespace) -> tuple[int, ...] | None:
    return None if args.no_buckets else BUCKETS


def prewarm_shapes(args: argparse.Namespace) -> list[str] | None:
    """One ``"8x<bucket>"`` per bucket: every shape a bucketed job sees (None without buckets or prewarm)."""
    if args.no_prewarm or args.no_buckets:
        return None
    return [f"{args.batch_size}x{b}" for b in BUCKETS]


def make_settings(args: argparse.Namespace) -> Any:
    from lightning_trt_rtx import TRTRuntimeSettings

    return TRTRuntimeSettings(
        dynamic_shapes_kernel_specialization_strategy=args.strategy,
        runtime_cache=cache_template(args.cache_dir),
        print_table=False,
        prewarm_shapes=prewarm_shapes(args),
        prewarm_dtype="int64",
        prewarm_target="encoder",
    )


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


def start_stamp() -> Any:
    """A callback noting when the predict loop starts (listed before the settings callback, whose own
    ``on_predict_start`` prewarms): from there to the first batch is the start-up a user waits through."""
    from lightning.pytorch import Callback

    class StartStamp(Callback):
        start = first = 0.0

        def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
            self.start, self.first = time.perf_counter(), 0.0

        def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                   dataloader_idx: int = 0) -> None:  # fmt: skip
            if not self.first:
                self.first = time.perf_counter()

        @property
        def startup_ms(self) -> float:
            return (self.first - self.start) * 1e3 if self.first else 0.0

    return StartStamp()


# --- one phase, in its own process -------------------------------------------------------------------


def run_phase(args: argparse.Namespace) -> int:
    """Compile (cold) or load (warm), serve ``--batches`` through ``Trainer.predict``, write rank zero's figures."""
    from _model import BatchTimer, device_name, figures_dict
    from _text_model import TextDataModule, TextPredictor

    from lightning_trt_rtx import _backend

    cold = args._phase == "cold"
    settings, stamp, timer = make_settings(args), start_stamp(), BatchTimer()
    model = TextPredictor(
        args.size, args.batch_size, program=None if cold else args._program, save_to=args._program if cold else None
    )
    data = TextDataModule(args.batches, args.batch_size, args.size, buckets(args))
    trainer = make_trainer(args, [stamp, settings, timer], accelerator="gpu")
    predictions = trainer.predict(model, datamodule=data, return_predictions=True)
    if trainer.is_global_zero and args._result:
        result = {
            "phase": args._phase,
            "gpu": device_name(),
            "torch_tensorrt": str(_backend.installed_version()),
            "rtx": _backend.is_rtx_build(),
            "strategy": args.strategy,
            "compile_s": model.compile_s,
            "predicted_batches": len(predictions or []),
            "shapes": sorted({list(ids.shape)[1] for ids, _ in data.dataset.items}),
            "startup_ms": stamp.startup_ms,
            "timer": timer.result(),
            "figures": [figures_dict(f) for f in settings.figures],
        }
        with open(args._result, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


# --- both phases, and the table ----------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    from lightning_trt_rtx.report import format_bytes, format_columns

    header = (
        "phase", "rank", "gpu", "cache", "applies", "prewarmed", "start-up", "first batch", "per batch", "loaded",
        "saved",
    )  # fmt: skip
    rows = []
    for result in results:
        for rank, fig in enumerate(result["figures"]):
            rows.append(
                (
                    result["phase"],
                    str(fig.get("rank", rank)),
                    fig.get("gpu", "-"),
                    fig["cache_source"],
                    fig.get("applies", "-"),
                    str(fig.get("prewarmed", 0)),
                    f"{result['startup_ms']:.0f} ms",
                    f"{fig['first_batch_ms']:.1f} ms",
                    f"{fig['mean_batch_ms']:.3f} ms",
                    format_bytes(fig["cache_bytes"]),
                    format_bytes(fig["saved_bytes"]),
                )
            )
    return format_columns(header, rows)


def run_gpu(args: argparse.Namespace) -> int:
    removed = clear_cache(args.cache_dir)
    print(
        f"Serving the {args.size} text encoder with torch-tensorrt-rtx through Trainer.predict on {args.devices}"
        f" GPU(s), strategy {args.strategy}; kernel cache under {args.cache_dir} ({len(removed)} old file(s) cleared)."
    )
    common = ["--devices", str(args.devices), "--size", args.size, "--batch-size", str(args.batch_size)]
    common += ["--batches", str(args.batches), "--strategy", args.strategy, "--cache-dir", args.cache_dir]
    common += (["--no-buckets"] if args.no_buckets else []) + (["--no-prewarm"] if args.no_prewarm else [])
    with tempfile.TemporaryDirectory(prefix="trt-rtx-text-") as tmp:
        program = os.path.join(tmp, "text_encoder.ep")
        # several ranks compile each phase: one saved program would be shared by GPUs
        common += ["--_program", program] if args.devices == 1 else []
        results = run_phases(__file__, [(name, what, common) for name, what in PHASES], tmp, args.verbose)
    if isinstance(results, int):
        return results
    cold, warm = results
    print()
    print(
        f"TensorRT-RTX serving on {cold['gpu']}: {args.size} text encoder, batch {args.batch_size}, {args.batches}"
        f" batches, sequence lengths {cold['shapes']} ({'bucketed' if buckets(args) else 'unbucketed'}),"
        f" strategy {args.strategy}, torch-tensorrt {cold['torch_tensorrt']}"
        f" (compile {cold['compile_s']:.1f} s, warm run {'load' if args.devices == 1 else 'compile'}"
        f" {warm['compile_s']:.1f} s, not in the figures)"
    )
    print(format_table(results))
    print()
    c, w = cold["figures"][0], warm["figures"][0]
    if c["first_batch_ms"] > 0:
        print(
            f"warm start: start-up {warm['startup_ms']:.0f} ms + first batch {w['first_batch_ms']:.1f} ms with the"
            f" {w['cache_source']} cache vs {cold['startup_ms']:.0f} ms + {c['first_batch_ms']:.1f} ms"
            f" {c['cache_source']}"
        )
    if not cold["rtx"]:
        print("note: this torch-tensorrt is not a TensorRT-RTX build: the runtime settings were no-ops.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"gpu": cold["gpu"], "size": args.size, "phases": {r["phase"]: r for r in results}}, f, indent=2)
    return 0


def run_fallback(args: argparse.Namespace, reason: str) -> int:
    """The same Lightning job, eager, with the callback attached (it warns that there are no engines)."""
    from _text_model import TextDataModule, TextPredictor

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # Lightning relaunches this script for the other ranks
        print(reason, flush=True)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    model = TextPredictor(args.size, args.batch_size, use_tensorrt=False)
    data = TextDataModule(args.batches, args.batch_size, args.size, buckets(args))
    settings = make_settings(args)
    trainer = make_trainer(args, [settings], accelerator=accelerator)
    predictions = trainer.predict(model, datamodule=data, return_predictions=True) or []
    if trainer.is_global_zero:
        texts = sum(len(p) for p in predictions)
        width = predictions[0].shape[-1] if predictions else 0
        shapes = sorted({ids.shape[1] for ids, _ in data.dataset.items})
        share = f", rank 0 of {trainer.world_size}" if trainer.world_size > 1 else ""
        prewarmed = settings.figures[0].prewarmed if settings.figures else 0
        print(
            f"predictions: {len(predictions)} batches, {texts} texts of width {width}, sequence lengths {shapes},"
            f" {prewarmed} shape(s) prewarmed ({args.size} text encoder, eager on {accelerator}{share})"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return example_main(parse_args(argv), run_phase, run_gpu, run_fallback)


if __name__ == "__main__":
    sys.exit(main())
