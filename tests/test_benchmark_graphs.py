"""The whole-graph-capture benchmark's plumbing on CPU (test-only dry run: eager models, no engines)."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks.graphs import VARIANTS
from tests.test_examples import _explain, run_script


def test_graphs_benchmark_dry_run_reports_every_variant_and_both_goals(tmp_path):
    out = tmp_path / "results"
    proc = run_script(
        "benchmarks/run.py", "--out", str(out), "--reps", "2", "--batches", "3", "--only", "graphs",
        env={"LIGHTNING_TRT_RTX_BENCH_DRY_RUN": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, _explain(proc)
    rows = {row["key"]: row for row in json.loads((out / "results.json").read_text())["measurements"]}
    assert set(rows) == {"graphs", "graphs_never_slower", "graphs_vs_bare", "graphs_never_slower_any_repetition",
                         "graphs_auto_vs_best", "graphs_addresses_overhead"}  # fmt: skip
    table = rows["graphs_never_slower"]["details"]
    assert {"mlp", "mlp-deep", "encoder"} <= set(table)  # resnet18 too where torchvision is installed
    ratios: list[float] = []
    medians: list[float] = []
    for model in table.values():
        per_rep = model["per_rep_ms"]
        assert set(per_rep) == {"default", "upstream", "stable", "auto", "empty"} | {
            f"{v}-kept" for v in VARIANTS[:4]
        }
        assert all(len(v) == 2 and all(ms > 0 for ms in v) for v in per_rep.values())  # warm-up round left out
        assert model["median_ms"]["stable"] == pytest.approx(statistics.median(per_rep["stable"]))
        assert model["spread_ms"]["default"] == [min(per_rep["default"]), max(per_rep["default"])]
        # the figures of both whole-graph variants are reported; eager on CPU, there is nothing to hold
        assert model["capture"] == {v: "" for v in ("upstream", "stable", "auto", "upstream-kept", "stable-kept",
                                                    "auto-kept")}  # fmt: skip
        # auto says what it kept (nothing to try without engines), each repetition
        assert model["auto"] == ["disabled (not tried: no TensorRT-RTX engines to time)"] * 2
        for kept in ("", "-kept"):  # never slower: predictions dropped and kept
            ratios += [d / a for d, a in zip(per_rep["default" + kept], per_rep["auto" + kept])]
        median = model["median_ms"]
        assert model["kept_speedup"] == pytest.approx(median["default-kept"] / median["stable-kept"])
        medians.append(median["default"] / median["auto"])
        best = min(median[v] for v in ("default", "upstream", "stable"))
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
    assert rows["graphs_addresses_overhead"]["goal"] == "<= 5 us per call"
    assert rows["graphs_vs_bare"]["goal"] == "<= 1.25x"
