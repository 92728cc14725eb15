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


def assert_exits_2(main, message: str, capsys) -> None:
    """An example's ``main`` rejects its arguments as its command line does: exit status 2, ``message`` on stderr."""
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


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


def test_examples_keep_one_cache_file_per_gpu_and_clear_only_cache_files(tmp_path):
    from lightning_trt_rtx import cache

    predict = _load("example_predict", os.path.join(EXAMPLES, "predict.py"))
    distributed = _load("example_distributed", os.path.join(EXAMPLES, "distributed_predict.py"))
    template = predict.cache_template(str(tmp_path))
    assert distributed.cache_template(str(tmp_path)) == template
    # the package's default layout under the example's directory: one file per physical GPU
    assert template == cache.default_template().replace(cache.default_cache_dir(), str(tmp_path))
    assert cache.template_fields(template) == ["sm", "trt", "cuda", "gpu"]

    key = tmp_path / "sm90-trtrtx1.6.1-cuda13.0"
    key.mkdir()
    ours = ("gpu-3b6d1a2c.bin", "gpu-3b6d1a2c.bin.json", "gpu-3b6d1a2c.bin.lock", "gpu-9f8e7d6c.bin.corrupt",
            "gpu-9f8e7d6c-rank1.bin", "rank0.bin", "rank1.bin.tmp")  # fmt: skip
    for name in ours:
        (key / name).write_bytes(b"x")
    (key / "notes.txt").write_text("keep me")
    (tmp_path / "gpu-3b6d1a2c.bin").write_bytes(b"not under a key directory")
    removed = predict.clear_cache(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(ours)
    assert sorted(os.listdir(key)) == ["notes.txt"]
    assert (tmp_path / "gpu-3b6d1a2c.bin").exists()
    (key / "gpu-3b6d1a2c.bin").write_bytes(b"x")
    assert distributed.clear_cache(str(tmp_path)) == 1 and sorted(os.listdir(key)) == ["notes.txt"]


def test_predict_table_and_summary_from_figures():
    predict = _load("example_predict", os.path.join(EXAMPLES, "predict.py"))

    from lightning_trt_rtx import cache
    from lightning_trt_rtx.report import RankFigures

    model_mod = _load("example_model", os.path.join(EXAMPLES, "_model.py"))

    def figures(first, mean, source):
        stats = cache.CacheStats(
            path="/c/gpu-3b6d1a2c.bin", source=source, load_bytes=0 if source == "cold" else 2048, save_bytes=4096,
            saved=True,
        )  # fmt: skip
        fig = RankFigures(0, "3b6d1a2c", 1, "", 10, first, mean, stats)
        values = model_mod.figures_dict(fig)
        fields = ("rank", "gpu", "engines", "graphs", "batches", "first_batch_ms", "mean_batch_ms", "cache")
        assert RankFigures.from_dict({k: values[k] for k in fields}) == fig  # every field, and the derived ones
        return json.loads(json.dumps(values))  # what a phase writes to its JSON

    results = [
        {"phase": "cold", "cuda_graph_strategy": "disabled", "figures": [figures(400.0, 0.3, "cold")]},
        {"phase": "warm", "cuda_graph_strategy": "disabled", "figures": [figures(30.0, 0.3, "warm")]},
        {"phase": "graphs", "cuda_graph_strategy": "whole_graph_capture", "figures": [figures(35.0, 0.1, "warm")]},
    ]
    assert results[1]["figures"][0]["applies"] == "yes" and results[1]["figures"][0]["warm"] is True
    assert results[0]["figures"][0]["applies"] == "-" and results[0]["figures"][0]["warm"] is False
    table = predict.format_table(results).splitlines()
    assert table[0].split()[:7] == ["phase", "cuda", "graphs", "rank", "gpu", "cache", "applies"]
    rows = [row.split() for row in table[2:]]
    assert [row[:6] for row in rows] == [
        ["cold", "disabled", "0", "3b6d1a2c", "cold", "-"],
        ["warm", "disabled", "0", "3b6d1a2c", "warm", "yes"],
        ["graphs", "whole_graph_capture", "0", "3b6d1a2c", "warm", "yes"],
    ]
    assert "400.0 ms" in table[2] and "30.0 ms" in table[3] and "/c/gpu-3b6d1a2c.bin" in table[2]
    assert "4.0 KiB" in table[2] and "2.0 KiB" in table[3]
    summary = predict.summary_lines({r["phase"]: r for r in results})
    assert summary[0].startswith("warm start: first batch 30.0 ms with the warm cache vs 400.0 ms cold (0.07x")
    assert summary[1].startswith("whole-graph capture: 0.100 ms per batch vs 0.300 ms without (3.00x faster)")


# --- examples/distributed_predict.py --------------------------------------------------------------


def _expected_outputs(indices: np.ndarray) -> np.ndarray:
    model = _load("example_model", os.path.join(EXAMPLES, "_model.py"))
    dataset = model.SyntheticDataset("conv", 12)
    with torch.inference_mode():
        return model.build_model("conv")(torch.stack([dataset[int(i)] for i in indices])).numpy()


def test_distributed_predict_two_cpu_ranks(tmp_path):
    """One run (each run is a fresh launch of both ranks; two runs, the second warm: the GPU suite)."""
    out, summary_path = tmp_path / "predictions", tmp_path / "summary.json"
    proc = run_script(
        "examples/distributed_predict.py",
        "--devices", "2", "--batches", "4", "--batch-size", "3", "--runs", "1",
        "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--summary-json", str(summary_path),
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    assert "running the same job eagerly on CPU" in proc.stdout
    lines = proc.stdout.splitlines()
    assert any(
        line.startswith("run 1 (eager, no engines): 2 rank(s) on cpu, 12 samples") for line in lines
    ), _explain(proc)
    assert "samples/s" in proc.stdout
    # every rank's figures, with its GPU id and cache source (no engines on CPU: no cache, "none")
    headers = [line.split() for line in lines if line.startswith("rank ")]
    assert len(headers) == 1 and headers[0][:6] == ["rank", "device", "gpu", "engines", "cache", "applies"]
    rows = [line.split() for line in lines if line[:2] in ("0 ", "1 ")]
    assert [row[:6] for row in rows] == [[r, "cpu", "cpu", "0", "none", "-"] for r in ("0", "1")], _explain(proc)

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
    assert [r["run"] for r in summary["runs"]] == [1]
    for run in summary["runs"]:
        assert run["world_size"] == 2 and run["samples"] == 12 and run["samples_per_s"] > 0
        assert [(r["rank"], r["batches"], r["prediction_rows"]) for r in run["ranks"]] == [(0, 2, 6), (1, 2, 6)]
        for rank in run["ranks"]:
            fig = rank["figures"]
            assert (fig["rank"], fig["engines"], fig["gpu"], fig["cache_source"], fig["cache"]) == (
                rank["rank"], 0, "cpu", "none", None,
            )  # fmt: skip

    # what benchmarks/two_gpu.py reads from this summary keeps working
    from benchmarks import two_gpu

    first = summary["runs"][0]["ranks"][0]
    assert two_gpu.cache_source(first) == "none" and two_gpu._gpu(first) == "cpu"
    for key in ("batches", "per_batch_ms", "first_batch_ms", "loop_s", "wall_start", "wall_first_end", "wall_end"):
        assert key in first
    assert {"steady_samples_per_s", "samples_per_s"} <= set(summary["runs"][0])


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


def test_one_module_served_by_trainers_with_different_settings(trt):
    """The benchmarks serve one compiled module with several Trainers in turn, each its own settings.

    An engine-less TorchTensorRTModule beside the eager net stands for the compiled engine (CPU).
    """
    from lightning.pytorch import Callback, Trainer

    from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimeSettings

    model_mod = _load("example_model", os.path.join(EXAMPLES, "_model.py"))
    model = model_mod.CompiledPredictor("mlp", 2)
    model.engine = torch.nn.Sequential(trt.dynamo.runtime.TorchTensorRTModule(name="engine"))
    engine = model.engine[0]
    prior = engine.runtime_settings
    data = model_mod.SyntheticDataModule("mlp", 2, batches=2)

    class Held(Callback):
        def __init__(self):
            self.seen = []

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.seen.append(engine.runtime_settings.cuda_graph_strategy)

    served = []
    for strategy, graphs in (("disabled", True), ("whole_graph_capture", False), ("disabled", False)):
        settings, held = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=None, print_table=False), Held()
        callbacks = [settings, held] + ([TRTCudaGraphs()] if graphs else [])
        trainer = Trainer(
            accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False,
        )  # fmt: skip
        trainer.predict(model, datamodule=data, return_predictions=False)
        (fig,) = settings.figures
        served.append((held.seen, fig.graphs, fig.engines, fig.batches, settings.session))
        assert engine.runtime_settings is prior  # each run gives the engine back as it found it
    # each Trainer's own settings; the first one's graph scope does not leak into the next
    assert served == [
        (["disabled"] * 2, "engine: not called", 1, 2, None),  # the example's model runs eagerly on CPU
        (["whole_graph_capture"] * 2, "", 1, 2, None),
        (["disabled"] * 2, "", 1, 2, None),
    ]


@pytest.mark.parametrize("timer_first", [True, False])
def test_batch_timer_leaves_end_of_loop_work_out_of_the_loop(timer_first):
    """A callback's on_predict_end (the kernel-cache save) is not loop time, whichever is listed first."""
    import time

    from lightning.pytorch import Callback, Trainer

    model_mod = _load("example_model", os.path.join(EXAMPLES, "_model.py"))

    save_s = 2.0  # far above what 4 small batches take, also on a busy 2-core CI host (0.8 s seen there)

    class SlowSave(Callback):
        def on_predict_end(self, trainer, pl_module):
            time.sleep(save_s)

    timer = model_mod.BatchTimer()
    callbacks = [timer, SlowSave()] if timer_first else [SlowSave(), timer]
    trainer = Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    data = model_mod.SyntheticDataModule("mlp", 2, batches=4)
    trainer.predict(model_mod.CompiledPredictor("mlp", 2), datamodule=data, return_predictions=False)
    assert timer.batches == 4 and timer.samples == 8
    assert 0 < timer.loop_s < save_s and 0 < timer.per_batch_ms < timer.loop_s * 1e3


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


# --- examples/tensor_parallel_predict.py ----------------------------------------------------------


def test_tensor_parallel_example_says_what_it_needs_without_gpus(tmp_path):
    proc = run_script(os.path.join(EXAMPLES, "tensor_parallel_predict.py"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs 2 NVIDIA GPUs and torch-tensorrt-rtx (found 0 GPU(s))" in proc.stdout
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "argv, message",
    [(["--gpus", "1"], "--gpus must be at least 2"), (["--runs", "0"], "--runs and --batches must be positive")],
)
def test_tensor_parallel_example_rejects_bad_arguments(argv, message, capsys):
    tp = _load("example_tensor_parallel", os.path.join(EXAMPLES, "tensor_parallel_predict.py"))
    assert_exits_2(lambda: tp.main(argv), message, capsys)


def test_tensor_parallel_example_uses_only_the_public_api():
    import ast

    with open(os.path.join(EXAMPLES, "tensor_parallel_predict.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    ours = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_trt_rtx"):
            ours.append((node.module, sorted(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            ours += [(a.name, []) for a in node.names if a.name.startswith("lightning_trt_rtx")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert node.value.id != "lightning_trt_rtx", ast.unparse(node)
    assert ours == [("lightning_trt_rtx", ["ServingSession", "TRTSettings"])]


def test_tensor_parallel_table_and_goal_from_rows():
    tp = _load("example_tensor_parallel", os.path.join(EXAMPLES, "tensor_parallel_predict.py"))

    def row(run, rank, first_ms, source):
        return {
            "run": run, "rank": rank, "gpu": f"gpu{rank}", "engines": 1, "native_nccl": [True], "contexts": [1],
            "cache": source, "first_execute_ms": first_ms, "steady_ms": 0.07, "max_abs_error": 3e-4,
            "cache_file": f"/c/gpu-gpu{rank}.bin",
        }  # fmt: skip

    cold = [row(1, 0, 400.0, "cold"), row(1, 1, 500.0, "cold")]
    table = tp.format_table([cold, [row(2, 0, 20.0, "warm"), row(2, 1, 60.0, "warm")]]).splitlines()
    assert table[0].split()[:4] == ["rank", "gpu", "engines", "contexts"]
    assert table[2].split()[:13] == [
        "0", "gpu0", "1", "1/1", "cold", "400.0", "ms", "warm", "20.0", "ms", "0.050", "0.070", "ms",
    ]  # fmt: skip
    assert "0.120" in table[3] and "/c/gpu-gpu1.bin" in table[3]
    met = tp.goal_line([cold, [row(2, 0, 20.0, "warm"), row(2, 1, 40.0, "warm")]])
    assert met.endswith("rank 0 0.050, rank 1 0.080; goal <= 0.10 on every rank: met")
    not_met = tp.goal_line([cold, [row(2, 0, 20.0, "warm"), row(2, 1, 60.0, "warm")]])
    assert not_met.endswith("rank 1 0.120; goal <= 0.10 on every rank: NOT met")
    assert "did not start cold" in tp.goal_line([[row(1, 0, 40.0, "warm"), row(1, 1, 40.0, "cold")], cold])
    assert tp.goal_line([cold]) is None and "-" in tp.format_table([cold]).splitlines()[2].split()


# --- examples/fabric_predict.py -------------------------------------------------------------------


def test_fabric_example_runs_the_same_loop_eagerly_on_two_cpu_processes(tmp_path):
    summary_path, cache_dir = tmp_path / "summary.json", tmp_path / "cache"
    proc = run_script(
        "examples/fabric_predict.py", "--devices", "2", "--runs", "2", "--batches", "3", "--batch-size", "4",
        "--cache-dir", str(cache_dir), "--summary-json", str(summary_path),
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "TensorRT needs an NVIDIA GPU and none is available here: running the same loop eagerly on CPU (2 process(es))."
    ), _explain(proc)
    for run in (1, 2):
        assert f"run {run} (eager, no engines): 2 rank(s), 24 predictions" in lines, _explain(proc)
    for rank in (0, 1):
        assert sum(line.startswith(f"  rank {rank} on cpu: first batch ") for line in lines) == 2, _explain(proc)
    assert lines.count("    TensorRT-RTX serving: 0 engine(s), no kernel cache") == 4, _explain(proc)
    # the session was attached and says it had nothing to serve (rank zero, once per run's process)
    assert "No TensorRT engines found under ConvNet" in proc.stderr
    assert not cache_dir.exists()  # no engines: no cache opened, none written

    summary = json.loads(summary_path.read_text())
    assert [[r["run"] for r in run] for run in summary["runs"]] == [[1, 1], [2, 2]]
    for run in summary["runs"]:
        assert [(r["rank"], r["predictions"], r["compiled"]) for r in run] == [(0, 12, False), (1, 12, False)]
        for r in run:
            fig = r["figures"]
            assert (fig["rank"], fig["engines"], fig["batches"], fig["cache_source"]) == (r["rank"], 0, 3, "none")
            assert fig["first_batch_ms"] == r["first_batch_ms"] > 0 and r["mean_batch_ms"] > 0


def test_fabric_example_one_cpu_process_and_bad_arguments(tmp_path, capsys, messages):
    """One process (no launch), the MLP, in this process: the loop and its report as the script runs them."""
    import lightning as L

    fabric_example = _load("example_fabric", os.path.join(EXAMPLES, "fabric_predict.py"))
    args = fabric_example.parse_args(
        ["--devices", "1", "--runs", "1", "--batches", "2", "--model", "mlp", "--cache-dir", str(tmp_path / "cache")]
    )
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    rows = fabric_example.gather(fabric, fabric_example.run_once(fabric, args, 1, on_gpu=False))
    fabric_example.print_run(rows, None)
    out = capsys.readouterr().out
    assert "run 1 (eager, no engines): 1 rank(s), 16 predictions" in out
    assert [(r["rank"], r["predictions"], r["compiled"], r["figures"]["batches"]) for r in rows] == [(0, 16, False, 2)]
    assert messages.matching("No TensorRT engines found under MLP")
    assert not (tmp_path / "cache").exists()
    assert_exits_2(lambda: fabric_example.main(["--runs", "0"]), "must be positive", capsys)


# --- examples/text_predict.py and examples/_text_model.py -----------------------------------------


def test_text_predict_without_gpu_runs_eagerly_with_the_callback_and_its_prewarm_skips(tmp_path):
    text = _load("example_text_model", os.path.join(EXAMPLES, "_text_model.py"))
    cache_dir = tmp_path / "cache"
    proc = run_script(
        "examples/text_predict.py", "--size", "tiny", "--batches", "4", "--strategy", "eager",
        "--cache-dir", str(cache_dir),
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("TensorRT needs an NVIDIA GPU"), _explain(proc)
    dataset = text.TextBatches(4, 8, text.text_size("tiny").vocab, text.BUCKETS)
    shapes = sorted({length for _, length in dataset.shapes})
    assert set(shapes) <= set(text.BUCKETS)
    width = text.text_size("tiny").width
    expected = (
        f"predictions: 4 batches, 32 texts of width {width}, sequence lengths {shapes},"
        " 0 shape(s) prewarmed (tiny text encoder, eager on cpu)"
    )
    assert expected in lines, _explain(proc)
    # the callback was attached; without engines its prewarm has nothing to compile: it skips and says so once
    assert "No TensorRT engines found under TextPredictor" in proc.stderr
    assert proc.stderr.count("Prewarm skipped: no TensorRT engines under TextPredictor") == 1, _explain(proc)
    assert "TensorRT-RTX prewarm:" not in proc.stderr
    assert not cache_dir.exists()  # no engines: no cache opened, none written



def test_text_predict_unbucketed_prewarms_nothing_and_rejects_bad_arguments(tmp_path, capsys, messages):
    """``--no-buckets`` in this process, through the job the script runs without a GPU."""
    text = _load("example_text_model", os.path.join(EXAMPLES, "_text_model.py"))
    text_predict = _load("example_text_predict", os.path.join(EXAMPLES, "text_predict.py"))
    args = text_predict.parse_args(
        ["--size", "tiny", "--batches", "3", "--no-buckets", "--cache-dir", str(tmp_path / "cache")]
    )
    assert text_predict.run_fallback(args, "eager here") == 0
    out = capsys.readouterr().out
    lengths = sorted({length for _, length in text.TextBatches(3, 8, text.text_size("tiny").vocab, None).shapes})
    assert f"sequence lengths {lengths}, 0 shape(s) prewarmed" in out, out
    assert not [m for m in messages.infos + messages.warnings if "TensorRT-RTX prewarm" in m]
    assert not (tmp_path / "cache").exists()
    assert_exits_2(lambda: text_predict.main(["--batches", "0"]), "must be positive", capsys)


def test_text_model_lengths_buckets_batches_and_pooling():
    text = _load("example_text_model", os.path.join(EXAMPLES, "_text_model.py"))
    lengths = text.sample_lengths(500, seed=0)
    assert lengths == text.sample_lengths(500, seed=0) != text.sample_lengths(500, seed=1)  # seeded
    assert min(lengths) >= 16 and max(lengths) <= 512
    assert 40 <= statistics.median(lengths) <= 100  # long-tailed around a median of 64 tokens
    assert sum(n > 256 for n in lengths) < sum(n <= 64 for n in lengths)
    assert [text.bucket_length(n) for n in (16, 32, 33, 100, 129, 512)] == [32, 32, 64, 128, 256, 512]
    assert text.bucket_length(77, None) == 77

    dataset = text.TextBatches(3, 4, vocab=100, buckets=text.BUCKETS, seed=0)
    own = text.sample_lengths(12, seed=0)
    for i, (ids, real) in enumerate(dataset.items):
        assert real.tolist() == own[i * 4 : (i + 1) * 4]
        assert ids.shape == (4, text.bucket_length(max(real.tolist())))
        for row, n in enumerate(real.tolist()):
            assert (ids[row, :n] > 0).all() and (ids[row, n:] == 0).all()  # 0 pads, nothing else is 0

    model = text.TextPredictor("tiny", batch_size=4)
    ids, real = dataset[0]
    with torch.inference_mode():
        pooled = model.predict_step((ids, real), 0)
        hidden = model.encoder(ids)
    expected = torch.stack([hidden[row, :n].mean(0) for row, n in enumerate(real.tolist())])
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_text_encoder_exports_with_a_dynamic_sequence_and_no_fused_transformer_op():
    """What compile_text_encoder hands torch_tensorrt: one graph for 16..512 tokens, every op a plain one."""
    text = _load("example_text_model", os.path.join(EXAMPLES, "_text_model.py"))
    net = text.build_text_encoder("tiny")
    ids = torch.randint(1, 1000, (8, 128))
    seq = torch.export.Dim("ids_1", min=text.MIN_SEQ, max=text.MAX_SEQ)
    before = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), text.no_mha_fastpath():
        assert not torch.backends.mha.get_fastpath_enabled()
        program = torch.export.export(net, (ids,), dynamic_shapes={"ids": {1: seq}}, strict=False)
    assert torch.backends.mha.get_fastpath_enabled() == before  # restored
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.scaled_dot_product_attention.default" in ops and "aten.embedding.default" in ops
    assert not any("_transformer_encoder_layer_fwd" in op or "_native_multi_head" in op for op in ops), ops
    exported = program.module()
    with torch.inference_mode():
        for n in (text.MIN_SEQ, 77, text.MAX_SEQ):
            x = torch.randint(1, 1000, (8, n))
            torch.testing.assert_close(exported(x), net(x), rtol=1e-4, atol=1e-4)


# --- examples/_model.py: the phase runner --------------------------------------------------------


def test_run_phases_runs_each_phase_in_a_fresh_process_and_stops_at_a_failure(tmp_path, capsys):
    model = _load("_model", os.path.join(EXAMPLES, "_model.py"))
    script = tmp_path / "phase.py"
    script.write_text(
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        "name, result = args[args.index('--_phase') + 1], args[args.index('--_result') + 1]\n"
        "if name == 'bad':\n"
        "    print('it broke'); sys.exit(3)\n"
        "json.dump({'phase': name, 'args': args[:2], 'pid': os.getpid(), 'local_rank': os.environ.get('LOCAL_RANK')},"
        " open(result, 'w'))\n"
    )
    os.environ["LOCAL_RANK"] = "5"  # a phase is a fresh Lightning job: it must not inherit a rank
    try:
        results = model.run_phases(str(script), [("cold", "c", ["--x", "1"]), ("warm", "w", ["--x", "2"])],
                                   str(tmp_path), verbose=False)  # fmt: skip
        assert [r["phase"] for r in results] == ["cold", "warm"] and results[1]["args"] == ["--x", "2"]
        assert results[0]["pid"] != results[1]["pid"] != os.getpid() and results[0]["local_rank"] is None
        code = model.run_phases(str(script), [("bad", "b", []), ("never", "n", [])], str(tmp_path), verbose=False)
    finally:
        del os.environ["LOCAL_RANK"]
    assert code == 3
    err = capsys.readouterr().err
    assert "it broke" in err and "error: the bad run failed (exit code 3)." in err
    assert not (tmp_path / "never.json").exists()
