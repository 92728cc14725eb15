"""Multi-GPU inference on Lightning's DDP strategy: one engine per rank, one kernel cache file per GPU.

    python examples/distributed_predict.py --devices 2 --runs 2           # Lightning launches the ranks
    torchrun --nproc_per_node 2 examples/distributed_predict.py --runs 2  # or torchrun does

Every rank compiles its own engine, serves its share of the data through ``Trainer.predict`` with
``TRTRuntimeSettings`` and writes its predictions through a ``BasePredictionWriter`` to one file per
rank under ``--output-dir``. Kernel caches are kept one file per physical GPU under ``--cache-dir``
(``<key>/gpu-<uuid8>.bin``, the package's default layout), so a rank finds its GPU's kernels
whichever rank number it gets. Each run prints every rank's figures (its GPU, what its cache loaded
and whether that applies to this GPU) and the job's throughput. With ``--runs 2`` the second run
starts in fresh processes (Lightning-launched ranks) or with fresh modules and a fresh serving
session (torchrun), which reads the cache files from disk again, and finds every rank's cache ``warm``.

Without an NVIDIA GPU it runs the same job on CPU (``accelerator="cpu"``, ``--devices`` processes,
gloo), eagerly, and still writes the predictions.

Prediction files (``predictions-rank{R}.npy``) hold a sequence of ``np.save`` records, pairs of
(sample indices, predictions); :func:`read_predictions` reads one back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # keep NCCL's NVLink multicast off
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _model import DEFAULT_CACHE_DIR, cache_template  # noqa: E402
from lightning.pytorch.callbacks import BasePredictionWriter  # noqa: E402


def prediction_path(output_dir: str, rank: int) -> str:
    return os.path.join(output_dir, f"predictions-rank{rank}.npy")


class RankPredictionWriter(BasePredictionWriter):
    """Writes each rank's predictions, with their sample indices, to ``predictions-rank{R}.npy``.

    ``write_interval="batch"`` appends every batch as it is predicted (nothing is kept in memory);
    ``"epoch"`` writes them all at the end of the loop. Both give the same file.
    """

    def __init__(self, output_dir: str, write_interval: str = "batch") -> None:
        super().__init__(write_interval)
        self.output_dir = output_dir
        self.path = ""
        self.rows = 0
        self._file: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = prediction_path(self.output_dir, trainer.global_rank)
        self.rows = 0

    def _append(self, indices: Sequence[int], prediction: torch.Tensor) -> None:
        if self._file is None:
            self._file = open(self.path, "wb")
        np.save(self._file, np.asarray(list(indices), dtype=np.int64))
        np.save(self._file, prediction.detach().float().cpu().numpy())
        self.rows += len(prediction)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        self._file = open(self.path, "wb")  # a rank with no batches still leaves an (empty) file

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._append(batch_indices, prediction)

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        # one dataloader: ``predictions`` is per batch, ``batch_indices`` per dataloader, then per batch
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], (list, tuple)):
            batch_indices = batch_indices[0]
        for indices, prediction in zip(batch_indices, predictions):
            self._append(indices, prediction)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_predictions(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, predictions) from a file written by :class:`RankPredictionWriter`."""
    indices, predictions = [], []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while f.tell() < size:
            indices.append(np.load(f))
            predictions.append(np.load(f))
    if not indices:
        return np.zeros((0,), dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(indices), np.concatenate(predictions)


# --- arguments ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", type=int, default=None, help="ranks (default: every GPU; 2 CPU processes without one)"
    )
    parser.add_argument("--model", choices=("conv", "mlp"), default="conv")
    parser.add_argument("--batch-size", type=int, default=None, help="compiled batch size (default: conv 32, mlp 8)")
    parser.add_argument("--batches", type=int, default=200, help="batches in the whole dataset, split across ranks")
    parser.add_argument("--runs", type=int, default=1, help="runs; from the second on, every rank starts warm")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="kernel cache directory (default: %(default)s)")
    parser.add_argument(
        "--output-dir", default="predictions", help="one predictions file per rank (default: %(default)s)"
    )
    parser.add_argument("--write-interval", choices=("batch", "epoch"), default="batch")
    parser.add_argument(
        "--clear-cache", action="store_true", help="remove this example's cache files first (cold start)"
    )
    parser.add_argument("--summary-json", default=None, help="write every run's per-rank figures and throughput here")
    parser.add_argument(
        "--in-process", action="store_true", help="repeat runs in this process (automatic under torchrun)"
    )
    parser.add_argument("--_run", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices is None:
        args.devices = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or torch.cuda.device_count() or 2
    if min(args.devices, args.batches, args.runs) < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--devices, --batches, --runs and --batch-size must be positive")
    args.cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
    args.output_dir = os.path.abspath(args.output_dir)
    return args


def launched_externally() -> bool:
    """torchrun (or another launcher) started this process as one rank of a job."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def clear_cache(cache_dir: str) -> int:
    """Remove this example's cache files (and their records); returns how many files went."""
    from _model import clear_cache as clear

    return len(clear(cache_dir))


# --- one run --------------------------------------------------------------------------------------


def run_once(args: argparse.Namespace, run: int, result_dir: str) -> dict | None:
    """One ``Trainer.predict`` over all ranks; rank zero gathers every rank's figures and writes the run's summary."""
    from _model import BatchTimer, CompiledPredictor, SyntheticDataModule, device_name, figures_dict
    from lightning.pytorch import Trainer

    from lightning_trt_rtx import TRTRuntimeSettings

    # each Trainer.predict opens its own serving session: it reads the cache files from disk again
    gpu = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", args.devices))
    settings = TRTRuntimeSettings(runtime_cache=cache_template(args.cache_dir), print_table=False)
    timer = BatchTimer()
    writer = RankPredictionWriter(args.output_dir, args.write_interval)
    trainer = Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=args.devices,
        num_nodes=max(1, world // args.devices),
        strategy="ddp" if world > 1 else "auto",
        callbacks=[settings, timer, writer],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = CompiledPredictor(args.model, args.batch_size)
    data = SyntheticDataModule(args.model, args.batch_size, args.batches)
    trainer.predict(model, datamodule=data, return_predictions=False)

    rank = trainer.global_rank
    mine = {
        "rank": rank,
        "device": device_name(),
        "compile_s": model.compile_s,
        "compiled": model.compiled,
        "predictions": writer.path,
        "prediction_rows": writer.rows,
        **timer.result(),
    }
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        ranks: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)  # every rank reaches this point once, in order
    else:
        ranks = [mine]
    if not trainer.is_global_zero:
        return None
    figures = [figures_dict(fig) for fig in settings.figures]
    for r, row in enumerate(ranks):
        row["figures"] = figures[r] if r < len(figures) else {}
    summary = {"run": run, "world_size": trainer.world_size, "accelerator": "gpu" if gpu else "cpu", "ranks": ranks}
    summary.update(throughput(ranks))
    os.makedirs(result_dir, exist_ok=True)
    with open(os.path.join(result_dir, f"run{run}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def throughput(ranks: list[dict]) -> dict[str, float]:
    """The job's samples/s: all ranks' samples over the union of their loop windows (wall clock).

    ``steady`` leaves out each rank's first batch (context creation, kernel JIT or cache load).
    """
    active = [r for r in ranks if r["batches"] > 0]
    if not active:
        return {"samples": 0, "seconds": 0.0, "samples_per_s": 0.0, "steady_samples_per_s": 0.0}
    samples = sum(r["samples"] for r in active)
    seconds = max(r["wall_end"] for r in active) - min(r["wall_start"] for r in active)
    steady_samples = sum(r["samples"] * (r["batches"] - 1) / r["batches"] for r in active)
    steady_seconds = max(r["wall_end"] for r in active) - min(r["wall_first_end"] for r in active)
    return {
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "steady_samples_per_s": steady_samples / steady_seconds if steady_seconds > 0 else 0.0,
    }


def print_run(summary: dict) -> None:
    from lightning_trt_rtx.report import format_bytes, format_columns

    run, world = summary["run"], summary["world_size"]
    if summary["accelerator"] != "gpu":
        label = "eager, no engines"
    else:
        sources = sorted({(r.get("figures") or {}).get("cache_source", "none") for r in summary["ranks"]})
        label = "kernel cache: " + "/".join(sources)
    print(
        f"run {run} ({label}): {world} rank(s) on {summary['accelerator']}, {summary['samples']} samples in"
        f" {summary['seconds']:.3f} s: throughput {summary['samples_per_s']:.0f} samples/s"
        f" (steady {summary['steady_samples_per_s']:.0f} samples/s)"
    )
    header = (
        "rank",
        "device",
        "gpu",
        "engines",
        "cache",
        "applies",
        "batches",
        "first batch",
        "per batch",
        "cache file",
        "saved",
        "predictions",
    )
    rows = []
    for r in summary["ranks"]:
        fig = r.get("figures") or {}
        rows.append(
            (
                str(r["rank"]),
                r["device"],
                fig.get("gpu", "-"),
                str(fig.get("engines", 0)),
                fig.get("cache_source", "none"),
                fig.get("applies", "-"),
                str(r["batches"]),
                f"{r['first_batch_ms']:.1f} ms",
                f"{r['per_batch_ms']:.3f} ms",
                fig.get("cache_path") or "-",
                format_bytes(fig.get("saved_bytes", 0)),
                f"{r['predictions']} ({r['prediction_rows']} rows)",
            )
        )
    print(format_columns(header, rows), flush=True)


# --- orchestration --------------------------------------------------------------------------------


def _child_command(args: argparse.Namespace, run: int, result_dir: str) -> list[str]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--devices", str(args.devices),
        "--model", args.model,
        "--batches", str(args.batches),
        "--runs", str(args.runs),
        "--cache-dir", args.cache_dir,
        "--output-dir", args.output_dir,
        "--write-interval", args.write_interval,
        "--_run", str(run),
        "--_result-dir", result_dir,
    ]  # fmt: skip
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    return command


def finish(args: argparse.Namespace, summaries: list[dict]) -> int:
    if len(summaries) > 1 and summaries[0]["samples_per_s"] > 0:
        first, last = summaries[0], summaries[-1]
        print(
            f"run {last['run']} vs run 1: first batch per rank "
            + ", ".join(
                f"rank {a['rank']} {b['first_batch_ms']:.1f} ms vs {a['first_batch_ms']:.1f} ms"
                for a, b in zip(first["ranks"], last["ranks"])
            )
        )
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump({"devices": args.devices, "model": args.model, "runs": summaries}, f, indent=2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._run is not None:  # one run, in a fresh process (Lightning relaunches this same command per rank)
        try:
            run_once(args, args._run, args._result_dir)
        finally:
            from _model import destroy_process_group

            destroy_process_group()
        return 0

    import tempfile

    if args.clear_cache and (not launched_externally() or int(os.environ["LOCAL_RANK"]) == 0):
        clear_cache(args.cache_dir)
    if not torch.cuda.is_available():
        print("TensorRT needs an NVIDIA GPU and none is available here: running the same job eagerly on CPU (gloo).")

    summaries = []
    if args.in_process or launched_externally():
        # torchrun: its store and ranks are this process's; repeat the runs here, each with fresh modules
        result_dir = args._result_dir or os.path.join(args.output_dir, ".runs")
        if args.clear_cache and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        try:
            for run in range(1, args.runs + 1):
                summary = run_once(args, run, result_dir)
                if summary is not None:
                    print_run(summary)
                    summaries.append(summary)
        finally:
            from _model import destroy_process_group

            destroy_process_group()
        return finish(args, summaries) if summaries else 0

    env = dict(os.environ)
    env["NCCL_NVLS_ENABLE"] = env.get("NCCL_NVLS_ENABLE", "0")
    with tempfile.TemporaryDirectory(prefix="trt-rtx-dist-") as result_dir:
        for run in range(1, args.runs + 1):
            proc = subprocess.run(_child_command(args, run, result_dir), env=env)
            path = os.path.join(result_dir, f"run{run}.json")
            if proc.returncode != 0 or not os.path.isfile(path):
                print(f"error: run {run} failed (exit code {proc.returncode}).", file=sys.stderr)
                return proc.returncode or 1
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
            print_run(summary)
            summaries.append(summary)
    return finish(args, summaries)


if __name__ == "__main__":
    sys.exit(main())
