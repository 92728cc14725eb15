"""A real two-process CPU DDP predict (gloo): Lightning launches rank 1 by re-running the worker script.

The worker (``tests/procs/lightning_ddp.py``) writes one JSON per rank; see its docstring.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lightning_trt_rtx import cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "procs", "lightning_ddp.py")
TIMEOUT_S = 120
# variables a surrounding launcher may have set; Lightning must pick its own for this job
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def run_ddp(out_dir, mode: str) -> tuple[int, dict[int, dict], str]:
    """Run the worker, wait for both ranks' JSON; returns (rank 0's exit code, reports by rank, output)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log_path = out_dir / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, WORKER, str(out_dir), mode],
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
    for step in report["steps"]:
        assert step["handle_ids"] == [report["shared_handle_id"]] * 3  # every engine, the rank's one handle
        assert step["handle_is_none"] == [False] * 3
        assert step["cuda_graph_strategy"] == ["whole_graph_capture"] * 3


def test_ddp_ranks_get_their_own_cache_file_and_one_shared_handle(tmp_path, real_cache_bytes):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "rank0.bin").write_bytes(real_cache_bytes)
    rc, reports, output = run_ddp(tmp_path, "ok")
    assert rc == 0, output[-4000:]

    for rank, report in reports.items():
        assert report["rank"] == rank
        assert report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["error"] is None
        assert report["predictions"] == 3  # 6 batches split over 2 ranks
        assert_one_handle_per_rank(report)
        assert report["restored"] is True and report["active"] is False
        assert report["saved"] is True
    paths = [reports[r]["cache_path"] for r in (0, 1)]
    assert paths == [str(tmp_path / "cache" / "rank0.bin"), str(tmp_path / "cache" / "rank1.bin")]
    assert reports[0]["cache_source"] == "own"
    assert reports[1]["cache_source"] == "seeded"  # rank 1 started warm from rank 0's file
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert cache.check_bytes(data) is None and data == real_cache_bytes
    # both ranks gathered every rank's figures at teardown
    for report in reports.values():
        rows = report["figures"]
        assert [row["rank"] for row in rows] == [0, 1]
        assert [row["cache_path"] for row in rows] == paths
        assert [row["batches"] for row in rows] == [3, 3]
        assert [row["engines"] for row in rows] == [3, 3]
    assert reports[0]["figures"] == reports[1]["figures"]


@pytest.mark.parametrize("mode", ["fail_rank1", "fail_both"])
def test_ddp_failing_predict_step_still_saves_and_restores(tmp_path, real_cache_bytes, mode):
    # only another rank's file exists: each rank starts seeded, and its own file appears only if it saved
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "rank9.bin").write_bytes(real_cache_bytes)
    rc, reports, output = run_ddp(tmp_path, mode)

    failing = (1,) if mode == "fail_rank1" else (0, 1)
    for rank, report in reports.items():
        assert report["cache_source"] == "seeded"
        assert report["saved"] is True
        own = tmp_path / "cache" / f"rank{rank}.bin"
        assert own.read_bytes() == real_cache_bytes
        assert not (tmp_path / "cache" / f"rank{rank}.bin.tmp").exists()
        assert report["restored"] is True and report["active"] is False
        assert_one_handle_per_rank(report)
        if rank in failing:
            # the user's exception reached the caller unchanged
            assert report["error"] == {"same_object": True, "message": f"rank {rank} fails in predict_step"}
            assert len(report["steps"]) == 2  # fails at batch 1
        else:
            # the healthy rank finishes: a peer's failure must not turn its run into an error
            assert report["error"] is None, report["error"]
            assert report["predictions"] == 3
            assert [row["rank"] for row in report["figures"]] == [0]
    assert rc == (3 if 0 in failing else 0), output[-4000:]
