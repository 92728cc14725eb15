"""The examples and the benchmark runner on a GPU with torch-tensorrt-rtx (``pytest -m gpu``).

Kernel caches are one file per physical GPU (``<key>/gpu-<uuid8>.bin`` with its ``.json`` record); a run
reports ``cold`` with no file yet and ``warm`` once this GPU's own file is there.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from lightning_utilities.core.imports import RequirementCache

from tests import helpers
from tests.helpers import run_if

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


run_script = helpers.run_script
_explain = helpers.explain


def gpu_id(index: int) -> str:
    """The ``{gpu}`` id (first 8 hex digits of the UUID) of CUDA device ``index`` as this process numbers it."""
    from lightning_trt_rtx import cache

    with torch.cuda.device(index):
        return cache.current_gpu().id


def assert_gpu_file(path: str, gpu: str) -> None:
    """``path`` is GPU ``gpu``'s cache file, and its record says that GPU filled it."""
    from lightning_trt_rtx import cache

    assert os.path.basename(path) == f"gpu-{gpu}.bin", path
    record = cache.read_record(path)
    assert record is not None and record.gpu_id == gpu, path


@run_if(min_cuda_gpus=1, rtx=True)
def test_predict_cold_warm_graphs_table(tmp_path):
    results = tmp_path / "predict.json"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = run_script(
        "examples/predict.py", "--batches", "30", "--cache-dir", str(tmp_path / "cache"), "--json", str(results),
        env={"CUDA_VISIBLE_DEVICES": visible},
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
    assert (cold["cache_source"], warm["cache_source"], graphs["cache_source"]) == ("cold", "warm", "warm")
    assert (cold["applies"], warm["applies"], graphs["applies"]) == ("-", "yes", "yes")
    assert min(cold["engines"], warm["engines"], graphs["engines"]) >= 1
    assert cold["saved_bytes"] > 0 and warm["cache_bytes"] > 0
    assert warm["cache_path"].startswith(str(tmp_path / "cache")) and warm["cache_path"] == cold["cache_path"]
    assert cold["gpu"] == warm["gpu"] == graphs["gpu"] == gpu_id(0)  # run with device 0 only visible
    assert_gpu_file(warm["cache_path"], cold["gpu"])
    assert warm["first_batch_ms"] < cold["first_batch_ms"]
    assert phases["cold"]["predicted_batches"] == 30


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.skipif(
    not RequirementCache("jsonargparse[signatures]>=4.27.7"), reason="LightningCLI needs jsonargparse[signatures]"
)
def test_cli_predict_serves_compiled_engines(tmp_path):
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = run_script(
        "examples/cli.py", "predict", "--config", "examples/cli.yaml",
        env={"LIGHTNING_TRT_RTX_CACHE_DIR": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": visible},
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    output = proc.stdout + proc.stderr
    assert "No TensorRT engines found" not in output
    assert "TensorRT-RTX serving (whole_graph_capture)" in output
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".bin")]
    assert len(files) == 1 and os.path.getsize(files[0]) > 0  # the default: one file for this GPU
    assert_gpu_file(files[0], gpu_id(0))


def _check_distributed(proc, out, summary_path, devices):
    assert proc.returncode == 0, _explain(proc)
    print(proc.stdout)
    summary = json.loads(summary_path.read_text())
    cold_run, warm_run = summary["runs"]
    assert cold_run["world_size"] == warm_run["world_size"] == devices
    for cold, warm in zip(cold_run["ranks"], warm_run["ranks"]):
        assert cold["compiled"] and cold["figures"]["engines"] >= 1
        assert (cold["figures"]["cache_source"], warm["figures"]["cache_source"]) == ("cold", "warm")
        assert cold["figures"]["gpu"] == warm["figures"]["gpu"] == gpu_id(cold["rank"])  # rank r on device r
        assert warm["figures"]["cache_path"] == cold["figures"]["cache_path"]
        assert_gpu_file(cold["figures"]["cache_path"], cold["figures"]["gpu"])
        assert warm["first_batch_ms"] < cold["first_batch_ms"]
    assert len({r["figures"]["cache_path"] for r in warm_run["ranks"]}) == devices  # one file per GPU
    assert warm_run["steady_samples_per_s"] > 0
    # each rank's GPU id and cache source are in the printed table too
    for r in warm_run["ranks"]:
        assert any(
            line.split()[:1] == [str(r["rank"])] and r["device"] in line and r["figures"]["gpu"] in line
            and " warm " in line
            for line in proc.stdout.splitlines()
        ), proc.stdout

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
        env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]},
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
    # the runner's plumbing on a real GPU: every default step, the graphs step over the 32x256 MLP alone (all
    # six models take about 15 minutes; the figures' own runs are in benchmarks/README.md)
    proc = run_script(
        "benchmarks/run.py", "--out", str(out), "--quick", "--models", "mlp-deep",
        env={"CUDA_VISIBLE_DEVICES": "0"}, timeout=900,
    )  # fmt: skip
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, _explain(proc)
    results = json.loads((out / "results.json").read_text())
    gpu = torch.cuda.get_device_name(0)
    assert results["gpu"] == gpu
    keys = [m["key"] for m in results["measurements"]]
    graphs = ["graphs", "graphs_never_slower", "graphs_never_slower_any_repetition", "graphs_auto_vs_best",
              "graphs_auto_first_loop", "graphs_addresses_overhead", "graphs_vs_bare"]  # fmt: skip
    assert keys == ["warm_start", *graphs, "integration_overhead", "lightning_vs_loop"]
    for row in results["measurements"]:
        assert row["value"] is not None and row["value"] == row["value"], row  # measured, not NaN
        assert isinstance(row["met"], bool)
    warm = results["measurements"][0]["details"]
    assert warm["warm_cache_source"] == ["warm"] and warm["engines"] >= 1
    md = (out / "results.md").read_text()
    assert md.count(f"| {gpu} |") == len(keys)
    assert (out / "lightning_profile.txt").stat().st_size > 0


@run_if(min_cuda_gpus=2, rtx=True)
def test_tensor_parallel_engines_get_settings_before_their_one_context(tmp_path):
    results = tmp_path / "tp.json"
    proc = run_script(
        "examples/tensor_parallel_predict.py", "--runs", "2", "--batches", "20", "--cache-dir", str(tmp_path / "cache"),
        "--json", str(results), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    print(proc.stdout)
    printed = [json.loads(line[3:]) for line in proc.stdout.splitlines() if line.startswith("TP ")]
    runs = json.loads(results.read_text())["runs"]
    assert printed == runs[0] + runs[1]
    cold, warm = runs
    assert [(r["run"], r["rank"]) for r in cold + warm] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for row in cold + warm:
        assert row["engines"] >= 1 and all(row["native_nccl"]), row
        assert row["contexts"] == [1] * row["engines"], row  # settings were there before the first context
        assert row["max_abs_error"] < 1e-2, row
        assert row["first_execute_ms"] > 0 and row["steady_ms"] > 0, row
        assert row["gpu"] == gpu_id(row["rank"]), row
        assert_gpu_file(row["cache_file"], row["gpu"])
    assert [r["cache"] for r in cold] == ["cold", "cold"] and [r["cache"] for r in warm] == ["warm", "warm"]
    assert all(r["saved_bytes"] > 0 for r in cold) and all(r["cache_bytes"] > 0 for r in warm)
    assert cold[0]["cache_file"] != cold[1]["cache_file"]  # one file per GPU
    # per-rank warm/cold ratios and the goal, measured after a barrier
    assert any(line.startswith("warm start (first execute after a barrier, run 2 / run 1): rank 0 ")
               for line in proc.stdout.splitlines()), proc.stdout  # fmt: skip


@run_if(min_cuda_gpus=2, rtx=True)
def test_fabric_predict_two_gpus_every_rank_warm_on_its_second_run(tmp_path):
    cache_dir = str(tmp_path / "cache")
    summaries = []
    for name, extra in (("job1", ["--runs", "2", "--clear-cache"]), ("job2", ["--runs", "1"])):
        summary = tmp_path / f"{name}.json"
        proc = run_script(
            "examples/fabric_predict.py", "--devices", "2", "--batches", "10", "--cache-dir", cache_dir,
            "--summary-json", str(summary), *extra,
        )  # fmt: skip
        assert proc.returncode == 0, _explain(proc)
        print(proc.stdout)
        assert "eagerly" not in proc.stdout and "No TensorRT engines found" not in proc.stderr
        summaries.append(json.loads(summary.read_text()))
    first_job, second_job = summaries
    cold, warm_in_process = first_job["runs"]
    (warm_fresh,) = second_job["runs"]
    for rank in (0, 1):
        rows = [cold[rank], warm_in_process[rank], warm_fresh[rank]]
        assert [r["rank"] for r in rows] == [rank] * 3 and all(r["compiled"] for r in rows)
        figures = [r["figures"] for r in rows]
        # run 1 starts cold; its second run (fresh engines, a fresh session) and a fresh job both load warm
        assert [f["cache_source"] for f in figures] == ["cold", "warm", "warm"], figures
        assert all(f["engines"] >= 1 and f["gpu"] == gpu_id(rank) for f in figures)
        assert figures[0]["saved_bytes"] > 0 and figures[1]["cache_bytes"] > 0
        assert_gpu_file(figures[0]["cache_path"], figures[0]["gpu"])
        assert "kernel cache warm" in rows[1]["summary"]
    assert cold[0]["figures"]["cache_path"] != cold[1]["figures"]["cache_path"]


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.timeout(1200)
def test_text_predict_dynamic_sequence_prewarmed_cold_then_warm(tmp_path):
    """examples/text_predict.py: the BERT-sized encoder compiled once for 16..512 tokens, five bucket shapes
    prewarmed; the warm run loads the saved program and finds the prewarmed kernels in this GPU's file."""
    sys.path.insert(0, EXAMPLES)
    from _text_model import BUCKETS

    results = tmp_path / "text.json"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    proc = run_script(
        "examples/text_predict.py", "--batches", "16", "--cache-dir", str(tmp_path / "cache"), "--json", str(results),
        env={"CUDA_VISIBLE_DEVICES": visible}, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    print(proc.stdout)
    assert "eagerly" not in proc.stdout and "No TensorRT engines found" not in proc.stderr
    assert any(line.startswith("warm start: start-up") for line in proc.stdout.splitlines()), proc.stdout
    phases = json.loads(results.read_text())["phases"]
    cold, warm = phases["cold"], phases["warm"]
    assert cold["predicted_batches"] == warm["predicted_batches"] == 16
    assert set(cold["shapes"]) <= set(BUCKETS) and cold["shapes"] == warm["shapes"]
    c, w = cold["figures"][0], warm["figures"][0]
    assert (c["cache_source"], w["cache_source"]) == ("cold", "warm")
    assert c["engines"] >= 1 and w["engines"] >= 1
    assert c["prewarmed"] == w["prewarmed"] == len(BUCKETS)
    assert c["saved_bytes"] > 0 and w["cache_bytes"] > 0 and w["gpu"] == gpu_id(0)
    assert_gpu_file(w["cache_path"], w["gpu"])
    # the prewarm compiles five shapes' kernels cold; warm, it loads them from the file
    assert warm["startup_ms"] < cold["startup_ms"]
