"""A real two-process CPU DDP predict (gloo): Lightning launches rank 1 by re-running the worker script.

The worker (``tests/procs/lightning_ddp.py``) writes one JSON per rank; see its docstring. Both ranks
run on the CPU (GPU "cpu"), or with ``fake_gpu`` both "on" ``FAKE_GPU``: one GPU shared by two ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_trt_rtx import cache
from tests.conftest import FAKE_GPU
from tests.reliability.workers import make_payload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "procs", "lightning_ddp.py")
TIMEOUT_S = 120
# variables a surrounding launcher may have set; Lightning must pick its own for this job
_DIST_ENV = (
    "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"
)
NO_GPU = cache.Gpu()  # a CPU host's "GPU": id "cpu"


def run_ddp(out_dir, mode: str, options: dict | None = None) -> tuple[int, dict[int, dict], str]:
    """Run the worker, wait for both ranks' JSON; returns (rank 0's exit code, reports by rank, the output of
    both ranks: their stdout and stderr, where the package's messages go)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log_path = out_dir / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, WORKER, str(out_dir), mode, json.dumps(options or {})],
            cwd=str(out_dir),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # rank 1 joins this group: one kill ends both on timeout
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
            # rank 1 is not waited for by Lightning's launcher: give it until the deadline to report
            while not (out_dir / "rank1.json").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log_path.read_text()
    reports = {}
    for rank in (0, 1):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report (rank 0 exit code {rc}):\n{output[-4000:]}"
        reports[rank] = json.loads(path.read_text())
    return rc, reports, output


def assert_one_handle_per_rank(report: dict) -> None:
    assert report["steps"], "no predict_step ran"
    assert report["sessions"] == 1  # one session served the rank's whole run
    for step in report["steps"]:
        assert step["handle_ids"] == [report["run_handle_id"]] * 3  # every engine, the run's one handle
        assert step["handle_is_none"] == [False] * 3
        assert step["cuda_graph_strategy"] == ["whole_graph_capture"] * 3


def save_on_fake_gpu(path, data: bytes, rank: int) -> None:
    """A cache file with its record saying FAKE_GPU filled it (as a rank on that GPU saves it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = cache.save(str(path), data, placement=cache.Placement(rank=rank, world_size=2, gpu=FAKE_GPU))
    assert stats.saved, stats.save_error


def rows(report: dict, *keys: str) -> list[tuple]:
    """The gathered figures, one tuple of ``keys`` per rank."""
    return [tuple(row[k] for k in keys) for row in report["figures"]]


def test_ddp_ranks_get_their_own_cache_file_and_one_handle_per_run(tmp_path, real_cache_bytes):
    # both ranks "on" one GPU; rank 0's file was filled there: rank 0 warm, rank 1 seeded from it (same GPU)
    save_on_fake_gpu(tmp_path / "cache" / "rank0.bin", real_cache_bytes, rank=0)
    rc, reports, output = run_ddp(tmp_path, "ok", {"fake_gpu": True})
    assert rc == 0, output[-4000:]

    for rank, report in reports.items():
        assert report["rank"] == rank
        assert report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["error"] is None
        assert report["predictions"] == 3  # 6 batches split over 2 ranks
        assert_one_handle_per_rank(report)
        assert report["restored"] is True and report["closed"] is True
        assert report["saved"] is True
        assert report["warnings"] == []
    paths = [reports[r]["cache_path"] for r in (0, 1)]
    assert paths == [str(tmp_path / "cache" / "rank0.bin"), str(tmp_path / "cache" / "rank1.bin")]
    assert reports[0]["cache_source"] == "warm"
    assert reports[1]["cache_source"] == "seeded"  # rank 1 started warm from rank 0's file
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert cache.check_bytes(data) is None and data == real_cache_bytes
        assert cache.read_record(path).gpu_uuid == FAKE_GPU.uuid
    # both ranks gathered every rank's figures at teardown
    for report in reports.values():
        assert rows(report, "rank", "gpu") == [(0, FAKE_GPU.id), (1, FAKE_GPU.id)]
        assert [row["cache_path"] for row in report["figures"]] == paths
        assert rows(report, "batches", "engines") == [(3, 3), (3, 3)]
        assert rows(report, "cache_source", "warm") == [("warm", True), ("seeded", True)]
        assert [row["cache"]["loaded_from"] for row in report["figures"]] == [paths[0], paths[0]]
        assert rows(report, "cache_bytes", "saved_bytes") == [(len(real_cache_bytes),) * 2] * 2
    assert reports[0]["figures"] == reports[1]["figures"]
    for rank, report in reports.items():
        assert report["own_figures"] == report["figures"][rank]


@pytest.mark.parametrize("mode", ["fail_rank1", "fail_both"])
def test_ddp_failing_predict_step_still_saves_and_restores(tmp_path, real_cache_bytes, mode):
    # only another rank's file exists, filled on this GPU: each rank starts seeded, and its own file
    # appears only if it saved
    save_on_fake_gpu(tmp_path / "cache" / "rank9.bin", real_cache_bytes, rank=9)
    rc, reports, output = run_ddp(tmp_path, mode, {"fake_gpu": True})

    failing = (1,) if mode == "fail_rank1" else (0, 1)
    for rank, report in reports.items():
        assert report["cache_source"] == "seeded"
        assert report["saved"] is True
        own = tmp_path / "cache" / f"rank{rank}.bin"
        assert own.read_bytes() == real_cache_bytes
        assert not (tmp_path / "cache" / f"rank{rank}.bin.tmp").exists()
        assert report["restored"] is True and report["closed"] is True
        assert_one_handle_per_rank(report)
        # each rank's own figures name it, also the failing rank's (which gathers nothing)
        assert (report["own_figures"]["rank"], report["own_figures"]["cache_source"]) == (rank, "seeded")
        if rank in failing:
            # the user's exception reached the caller unchanged
            assert report["error"] == {"same_object": True, "message": f"rank {rank} fails in predict_step"}
            assert len(report["steps"]) == 2  # fails at batch 1
        else:
            # the healthy rank finishes: a peer's failure must not turn its run into an error
            assert report["error"] is None, report["error"]
            assert report["predictions"] == 3
            assert [row["rank"] for row in report["figures"]] == [0]
        assert report["figures"] == [report["own_figures"]]  # no peer to gather from: this rank's own row
    assert rc == (3 if 0 in failing else 0), output[-4000:]


# --- the default template: one file per rank when the ranks share a GPU --------------------------------


def default_path(root, rank: int, gpu: cache.Gpu = NO_GPU) -> str:
    """Where rank ``rank`` of a 2-rank job whose ranks share ``gpu`` keeps its cache, under ``root``."""
    placement = cache.Placement.current(rank=rank, local_rank=rank, world_size=2)
    placement = cache.Placement(**{**vars(placement), "sm": gpu.sm, "gpu": gpu})
    template = os.path.join(str(root), "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}-rank{rank}.bin")
    return placement.resolve(template)


@pytest.mark.parametrize(
    "on_gpu, seeded_ranks",
    [(False, (0, 1)), (False, (0,)), (True, (0,))],
    ids=["cpu-both-files", "cpu-rank0-file", "fake-gpu-rank0-file"],
)
def test_ddp_default_cache_gives_each_rank_its_own_file_and_figures_say_what_it_loaded(
    tmp_path, monkeypatch, real_cache_bytes, on_gpu, seeded_ranks
):
    """runtime_cache="default" in 2-process DDP: both ranks are on one GPU ("cpu" here, or FAKE_GPU), so the
    default gives each rank its own file, gpu-{gpu}-rank{rank}.bin; every rank's row says what it loaded."""
    root = tmp_path / "root"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(root))
    gpu = FAKE_GPU if on_gpu else NO_GPU
    paths = [default_path(root, rank, gpu) for rank in (0, 1)]
    assert os.path.basename(paths[1]) == f"gpu-{'3b6d1a2c' if on_gpu else 'cpu'}-rank1.bin"
    payloads = {rank: make_payload(real_cache_bytes, f"rank{rank}", size=40_000 + 1000 * rank) for rank in (0, 1)}
    for rank in seeded_ranks:
        if on_gpu:
            save_on_fake_gpu(Path(paths[rank]), payloads[rank], rank)
        else:  # no GPU identity on CPU: a file without a record, loaded as "unverified"
            Path(paths[rank]).parent.mkdir(parents=True, exist_ok=True)
            Path(paths[rank]).write_bytes(payloads[rank])
    rc, reports, output = run_ddp(tmp_path, "ok", {"template": "default", "fake_gpu": on_gpu, "print_table": True})
    assert rc == 0, output[-4000:]

    if not on_gpu:  # each rank loads its own file only: no seeding without this GPU's identity
        expected = [("unverified", len(payloads[0])), ("unverified" if 1 in seeded_ranks else "cold",
                                                      len(payloads[1]) if 1 in seeded_ranks else 0)]
        loaded_from = [paths[0], paths[1] if 1 in seeded_ranks else ""]
        applies = ["unknown", "unknown" if 1 in seeded_ranks else "-"]
    else:  # rank 0's own file, filled on this GPU; rank 1 seeded from it (same GPU)
        expected = [("warm", len(payloads[0])), ("seeded", len(payloads[0]))]
        loaded_from = [paths[0], paths[0]]
        applies = ["yes", "yes"]
    for rank, report in reports.items():
        assert report["error"] is None, report["error"]
        assert report["cache_path"] == paths[rank]
        assert report["warnings"] == []  # no "share the kernel cache file": each rank has its own
        assert rows(report, "rank", "gpu") == [(0, gpu.id), (1, gpu.id)]
        assert [row["cache_path"] for row in report["figures"]] == paths
        assert rows(report, "cache_source", "cache_bytes") == expected
        assert [row["cache"]["loaded_from"] for row in report["figures"]] == loaded_from
        assert [row["applies"] for row in report["figures"]] == applies
        assert report["own_figures"] == report["figures"][rank]
    for rank, (source, loaded) in enumerate(expected):
        if loaded:  # on CPU the handle holds what was loaded: that is what each rank saved to its own file
            assert Path(paths[rank]).read_bytes() == (payloads[0] if source == "seeded" else payloads[rank])
            assert reports[0]["figures"][rank]["saved_bytes"] == loaded
        else:  # nothing loaded, nothing compiled on CPU: nothing saved
            assert not os.path.exists(paths[rank])
    # rank zero prints one table, a row per rank naming its own file
    assert output.count("TensorRT-RTX serving (whole_graph_capture):") == 1, output[-4000:]
    table = output.split("TensorRT-RTX serving (whole_graph_capture):")[1].strip().splitlines()
    assert table[0].split()[:5] == ["rank", "gpu", "engines", "cache", "applies"]
    for rank, line in enumerate(table[2:4]):
        cells = line.split()
        assert cells[:5] == [str(rank), gpu.id, "3", expected[rank][0], applies[rank]], line
        assert cells[-1] == paths[rank]


# --- every rank's figures name it, with and without engines, callback or plugin ------------------------


@pytest.mark.parametrize("engines", [True, False], ids=["engines", "no-engines"])
@pytest.mark.parametrize("server", ["callback", "plugin", "both"])
def test_ddp_every_rank_reports_its_own_rank(tmp_path, server, engines):
    rc, reports, output = run_ddp(
        tmp_path, "ok", {"server": server, "engines": engines, "print_table": True, "template": None}
    )
    assert rc == 0, output[-4000:]
    for rank, report in reports.items():
        assert report["error"] is None, report["error"]
        assert report["predictions"] == 3
        assert report["sessions"] == 1 and report["closed"] is True
        own = report["own_figures"]
        assert (own["rank"], own["gpu"], own["engines"]) == (rank, "cpu", 3 if engines else 0)
        assert own["cache_source"] == "none"  # runtime_cache=None
        if server == "plugin":  # the plugin gathers nothing: each rank keeps its own figures
            assert report["figures"] == []
        else:  # the callback gathers every rank's row on every rank
            assert rows(report, "rank", "engines") == [(0, own["engines"]), (1, own["engines"])]
            assert report["figures"][rank] == own
    if server != "plugin":
        assert reports[0]["figures"] == reports[1]["figures"]
    # one report, printed by rank zero: the callback's table (with the callback present), else the
    # plugin's one-line summary
    if server == "plugin":
        assert output.count("TensorRT-RTX serving") == 1, output[-4000:]
        assert f"TensorRT-RTX serving: {3 if engines else 0} engine(s)" in output
    else:
        assert output.count("TensorRT-RTX serving") == 1, output[-4000:]
        table = output.split("TensorRT-RTX serving (whole_graph_capture):")[1].strip().splitlines()
        assert [line.split()[:3] for line in table[2:4]] == [["0", "cpu", str(own["engines"])],
                                                              ["1", "cpu", str(own["engines"])]]
    assert output.count("No TensorRT engines found") == (0 if engines else 1)  # rank zero's warning, once
