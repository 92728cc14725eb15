"""The examples and the benchmark runner on a GPU with torch-tensorrt-rtx (``pytest -m gpu``)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from tests import helpers
from tests.helpers import run_if

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


run_script = helpers.run_script
_explain = helpers.explain


@run_if(min_cuda_gpus=1, rtx=True)
def test_predict_cold_warm_graphs_table(tmp_path):
    results = tmp_path / "predict.json"
    proc = run_script(
        "examples/predict.py", "--batches", "30", "--cache-dir", str(tmp_path / "cache"), "--json", str(results),
        env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]},
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    print(proc.stdout)
    rows = [line.split() for line in proc.stdout.splitlines()]
    table = [row[:2] for row in rows if len(row) > 1 and row[1] in ("disabled", "whole_graph_capture")]
    assert table == [["cold", "disabled"], ["warm", "disabled"], ["graphs", "whole_graph_capture"]], _explain(proc)
    assert torch.cuda.get_device_name(0) in proc.stdout
    assert any(line.startswith("warm start: first batch") for line in proc.stdout.splitlines())
    assert any(line.startswith("whole-graph capture:") for line in proc.stdout.splitlines())

    phases = json.loads(results.read_text())["phases"]
    cold, warm, graphs = (phases[p]["figures"][0] for p in ("cold", "warm", "graphs"))
    assert (cold["cache_source"], warm["cache_source"], graphs["cache_source"]) == ("cold", "own", "own")
    assert min(cold["engines"], warm["engines"], graphs["engines"]) >= 1
    assert cold["saved_bytes"] > 0 and warm["cache_bytes"] > 0
    assert os.path.isfile(warm["cache_path"]) and warm["cache_path"].startswith(str(tmp_path / "cache"))
    assert warm["first_batch_ms"] < cold["first_batch_ms"]
    assert phases["cold"]["predicted_batches"] == 30


@run_if(min_cuda_gpus=1, rtx=True)
def test_cli_predict_serves_compiled_engines(tmp_path):
    proc = run_script(
        "examples/cli.py", "predict", "--config", "examples/cli.yaml",
        env={"LIGHTNING_TRT_RTX_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    output = proc.stdout + proc.stderr
    assert "No TensorRT engines found" not in output
    assert "TensorRT-RTX serving (whole_graph_capture)" in output
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".bin")]
    assert [os.path.basename(f) for f in files] == ["rank0.bin"] and os.path.getsize(files[0]) > 0


def _check_distributed(proc, out, summary_path, devices):
    assert proc.returncode == 0, _explain(proc)
    print(proc.stdout)
    summary = json.loads(summary_path.read_text())
    cold_run, warm_run = summary["runs"]
    assert cold_run["world_size"] == warm_run["world_size"] == devices
    for cold, warm in zip(cold_run["ranks"], warm_run["ranks"]):
        assert cold["compiled"] and cold["figures"]["engines"] >= 1
        assert (cold["figures"]["cache_source"], warm["figures"]["cache_source"]) == ("cold", "own")
        assert cold["figures"]["cache_path"].endswith(f"rank{cold['rank']}.bin")
        assert warm["first_batch_ms"] < cold["first_batch_ms"]
    assert len({r["figures"]["cache_path"] for r in warm_run["ranks"]}) == devices  # one file per rank
    assert warm_run["steady_samples_per_s"] > 0

    sys.path.insert(0, EXAMPLES)
    from distributed_predict import read_predictions

    seen = []
    for rank in range(devices):
        indices, predictions = read_predictions(str(out / f"predictions-rank{rank}.npy"))
        assert predictions.shape == (len(indices), 10) and np.isfinite(predictions).all()
        seen.extend(indices.tolist())
    assert sorted(seen) == list(range(32 * 40))


@run_if(min_cuda_gpus=1, rtx=True)
def test_distributed_predict_one_gpu_second_run_is_warm(tmp_path):
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    proc = run_script(
        "examples/distributed_predict.py", "--devices", "1", "--runs", "2", "--clear-cache", "--batches", "40",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--summary-json", str(summary),
        env={"CUDA_VISIBLE_DEVICES": "0"},
    )  # fmt: skip
    _check_distributed(proc, out, summary, 1)


@run_if(min_cuda_gpus=2, rtx=True)
def test_distributed_predict_two_gpus_every_rank_warm_on_second_run(tmp_path):
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    proc = run_script(
        "examples/distributed_predict.py", "--devices", "2", "--runs", "2", "--clear-cache", "--batches", "40",
        "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out), "--summary-json", str(summary),
        "--write-interval", "epoch",
    )  # fmt: skip
    _check_distributed(proc, out, summary, 2)


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.timeout(900)
def test_benchmark_runner_quick(tmp_path):
    out = tmp_path / "results"
    proc = run_script("benchmarks/run.py", "--out", str(out), "--quick", env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, _explain(proc)
    results = json.loads((out / "results.json").read_text())
    gpu = torch.cuda.get_device_name(0)
    assert results["gpu"] == gpu
    keys = [m["key"] for m in results["measurements"]]
    assert keys == ["warm_start", "graphs", "integration_overhead", "lightning_vs_loop"]
    for row in results["measurements"]:
        assert row["value"] is not None and row["value"] == row["value"], row  # measured, not NaN
        assert isinstance(row["met"], bool)
    warm = results["measurements"][0]["details"]
    assert warm["warm_cache_source"] == ["warm"] and warm["engines"] >= 1
    md = (out / "results.md").read_text()
    assert md.count(f"| {gpu} |") == 4
    assert (out / "lightning_profile.txt").stat().st_size > 0


@run_if(min_cuda_gpus=2, rtx=True)
def test_tensor_parallel_engines_get_settings_before_their_one_context(tmp_path):
    runs = []
    for _ in range(2):
        proc = run_script("examples/tensor_parallel_predict.py", "--cache-dir", str(tmp_path), timeout=300)
        assert proc.returncode == 0, _explain(proc)
        runs.append([json.loads(line[3:]) for line in proc.stdout.splitlines() if line.startswith("TP ")])
    cold, warm = runs
    assert [r["rank"] for r in cold] == [0, 1]
    for row in cold + warm:
        assert row["engines"] >= 1 and all(row["native_nccl"]), row
        assert row["contexts"] == [1] * row["engines"], row  # settings were there before the first context
        assert row["max_abs_error"] < 1e-2, row
    assert [r["cache"] for r in cold] == ["cold", "cold"] and [r["cache"] for r in warm] == ["own", "own"]
    assert all(r["cache_bytes"] > 0 for r in cold)
