"""The examples and the benchmark runner on CPU: real scripts in real processes, real Trainers, real files.

CUDA is hidden from every script (``CUDA_VISIBLE_DEVICES=""``), so these exercise the CPU fallbacks
on any host; ``tests/gpu/test_examples_gpu.py`` runs the GPU paths.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _load(name: str, path: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return helpers.run_script(*args, env={"CUDA_VISIBLE_DEVICES": "", **(env or {})}, timeout=timeout)


def _explain(proc: subprocess.CompletedProcess) -> str:
    return helpers.explain(proc, tail=4000)


# --- examples/predict.py --------------------------------------------------------------------------


def test_predict_without_gpu_runs_eagerly_with_the_callback(tmp_path):
    cache_dir = tmp_path / "cache"
    proc = run_script("examples/predict.py", "--batches", "3", "--batch-size", "4", "--cache-dir", str(cache_dir))
    assert proc.returncode == 0, _explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("TensorRT needs an NVIDIA GPU"), _explain(proc)
    assert "predictions: 3 batches, 12 samples (conv, eager on cpu)" in lines, _explain(proc)
    # the callback was attached and says it had nothing to serve
    assert "No TensorRT engines found under CompiledPredictor" in proc.stderr
    # no engines: no cache was opened, so none was written
    assert not cache_dir.exists()


def test_predict_clear_cache_removes_only_cache_files(tmp_path):
    predict = _load("example_predict", os.path.join(EXAMPLES, "predict.py"))
    key = tmp_path / "sm90-trtrtx1.6.1-cuda13.0"
    key.mkdir()
    for name in ("rank0.bin", "rank1.bin", "rank0.bin.lock", "rank1.bin.corrupt"):
        (key / name).write_bytes(b"x")
    (key / "notes.txt").write_text("keep me")
    (tmp_path / "rank0.bin").write_bytes(b"not under a key directory")
    removed = predict.clear_cache(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [
        "rank0.bin",
        "rank0.bin.lock",
        "rank1.bin",
        "rank1.bin.corrupt",
    ]
    assert sorted(os.listdir(key)) == ["notes.txt"]
    assert (tmp_path / "rank0.bin").exists()


def test_predict_table_and_summary_from_figures():
    predict = _load("example_predict", os.path.join(EXAMPLES, "predict.py"))

    def figures(first, mean, source):
        return {
            "rank": 0, "engines": 1, "cache_source": source, "cache_path": "/c/rank0.bin", "cache_bytes": 2048,
            "saved_bytes": 4096, "batches": 10, "first_batch_ms": first, "mean_batch_ms": mean,
        }  # fmt: skip

    results = [
        {"phase": "cold", "cuda_graph_strategy": "disabled", "figures": [figures(400.0, 0.3, "cold")]},
        {"phase": "warm", "cuda_graph_strategy": "disabled", "figures": [figures(30.0, 0.3, "own")]},
        {"phase": "graphs", "cuda_graph_strategy": "whole_graph_capture", "figures": [figures(35.0, 0.1, "own")]},
    ]
    table = predict.format_table(results).splitlines()
    assert table[0].split()[:3] == ["phase", "cuda", "graphs"]
    assert [row.split()[0] for row in table[2:]] == ["cold", "warm", "graphs"]
    assert "400.0 ms" in table[2] and "30.0 ms" in table[3] and "/c/rank0.bin" in table[2] and "4.0 KiB" in table[2]
    summary = predict.summary_lines({r["phase"]: r for r in results})
    assert summary[0].startswith("warm start: first batch 30.0 ms with the warm cache vs 400.0 ms cold (0.07x")
    assert summary[1].startswith("whole-graph capture: 0.100 ms per batch vs 0.300 ms without (3.00x faster)")


# --- examples/distributed_predict.py --------------------------------------------------------------


def _expected_outputs(indices: np.ndarray) -> np.ndarray:
    model = _load("example_model", os.path.join(EXAMPLES, "_model.py"))
    dataset = model.SyntheticDataset("conv", 12)
    with torch.inference_mode():
        return model.build_model("conv")(torch.stack([dataset[int(i)] for i in indices])).numpy()


def test_distributed_predict_two_cpu_ranks_two_runs(tmp_path):
    out, summary_path = tmp_path / "predictions", tmp_path / "summary.json"
    proc = run_script(
        "examples/distributed_predict.py",
        "--devices", "2", "--batches", "4", "--batch-size", "3", "--runs", "2",
        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--summary-json", str(summary_path),
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    assert "running the same job eagerly on CPU" in proc.stdout
    for run in (1, 2):
        assert any(
            line.startswith(f"run {run} (eager, no engines): 2 rank(s) on cpu, 12 samples")
            for line in proc.stdout.splitlines()
        ), _explain(proc)
    assert "samples/s" in proc.stdout

    distributed = _load("example_distributed", os.path.join(EXAMPLES, "distributed_predict.py"))
    assert sorted(os.listdir(out)) == ["predictions-rank0.npy", "predictions-rank1.npy"]
    seen = []
    for rank in (0, 1):
        indices, predictions = distributed.read_predictions(str(out / f"predictions-rank{rank}.npy"))
        assert predictions.shape == (6, 10)
        np.testing.assert_allclose(predictions, _expected_outputs(indices), rtol=1e-4, atol=1e-5)
        seen.extend(indices.tolist())
    assert sorted(seen) == list(range(12))  # every sample exactly once across the ranks

    summary = json.loads(summary_path.read_text())
    assert [r["run"] for r in summary["runs"]] == [1, 2]
    for run in summary["runs"]:
        assert run["world_size"] == 2 and run["samples"] == 12 and run["samples_per_s"] > 0
        assert [(r["rank"], r["batches"], r["prediction_rows"]) for r in run["ranks"]] == [(0, 2, 6), (1, 2, 6)]
        assert all(r["figures"]["engines"] == 0 for r in run["ranks"])


@pytest.mark.parametrize("interval", ["batch", "epoch"])
def test_prediction_writer_intervals_write_the_same_file(tmp_path, interval):
    from lightning.pytorch import Trainer

    distributed = _load("example_distributed", os.path.join(EXAMPLES, "distributed_predict.py"))
    model_mod = _load("example_model", os.path.join(EXAMPLES, "_model.py"))
    writer = distributed.RankPredictionWriter(str(tmp_path), interval)
    trainer = Trainer(
        accelerator="cpu", devices=1, callbacks=[writer], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    model = model_mod.CompiledPredictor("mlp", 2)
    trainer.predict(model, datamodule=model_mod.SyntheticDataModule("mlp", 2, batches=3), return_predictions=False)
    indices, predictions = distributed.read_predictions(str(tmp_path / "predictions-rank0.npy"))
    assert indices.tolist() == list(range(6)) and writer.rows == 6
    dataset = model_mod.SyntheticDataset("mlp", 6)
    with torch.inference_mode():
        expected = model_mod.build_model("mlp")(torch.stack([dataset[i] for i in range(6)])).numpy()
    np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-5)


def test_one_module_served_by_trainers_with_different_settings():
    """The benchmarks serve one compiled module with several Trainers in turn, each its own settings."""
    from lightning.pytorch import Trainer

    from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimeSettings
    from lightning_trt_rtx.session import ServingSession

    model_mod = _load("example_model", os.path.join(EXAMPLES, "_model.py"))
    model = model_mod.CompiledPredictor("mlp", 2)
    data = model_mod.SyntheticDataModule("mlp", 2, batches=2)
    served = []
    for strategy, graphs in (("disabled", True), ("whole_graph_capture", False), ("disabled", False)):
        settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=None, print_table=False)
        callbacks = [settings] + ([TRTCudaGraphs()] if graphs else [])
        trainer = Trainer(
            accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        trainer.predict(model, datamodule=data, return_predictions=False)
        session = ServingSession.of(model)
        served.append((session.settings.cuda_graph_strategy, session.graphs_requested, settings.figures[0].batches))
    # each Trainer's own settings; the first one's graphs request does not leak into the next
    assert served == [("disabled", True, 2), ("whole_graph_capture", False, 2), ("disabled", False, 2)]


@pytest.mark.parametrize("timer_first", [True, False])
def test_batch_timer_leaves_end_of_loop_work_out_of_the_loop(timer_first):
    """A callback's on_predict_end (the kernel-cache save) is not loop time, whichever is listed first."""
    import time

    from lightning.pytorch import Callback, Trainer

    model_mod = _load("example_model", os.path.join(EXAMPLES, "_model.py"))

    class SlowSave(Callback):
        def on_predict_end(self, trainer, pl_module):
            time.sleep(0.5)

    timer = model_mod.BatchTimer()
    callbacks = [timer, SlowSave()] if timer_first else [SlowSave(), timer]
    trainer = Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    data = model_mod.SyntheticDataModule("mlp", 2, batches=4)
    trainer.predict(model_mod.CompiledPredictor("mlp", 2), datamodule=data, return_predictions=False)
    assert timer.batches == 4 and timer.samples == 8
    assert 0 < timer.loop_s < 0.5 and 0 < timer.per_batch_ms < timer.loop_s * 1e3


def test_throughput_combines_rank_windows():
    distributed = _load("example_distributed", os.path.join(EXAMPLES, "distributed_predict.py"))
    ranks = [
        {"batches": 5, "samples": 50, "wall_start": 10.0, "wall_first_end": 10.5, "wall_end": 12.5},
        {"batches": 5, "samples": 50, "wall_start": 10.2, "wall_first_end": 10.4, "wall_end": 12.0},
        {"batches": 0, "samples": 0, "wall_start": 0.0, "wall_first_end": 0.0, "wall_end": 0.0},
    ]
    t = distributed.throughput(ranks)
    assert t["samples"] == 100
    assert math.isclose(t["seconds"], 2.5)
    assert math.isclose(t["samples_per_s"], 40.0)
    assert math.isclose(t["steady_samples_per_s"], 80 / 2.1)


# --- examples/cli.py ------------------------------------------------------------------------------


def test_cli_predict_with_callback_and_plugin_from_yaml(tmp_path):
    proc = run_script(
        "examples/cli.py", "predict", "--config", "examples/cli.yaml", "--data.batches", "2",
        env={"LIGHTNING_TRT_RTX_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    output = proc.stdout + proc.stderr
    assert "No TensorRT engines found under CompiledPredictor" in output
    # one shared session, one report: the callback's table (the plugin stays quiet when the callback closed it)
    assert output.count("TensorRT-RTX serving") == 1, _explain(proc)
    assert "TensorRT-RTX serving (whole_graph_capture)" in output


# --- benchmarks/ (run.py and its modules) ---------------------------------------------------------


def test_benchmarks_without_gpu_exit_2_and_measure_nothing(tmp_path):
    out = tmp_path / "results"
    proc = run_script("benchmarks/run.py", "--out", str(out))
    assert proc.returncode == 2, _explain(proc)
    assert "needs an NVIDIA GPU" in proc.stderr and "nothing was measured" in proc.stderr
    assert not out.exists()


def test_benchmark_plumbing_dry_run_on_cpu(tmp_path):
    """The runner's tasks, subprocesses, medians and outputs, with eager CPU models (test-only mode)."""
    out = tmp_path / "results"
    proc = run_script(
        "benchmarks/run.py", "--out", str(out), "--reps", "1", "--batches", "3", "--only", "loop", "overhead",
        env={"LIGHTNING_TRT_RTX_BENCH_DRY_RUN": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    results = json.loads((out / "results.json").read_text())
    assert results["gpu"].startswith("cpu (DRY RUN")
    overhead, row = results["measurements"]
    # overhead: three variants, twice the repetitions, the figure a median of back-to-back pairs
    assert overhead["key"] == "integration_overhead" and overhead["goal"] == "<= 2%"
    runs = overhead["details"]["per_batch_ms"]
    assert sorted(runs) == ["callback", "core", "manual"] and all(len(v) == 2 for v in runs.values())
    pairs = [(c / m - 1) * 100 for c, m in zip(runs["callback"], runs["manual"])]
    assert overhead["details"]["paired_pct_callback_vs_manual"] == pytest.approx(pairs)
    assert overhead["value"] == pytest.approx(statistics.median(pairs))
    assert f"in {sum(p > 0 for p in pairs)} of 2 pairs" in overhead["display"]
    assert row["key"] == "lightning_vs_loop" and row["goal"] == "<= 1.2x"
    reps = row["details"]["per_batch_ms"]
    assert len(reps["lightning"]) == 1 and len(reps["loop"]) == 1
    assert math.isclose(row["value"], reps["lightning"][0] / reps["loop"][0])
    assert row["met"] == (row["value"] <= 1.2)
    assert (out / "lightning_profile.txt").read_text().startswith("cProfile of one Trainer.predict over 3 batches")
    assert "DRY RUN" in (out / "results.md").read_text()
    assert (out / "work" / ".gitignore").read_text() == "*\n"


def test_write_results_tables_goals_and_gpu_name(tmp_path):
    from benchmarks import harness as bench

    rows = [
        ("warm_start", 0.08, True), ("graphs", 2.1, False), ("integration_overhead", 2.5, False),
        ("lightning_vs_loop", 1.1, True), ("two_gpu_throughput", 1.9, True), ("two_gpu_warm_start", None, None),
        ("two_gpu_swapped_warm_start", 0.12, False),
    ]  # fmt: skip
    results = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "date": "2026-11-26",
        "versions": {"torch": "2.14.1"},
        "method": ["medians"],
        "measurements": [
            {
                "key": k,
                "measurement": f"m-{k}",
                "value": v,
                "display": None if v is None else f"{v}",
                "details": {"x": 1},
            }
            for k, v, _ in rows
        ],
    }
    results["measurements"][0]["pair"] = {"labels": ["cold", "warm"], "values": [400.0, 32.0], "unit": "ms"}
    written = bench.write_results(results, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [m["met"] for m in saved["measurements"]] == [met for _, _, met in rows]
    assert saved["gpu"] == "NVIDIA H100 80GB HBM3"
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| m-")]
    assert len(table) == len(rows)
    for line, (_, _, met) in zip(table, rows):
        assert "| NVIDIA H100 80GB HBM3 | 2026-11-26 |" in line
        assert {True: "| yes |", False: "| **no** |", None: "| n/a |"}[met] in line
    if importlib.util.find_spec("matplotlib") is None:
        assert saved["plot"].startswith("skipped: matplotlib is not installed")
        assert "results.png: skipped" in (tmp_path / "results.md").read_text()
        assert not (tmp_path / "results.png").exists()
    else:
        assert str(tmp_path / "results.png") in written and (tmp_path / "results.png").stat().st_size > 0


def test_tensor_parallel_example_says_what_it_needs_without_gpus():
    proc = run_script(os.path.join(EXAMPLES, "tensor_parallel_predict.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs 2 NVIDIA GPUs and torch-tensorrt-rtx (found 0 GPU(s))" in proc.stdout
    bad = run_script(os.path.join(EXAMPLES, "tensor_parallel_predict.py"), "--gpus", "1")
    assert bad.returncode == 2 and "--gpus must be at least 2" in bad.stderr
