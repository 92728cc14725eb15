"""The benchmark runner (``benchmarks/``) on CPU, in three parts:

- its arithmetic on recorded figures: each ``measure`` is fed the task results a real GPU run recorded
  (``benchmarks/results/*/results.json``) through a runner that answers in the order it asks, and must give
  back the rows that run wrote;
- its plumbing in a dry run (``LIGHTNING_TRT_RTX_BENCH_DRY_RUN=1``: eager CPU models, no engines), through
  ``run.main`` with every task run in this process (nothing of a dry run's figures crosses a process);
- the process boundary itself, once: a task in a fresh process, a failed one, and the runner's exit
  status without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
from unittest import mock

import pytest

from benchmarks import dynamic_shapes, graphs, harness, loop, overhead, real_models, run, two_gpu, warm_start
from benchmarks import serving_efficiency as efficiency
from tests import helpers

RESULTS = os.path.join(helpers.ROOT, "benchmarks", "results")


def recorded(name: str) -> tuple[dict, dict[str, dict]]:
    """A recorded run's results.json and its rows by key."""
    with open(os.path.join(RESULTS, name, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    return results, {row["key"]: row for row in results["measurements"]}


class Replay:
    """A ``harness.Runner`` whose tasks and scripts answer with recorded results, in the order they are asked for."""

    def __init__(self, tmp_path, answers: list[dict]) -> None:
        self.out, self.work, self.verbose = str(tmp_path), str(tmp_path / "work"), False
        self.answers = list(answers)
        self.asked: list[tuple[str, dict]] = []

    def task(self, name: str, spec: dict, env: dict | None = None) -> dict:
        self.asked.append((name, spec))
        return self.answers.pop(0)

    def script(self, name: str, command: list[str], result_path: str, env: dict | None = None) -> dict:
        self.asked.append((name, {"command": command, "env": env}))
        return self.answers.pop(0)


# --- the arithmetic, on recorded figures -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["overhead-1gpu", "overhead-two-gpu"])
def test_overhead_rows_from_recorded_repetitions(tmp_path, name):
    results, rows = recorded(name)
    want = rows["integration_overhead"]
    runner = Replay(tmp_path, [{"reps": want["details"]["per_batch_ms"]}])
    got = overhead.measure(runner, results["config"])
    assert got == {k: want[k] for k in got}  # value, display, pair and every detail, to the last digit
    (task, spec), reps = runner.asked[0], results["config"]["reps"]
    assert task == "overhead" and (spec["reps"], spec["batches"]) == (2 * reps, 2 * results["config"]["batches"])
    pairs = want["details"]["paired_pct_callback_vs_manual"]
    assert want["value"] == pytest.approx(statistics.median(pairs))


def test_loop_and_warm_start_rows_from_recorded_repetitions(tmp_path):
    results, rows = recorded(".")
    cfg = results["config"]
    want = rows["lightning_vs_loop"]
    got = loop.measure(Replay(tmp_path, [{"reps": want["details"]["per_batch_ms"], "profile": "p"}]), cfg, True)
    assert (got["value"], got["display"], got["pair"]) == (want["value"], want["display"], want["pair"])
    reps = want["details"]["per_batch_ms"]
    assert got["value"] == statistics.median(reps["lightning"]) / statistics.median(reps["loop"])

    want = rows["warm_start"]
    d = want["details"]
    answers = []
    for cold, warm in zip(d["cold_first_batch_ms"], d["warm_first_batch_ms"]):
        common = {"engines": d["engines"], "load_program_s": d["program_load_s"]}
        answers.append({"first_batch_ms": cold, "cache_source": "cold", "cache_bytes": 0, **common})
        answers.append({"first_batch_ms": warm, "cache_source": d["warm_cache_source"][0],
                        "cache_bytes": d["cache_bytes"], **common})
    runner = Replay(tmp_path, answers)
    got = warm_start.measure(runner, cfg, driver_jit_cache=False)
    assert got == {k: want[k] for k in got}
    # a cold process then a warm one per repetition, the driver's JIT cache off in each
    assert [spec["cold"] for _, spec in runner.asked] == [True, False] * cfg["first_batch_reps"]


def test_graphs_rows_from_recorded_repetitions(tmp_path):
    results, rows = recorded("graphs-h200")
    table = rows["graphs_never_slower"]["details"]
    answers = []
    for i, model in enumerate(table.values()):
        per_rep = dict(model["per_rep_ms"])
        # recorded before the "-kept" and "auto" variants existed: each "-kept" stands in as its dropped twin
        # (same ratios), "auto" as "stable" (what it kept there); the wrapper's cost is made up per model
        per_rep.update({f"{v}-kept": per_rep[v] for v in ("default", "upstream", "stable")})
        per_rep.update({"auto": per_rep["stable"], "auto-kept": per_rep["stable"], "auto-first": per_rep["stable"]})
        # call-site graphs, recorded later: slower stand-ins here, so the rows recorded then stay what they were
        per_rep.update({v: [2 * t for t in per_rep["stable"]] for v in ("site", "site-kept")})
        answers.append({"per_batch_ms": per_rep, "capture": model["capture"],
                        "auto": {"auto": [], "auto-kept": [], "auto-first": []},
                        "bare_ms": {**model["bare_ms"], "whole_graph_capture_held": model["bare_ms"]["disabled"]},
                        "wrapper_us": {"engine_us": 1.0, "wrapped_us": 2.0 + i, "overhead_us": 1.0 + i},
                        "compile_s": model["compile_s"]})  # fmt: skip
    runner = Replay(tmp_path, answers)
    with mock.patch.object(graphs, "_models", lambda: list(table)):  # resnet18 too, without torchvision here
        got = {row["key"]: row for row in graphs.measure(runner, results["config"])}
    assert [spec["model"] for _, spec in runner.asked] == list(table)
    # the rows recorded then come out the same; the old "never slower" (slowest repetition) is a row of its own now
    assert (got["graphs"]["value"], got["graphs"]["display"]) == (rows["graphs"]["value"], rows["graphs"]["display"])
    assert got["graphs_vs_bare"]["value"] == rows["graphs_vs_bare"]["value"]
    assert got["graphs_never_slower_any_repetition"]["value"] == rows["graphs_never_slower"]["value"]
    assert got["graphs_never_slower"]["value"] == min(model["speedup"] for model in table.values())
    assert got["graphs_addresses_overhead"]["value"] == len(table)  # the worst model's process
    for name, model in table.items():
        mine = got["graphs_never_slower"]["details"][name]
        for figure in ("median_ms", "spread_ms", "speedup", "upstream_speedup", "stable_minus_empty_over_bare_graphs"):
            recorded_figure = model[figure]
            if isinstance(recorded_figure, dict):
                ours = {k: v for k, v in mine[figure].items() if k in recorded_figure}  # the stand-ins aside
                assert ours == recorded_figure, (name, figure)
            else:
                assert mine[figure] == recorded_figure, (name, figure)
        assert mine["auto_speedup"] == mine["auto_kept_speedup"] == mine["auto_first_speedup"] == model["speedup"]
        assert f"{name} {model['speedup']:.2f}x / {model['speedup']:.2f}x" in got["graphs_never_slower"]["display"]


def test_real_model_rows_from_recorded_processes(tmp_path):
    results, rows = recorded("real-models-h200")
    cfg = results["config"]
    assert cfg["real_reps"] == 1
    for name in real_models.MODELS:
        want = rows[f"real_{name}"]
        d = want["details"]
        prep = {"compile_s": d["compile_s"], "program_bytes": d["program_bytes"],
                "max_abs_diff": d["max_abs_diff_vs_eager"]}  # fmt: skip

        def served(phase: str, d: dict = d) -> dict:
            return {
                "first_batch_ms": d["first_batch_ms"][phase][0],
                "times_ms": d["first_20_batches_ms"][phase],
                "steady": {"until_ms": d["until_steady_ms"][phase][0], "index": d["steady_index"][phase][0],
                           "final_median_ms": d["final_median_ms"][phase][0], "steady": d["steady_reached"]},
                "batches": d["batches_per_run"][phase][0],
                "cache_file_bytes": d["cache_file_bytes"],
                "saved_bytes": d["saved_bytes"][phase][0],
                "cache_source": "cold" if phase == "cold" else d["warm_cache_source"][0],
                "engines": d["engines"],
                "load_program_s": d["program_load_s"],
            }  # fmt: skip

        steady = {"per_batch_ms": d["per_batch_ms_per_rep"], "bare_ms": d["bare_engine_ms"]}
        runner = Replay(tmp_path, [prep, served("cold"), served("warm"), steady])
        got = real_models._measure_model(runner, cfg, name)
        assert got == {k: want[k] for k in got}, name
        assert [task for task, _ in runner.asked] == ["real-prep", "real-serve", "real-serve", "real-steady"]
        assert [spec.get("cold") for _, spec in runner.asked] == [None, True, False, None]
        assert got["value"] == d["first_batch_ms"]["warm"][0] / d["first_batch_ms"]["cold"][0]


def test_dynamic_shapes_rows_and_pick_from_recorded_streams(tmp_path):
    from _text_model import bucket_length

    results, rows = recorded("dynamic-shapes-h200")
    detail = rows["dynamic_shapes"]["details"]
    cfg = dict(results["config"], dynamic_strategies=["lazy", "eager", "none"])  # recorded over two runs, merged
    answers = [{"compile_s": detail["compile_s"]}]
    for name, case in detail["cases"].items():
        bucketed = name.endswith(", bucketed")
        lengths = [bucket_length(n) if bucketed else n for n in detail["lengths"]]
        for phase in ("cold", "warm"):
            figures, raw = case[phase], detail["raw_ms"][name][phase]
            answers.append({
                "lengths": lengths,
                "stream_ms": raw["stream_ms"],
                "steady_lengths": sorted(set(lengths)) * detail["steady_rounds"],
                "steady_pass_ms": raw["steady_pass_ms"],
                "first_batch_ms": figures["first_batch_ms"],
                "cache_source": figures["cache_source"],
                "cache_bytes": figures["cache_loaded_bytes"],
                "saved_bytes": figures["cache_saved_bytes"],
                "cache_file_bytes": figures["cache_file_bytes"],
                "engines": figures["engines"],
            })  # fmt: skip
    runner = Replay(tmp_path, answers)
    got = dynamic_shapes.measure(runner, cfg)
    # the seeded stream of lengths is the recorded one, and every case's figures come out as recorded
    assert runner.asked[1][1]["lengths"] == detail["lengths"]
    assert [(s["strategy"], s["bucketed"], s["cold"]) for _, s in runner.asked[1:]] == [
        (strategy, bucketed, cold) for strategy in cfg["dynamic_strategies"] for bucketed in (False, True)
        for cold in (True, False)
    ]  # fmt: skip
    assert [row["key"] for row in got] == ["dynamic_shapes", "dynamic_shapes_cases"]
    for mine, want in zip(got, [rows["dynamic_shapes"], rows["dynamic_shapes_cases"]]):
        assert mine == {k: want[k] for k in mine}, want["key"]


def test_two_gpu_rows_from_recorded_runs(tmp_path):
    results, rows = recorded("two-gpu-swapped-h200")
    throughput, warm, swapped = rows["two_gpu_throughput"], rows["two_gpu_warm_start"], rows[two_gpu.SWAPPED_KEY]
    # the steady throughputs as displayed (rounded to samples/s); every other figure as recorded
    two_steady, one_steady = (float(x) for x in throughput["display"].split("(")[1].split(" samples")[0].split(" vs "))
    gpus = warm["details"]["gpu_per_rank"]

    def rank(r: dict, first_ms: float, source: str, gpu: str) -> dict:
        return {**r, "first_batch_ms": first_ms, "figures": {"cache_source": source, "gpu": gpu}}

    cold_run = {"ranks": [rank({}, ms, "cold", g) for ms, g in zip(warm["details"]["cold_first_batch_ms"], gpus)]}
    warm_ranks = [rank(r, ms, s, g) for r, ms, s, g in zip(throughput["details"]["ranks_2_gpus"],
                  warm["details"]["warm_first_batch_ms"], warm["details"]["warm_cache_source"], gpus)]  # fmt: skip
    samples = throughput["details"]["samples_per_s_including_first_batch"]
    two = {"runs": [cold_run, {"ranks": warm_ranks, "steady_samples_per_s": two_steady, "samples_per_s": samples[1]}]}
    one_ranks = [rank(r, r["first_batch_ms"], "warm", gpus[0]) for r in throughput["details"]["ranks_1_gpu"]]
    one = {"runs": [{"ranks": one_ranks, "steady_samples_per_s": one_steady, "samples_per_s": samples[0]}]}
    s = swapped["details"]
    swapped_ranks = [
        rank({"per_batch_ms": per}, ms, source, g)
        for per, ms, source, g in zip(s["swapped_per_batch_ms"], s["swapped_first_batch_ms"], s["swapped_cache_source"],
                                      s["gpu_per_rank"]["swapped"])
    ]  # fmt: skip
    runner = Replay(tmp_path, [two, one, {"runs": [{"ranks": swapped_ranks}, {"ranks": swapped_ranks}]}])
    with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": "0,1"}):
        got = {row["key"]: row for row in two_gpu.measure(runner, results["config"])}
    envs = [spec["env"]["CUDA_VISIBLE_DEVICES"] for _, spec in runner.asked]
    assert [name for name, _ in runner.asked] == ["distributed-2", "distributed-1", "distributed-2-swapped"]
    assert envs == ["0,1", "0,1", "1,0"] and "--clear-cache" in runner.asked[0][1]["command"]
    assert got["two_gpu_throughput"]["value"] == pytest.approx(throughput["value"], rel=1e-4)
    assert got["two_gpu_throughput"]["display"] == throughput["display"]
    assert {k: got["two_gpu_throughput"]["details"][k] for k in throughput["details"]} == throughput["details"]
    for want in (warm, swapped):
        mine = got[want["key"]]
        assert (mine["value"], mine["display"]) == (want["value"], want["display"]), want["key"]
        assert {k: mine["details"][k] for k in want["details"]} == want["details"], want["key"]


def test_steady_point_definition():
    # only the first batch is slow: steady from batch 1, after it
    assert harness.steady_point([100.0] + [5.0] * 20)["index"] == 1
    # a cold run: slow for 11 batches after the first (lazy specialization), then fast
    cold = harness.steady_point([100.0] + [15.0] * 11 + [5.0] * 40)
    assert (cold["index"], cold["until_ms"], cold["final_median_ms"], cold["steady"]) == (12, 265.0, 5.0, True)
    # one late hiccup moves no rolling median
    assert harness.steady_point([100.0] + [5.0] * 20 + [50.0] + [5.0] * 20)["index"] == 1
    # a burst of slow batches in the second half (another process on the host) is steady state, not a late start
    assert harness.steady_point([100.0] + [5.0] * 60 + [9.0] * 4 + [5.0] * 5)["index"] == 1
    # the same burst in the first half still counts: the run settles after it
    assert harness.steady_point([100.0] + [5.0] * 5 + [9.0] * 4 + [5.0] * 60)["index"] == 10
    # a run still slow past its middle: one fast batch there is not the steady point
    slow = [100.0] * 70 + [5.0] * 30
    slow[52] = 5.0
    assert harness.steady_point(slow)["index"] == 70
    # within 1.2x counts as steady; above it does not
    assert harness.steady_point([5.9] * 3 + [5.0] * 20)["index"] == 0
    assert harness.steady_point([6.1] * 3 + [5.0] * 20)["index"] == 3
    assert harness.steady_point([])["steady"] is False


def test_dynamic_shapes_pick_follows_the_numbers():
    def case(cold, warm):
        return {"cold": {"stream_wall_ms": cold}, "warm": {"stream_wall_ms": warm}}

    cases = {"lazy, unbucketed": case(900, 300), "eager, bucketed": case(2000, 200), "none, bucketed": case(500, 205)}
    choice = dynamic_shapes.pick(cases)
    # within 5% of the best warm time, the cheaper cold start wins; the first-run pick is the least cold time
    assert (choice["pick"], choice["first_run_pick"]) == ("none, bucketed", "none, bucketed")
    assert sorted(choice["near_best_warm"]) == ["eager, bucketed", "none, bucketed"]
    cases["none, bucketed"] = case(500, 260)
    assert dynamic_shapes.pick(cases)["pick"] == "eager, bucketed"


def test_write_results_tables_goals_and_gpu_name(tmp_path):

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
            {"key": k, "measurement": f"m-{k}", "value": v, "display": None if v is None else f"{v}",
             "details": {"x": 1}}
            for k, v, _ in rows
        ],
    }
    results["measurements"][0]["pair"] = {"labels": ["cold", "warm"], "values": [400.0, 32.0], "unit": "ms"}
    written = harness.write_results(results, str(tmp_path))
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


# --- the plumbing: a dry run, every task in this process ---------------------------------------------------


@pytest.fixture
def dry_run_in_process(monkeypatch):
    """Dry-run mode, with ``Runner.task`` running each task here instead of in a fresh process; the result
    makes the same JSON round trip the real runner's file gives it. Yields the names of the tasks run."""
    monkeypatch.setenv(harness.DRY_RUN_ENV, "1")
    ran: list[str] = []

    def task(self: harness.Runner, name: str, spec: dict, env: dict | None = None) -> dict:
        self.count += 1
        ran.append(name)
        with mock.patch.dict(os.environ, env or {}):
            result = run.TASKS[name](json.loads(json.dumps(spec)))
        return json.loads(json.dumps(result, default=str))

    monkeypatch.setattr(harness.Runner, "task", task)
    return ran


def test_benchmark_plumbing_dry_run_on_cpu(tmp_path, dry_run_in_process):
    """The runner's tasks, medians and outputs, with eager CPU models (test-only mode)."""
    out = tmp_path / "results"
    assert run.main(["--out", str(out), "--reps", "1", "--batches", "3", "--only", "loop", "overhead"]) == 0
    assert dry_run_in_process == ["prep", "overhead", "loop"]
    results = json.loads((out / "results.json").read_text())
    assert results["gpu"].startswith("cpu (DRY RUN")
    overhead_row, row = results["measurements"]
    # overhead: three variants, twice the repetitions, the figure a median of back-to-back pairs
    assert overhead_row["key"] == "integration_overhead" and overhead_row["goal"] == "<= 2%"
    runs = overhead_row["details"]["per_batch_ms"]
    assert sorted(runs) == ["callback", "core", "manual"] and all(len(v) == 2 for v in runs.values())
    pairs = [(c / m - 1) * 100 for c, m in zip(runs["callback"], runs["manual"])]
    assert overhead_row["details"]["paired_pct_callback_vs_manual"] == pytest.approx(pairs)
    assert overhead_row["value"] == pytest.approx(statistics.median(pairs))
    assert f"in {sum(p > 0 for p in pairs)} of 2 pairs" in overhead_row["display"]
    assert row["key"] == "lightning_vs_loop" and row["goal"] == "<= 1.2x"
    reps = row["details"]["per_batch_ms"]
    assert len(reps["lightning"]) == 1 and len(reps["loop"]) == 1
    assert math.isclose(row["value"], reps["lightning"][0] / reps["loop"][0])
    assert row["met"] == (row["value"] <= 1.2)
    assert (out / "lightning_profile.txt").read_text().startswith("cProfile of one Trainer.predict over 3 batches")
    assert "DRY RUN" in (out / "results.md").read_text()
    assert (out / "work" / ".gitignore").read_text() == "*\n"


def test_graphs_benchmark_dry_run_reports_every_variant_and_both_goals(tmp_path, dry_run_in_process):
    out = tmp_path / "results"
    # one model (every model's own task is the same code; each model builds and runs: the test below)
    argv = ["--out", str(out), "--reps", "1", "--batches", "3", "--only", "graphs", "--models", "mlp-deep"]
    assert run.main(argv) == 0
    rows = {row["key"]: row for row in json.loads((out / "results.json").read_text())["measurements"]}
    assert set(rows) == {"graphs", "graphs_never_slower", "graphs_vs_bare", "graphs_never_slower_any_repetition",
                         "graphs_auto_vs_best", "graphs_auto_first_loop", "graphs_addresses_overhead",
                         "graphs_host_noise"}  # fmt: skip
    table = rows["graphs_never_slower"]["details"]
    assert list(table) == ["mlp-deep"] and dry_run_in_process == ["prep", "graphs"]
    ratios: list[float] = []
    medians: list[float] = []
    for model in table.values():
        per_rep = model["per_rep_ms"]
        assert set(per_rep) == {"default", "upstream", "stable", "site", "auto", "empty", "auto-first"} | {
            f"{v}-kept" for v in ("default", "upstream", "stable", "site", "auto")
        }
        assert all(len(v) == 1 and all(ms > 0 for ms in v) for v in per_rep.values())  # warm-up round left out
        assert model["median_ms"]["stable"] == pytest.approx(statistics.median(per_rep["stable"]))
        assert model["spread_ms"]["default"] == [min(per_rep["default"]), max(per_rep["default"])]
        # the figures of both whole-graph variants are reported; eager on CPU, there is nothing to hold
        assert model["capture"] == {v: "" for v in ("upstream", "stable", "site", "auto", "auto-first", "upstream-kept",
                                                    "stable-kept", "site-kept", "auto-kept")}  # fmt: skip
        # auto says what it kept (nothing to try without engines), each repetition
        assert model["auto"] == model["auto_first"] == ["disabled (not tried: no TensorRT-RTX engines to time)"]
        median = model["median_ms"]
        assert model["auto_first_speedup"] == pytest.approx(median["default"] / median["auto-first"])
        for kept in ("", "-kept"):  # never slower: predictions dropped and kept
            ratios += [d / a for d, a in zip(per_rep["default" + kept], per_rep["auto" + kept])]
        median = model["median_ms"]
        assert model["kept_speedup"] == pytest.approx(median["default-kept"] / median["stable-kept"])
        medians.append(median["default"] / median["auto"])
        best = min(median[v] for v in ("default", "site", "upstream", "stable"))
        assert model["auto_of_best"] == pytest.approx(best / median["auto"])
        assert model["wrapper_us"]["overhead_us"] == pytest.approx(
            model["wrapper_us"]["wrapped_us"] - model["wrapper_us"]["engine_us"]
        )
        over = (model["median_ms"]["stable"] - model["median_ms"]["empty"]) / model["bare_ms"]["whole_graph_capture"]
        assert model["stable_minus_empty_over_bare_graphs"] == pytest.approx(over)
    assert rows["graphs_never_slower_any_repetition"]["value"] == pytest.approx(min(ratios))
    assert rows["graphs_never_slower_any_repetition"]["met"] == (min(ratios) >= 0.95)
    kept_medians = [m["auto_kept_speedup"] for m in table.values()]
    assert rows["graphs_never_slower"]["value"] == pytest.approx(min(medians + kept_medians))
    first = min(m["auto_first_speedup"] for m in table.values())
    assert rows["graphs_auto_first_loop"]["value"] == pytest.approx(first)
    assert rows["graphs_auto_first_loop"]["goal"] == ">= 1.0x (median, every model)"
    assert rows["graphs_addresses_overhead"]["goal"] == "<= 5 us per call"
    assert rows["graphs_vs_bare"]["goal"] == "<= 1.25x"
    # the host's noise: the empty loop's and the default's slowest over fastest repetition, worst model; no goal
    noise = {v: max(m["per_rep_ms"][v]) / min(m["per_rep_ms"][v]) for m in table.values() for v in ("empty", "default")}
    assert rows["graphs_host_noise"]["value"] == pytest.approx(max(noise.values()))
    assert rows["graphs_host_noise"]["goal"] == "" and rows["graphs_host_noise"]["met"] is None


def test_graphs_host_noise_is_each_fixed_loops_slowest_over_fastest_repetition():
    """Recorded timings: the default's repetitions 1.0, 1.5, 1.2 ms (1.5x apart), the empty loop's 0.2, 0.5, 0.25
    (2.5x): the row shows both per model and the worst of all."""
    per_rep = {v: [1.0, 1.0, 1.0] for v in graphs.VARIANTS}
    per_rep["default"], per_rep["empty"] = [1.0, 1.5, 1.2], [0.2, 0.5, 0.25]
    result = {"per_batch_ms": per_rep, "bare_ms": {"whole_graph_capture": 0.1}, "auto": {v: [] for v in graphs.AUTO},
              "wrapper_us": {}, "capture": {}, "compile_s": 0.0}  # fmt: skip
    summary = graphs._summary(result)
    assert summary["host_noise"] == {"empty": pytest.approx(2.5), "default": pytest.approx(1.5)}


def test_every_graphs_model_builds_and_serves_on_cpu():
    """What the dry run's other models would add: each of the graphs step's models (resnet18 where torchvision
    is installed) is built, wrapped in the benchmarks' LightningModule and predicts a batch of its shape."""
    import torch
    from _model import CompiledPredictor, SyntheticDataModule

    vision = importlib.util.find_spec("torchvision") is not None
    assert graphs._models() == [m for m in graphs.MODELS if vision or (m != "resnet18" and m not in graphs.LOADED)]
    # the loaded programs are the serving-efficiency step's (built and served on CPU in its own dry run)
    assert set(graphs.LOADED) <= set(efficiency.MODELS)
    assert all(efficiency.MODELS[m][2] == "loaded" for m in graphs.LOADED)
    for name in (m for m in graphs._models() if m not in graphs.LOADED):
        data = SyntheticDataModule(name, 2, 1)
        model = CompiledPredictor(name, 2)
        with torch.inference_mode():
            (batch,) = list(data.predict_dataloader())
            out = model.predict_step(batch, 0)
        assert out.shape[0] == 2 and torch.isfinite(out.float()).all(), name


def test_real_models_and_dynamic_shapes_plumbing_dry_run_on_cpu(tmp_path, dry_run_in_process):
    """Both benchmarks' tasks and rows, with eager CPU models (test-only mode)."""
    import importlib.util

    from _text_model import bucket_length, sample_lengths

    out = tmp_path / "results"
    argv = ["--out", str(out), "--reps", "1", "--batches", "3", "--only", "real_models", "dynamic_shapes",
            "--stream-batches", "4", "--dynamic-strategies", "none"]  # fmt: skip
    assert run.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["gpu"].startswith("cpu (DRY RUN")
    rows = {row["key"]: row for row in results["measurements"]}
    with_torchvision = importlib.util.find_spec("torchvision") is not None
    real = ["real_resnet50-b1", "real_resnet50-b32", "real_vit-b16-b8"] if with_torchvision else []
    assert list(rows) == [*real, "real_bert-b8", "dynamic_shapes", "dynamic_shapes_cases"]
    per_model = ["real-prep", "real-serve", "real-serve", "real-steady"]
    assert dry_run_in_process == ["prep"] + per_model * (len(real) + 1) + ["real-prep"] + ["dynamic-shapes"] * 4

    bert = rows["real_bert-b8"]
    d = bert["details"]
    assert len(d["first_batch_ms"]["cold"]) == len(d["first_batch_ms"]["warm"]) == 1
    cold_first, warm_first = d["first_batch_ms"]["cold"][0], d["first_batch_ms"]["warm"][0]
    assert bert["value"] == pytest.approx(warm_first / cold_first)
    assert sorted(d["per_batch_ms"]) == ["default", "eager", "graphs"]
    assert all(len(v) == 1 and v[0] > 0 for v in d["per_batch_ms_per_rep"].values())  # warm-up round left out
    assert sorted(d["bare_engine_ms"]) == ["disabled", "whole_graph_capture"]
    for phase in ("cold", "warm"):
        times = d["first_20_batches_ms"][phase]
        assert len(times) == d["batches_per_run"][phase][0] >= 3
        point = harness.steady_point(times)
        assert d["steady_index"][phase] == [point["index"]]
        assert d["until_steady_ms"][phase] == [pytest.approx(point["until_ms"])]

    cases = rows["dynamic_shapes_cases"]["details"]
    assert list(cases) == ["none, unbucketed", "none, bucketed"]  # the strategies asked for (three: the replay)
    lengths = sample_lengths(4, seed=0)
    detail = rows["dynamic_shapes"]["details"]
    assert detail["lengths"] == lengths and detail["pick"] in cases and detail["first_run_pick"] in cases
    for name, case in detail["cases"].items():
        shapes = {bucket_length(n) for n in lengths} if "unbucketed" not in name else set(lengths)
        for phase in ("cold", "warm"):
            figures, raw = case[phase], detail["raw_ms"][name][phase]
            assert figures["new_shapes"] == len(shapes) and {int(n) for n in figures["steady_ms"]} == shapes
            assert len(raw["stream_ms"]) == 4 and len(raw["steady_pass_ms"]) == len(shapes) * detail["steady_rounds"]
            assert figures["stream_wall_ms"] == pytest.approx(sum(raw["stream_ms"]))
    warm = {name: case["warm"]["stream_wall_ms"] for name, case in detail["cases"].items()}
    assert warm[detail["pick"]] <= min(warm.values()) * 1.05
    # the baseline is "lazy, unbucketed" when measured, else the first case
    assert rows["dynamic_shapes"]["value"] == pytest.approx(warm[detail["pick"]] / warm["none, unbucketed"])


# --- the process boundary ----------------------------------------------------------------------------------


def test_a_task_runs_in_a_fresh_process_and_a_failed_one_says_why(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv(harness.DRY_RUN_ENV, "1")
    runner = harness.Runner(str(tmp_path / "out"))
    prep = runner.task("prep", {"program": str(tmp_path / "conv.ep"), "batch_size": 4})
    assert (prep["capability"], prep["gpus"]) == ("cpu", 0) and prep["versions"]["torch"] == torch.__version__
    assert json.loads((tmp_path / "out" / "work" / "01-prep.json").read_text()) == prep  # read back from its file
    with pytest.raises(RuntimeError, match=r"(?s)no-such-task failed \(exit 2\).*invalid choice"):
        runner.task("no-such-task", {})
    assert os.path.isfile(tmp_path / "out" / "work" / "logs" / "02-no-such-task.log")


def test_benchmarks_without_gpu_exit_2_and_measure_nothing(tmp_path):
    out = tmp_path / "results"
    proc = helpers.run_script("benchmarks/run.py", "--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, helpers.explain(proc)
    assert "needs an NVIDIA GPU" in proc.stderr and "nothing was measured" in proc.stderr
    assert not out.exists()


def test_serving_efficiency_rows_from_recorded_processes(tmp_path, monkeypatch):
    from benchmarks import serving_efficiency

    results, rows = recorded("serving-efficiency-h200")
    raws = {r["details"]["raw"]["model"]: r["details"]["raw"] for r in results["measurements"] if r.get("details")}
    assert sorted(raws) == sorted(serving_efficiency.MODELS)
    monkeypatch.setattr(serving_efficiency, "available_models", lambda: list(serving_efficiency.MODELS))
    replay = Replay(tmp_path, [raws[name] for name in serving_efficiency.MODELS])
    got = serving_efficiency.measure(replay, {"batches": 200})
    assert [spec["model"] for _, spec in replay.asked] == list(serving_efficiency.MODELS)
    assert {row["key"] for row in got} == set(rows)
    for row in got:
        want = rows[row["key"]]
        assert row["value"] == pytest.approx(want["value"]) and row["display"] == want["display"]
    vit = next(row for row in got if row["key"] == "serving_efficiency_vit-b16-b8")
    raw = raws["vit-b16-b8"]
    # the headline: the bare engine's faster strategy over the CPU source's fastest strategy
    assert vit["value"] == pytest.approx(
        min(raw["bare_ms"].values()) / min(r["per_batch_ms"] for r in raw["sources"]["cpu"].values())
    )
    assert harness.goal_met(vit["key"], vit["value"]) is True
    assert harness.goal_key("serving_efficiency_host_bert-b8") == "serving_efficiency_host"


def test_serving_efficiency_dry_run_on_cpu(tmp_path, dry_run_in_process):
    out = tmp_path / "results"
    argv = ["--out", str(out), "--batches", "3", "--only", "serving_efficiency", "--models", "mlp-b8"]
    assert run.main(argv) == 0
    assert dry_run_in_process == ["prep", "serving-efficiency"]
    rows = {row["key"]: row for row in json.loads((out / "results.json").read_text())["measurements"]}
    assert set(rows) == {"serving_efficiency_mlp-b8", "serving_efficiency_host_mlp-b8", "serving_efficiency_mlp_cost"}
    raw = rows["serving_efficiency_mlp-b8"]["details"]["raw"]
    from benchmarks import serving_efficiency

    assert set(raw["sources"]) == set(serving_efficiency.SOURCES)
    assert set(raw["sources"]["cpu"]) == {*serving_efficiency.STRATEGIES, "auto"}
    assert set(raw["predictions"]) == set(serving_efficiency.PREDICTIONS)
    assert raw["sources"]["cpu-off"]["disabled"]["uploads"] == "off: upload_ahead=False"
    assert raw["sources"]["cpu"]["disabled"]["uploads"] == "off: the loop runs on cpu"
