"""Real two-process CPU DDP predicts (gloo): Lightning launches rank 1 by re-running the worker script.

The worker (``tests/procs/lightning_ddp.py``) runs every case of this module in turn in one launched
pair of processes (one process group, a new Trainer per case: a launch costs more than all the
predicts), and writes one JSON per rank and case; see its docstring. Both ranks run on the CPU (GPU
"cpu"), or with ``fake_gpu`` both "on" ``FAKE_GPU``: one GPU shared by two ranks.
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
TIMEOUT_S = 300  # every case of the module, in one launch
PREDICT_LIMIT_S = 30.0  # one case's trainer.predict: far below the figures timeout (60 s) a wait would cost
# variables a surrounding launcher may have set; Lightning must pick its own for this job
_DIST_ENV = (
    "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"
)
NO_GPU = cache.Gpu()  # a CPU host's "GPU": id "cpu"
with open(os.path.join(ROOT, "tests", "data", "rtx-1.6.1-sm90.bin"), "rb") as _f:
    REAL_CACHE_BYTES = _f.read()  # as the real_cache_bytes fixture: the cases are prepared before any test runs


def run_ddp(out_dir: Path, cases: dict[str, dict]) -> tuple[dict[str, dict[int, dict]], str]:
    """Run every case in one launch; returns (reports by case and rank, the output of both ranks)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env[cache.CACHE_DIR_ENV] = str(out_dir / "default-cache")
    log_path = out_dir / "worker.log"
    last = Path(list(cases.values())[-1]["dir"]) / "rank1.json"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, WORKER, json.dumps(list(cases.values()))],
            cwd=str(out_dir),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # rank 1 joins this group: one kill ends both on timeout
        )
        deadline = time.monotonic() + TIMEOUT_S
        try:
            proc.wait(timeout=TIMEOUT_S)
            # rank 1 is not waited for by Lightning's launcher: give it until the deadline to report
            while not last.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log_path.read_text()
    reports: dict[str, dict[int, dict]] = {}
    for name, case in cases.items():
        reports[name] = {}
        for rank in (0, 1):
            path = Path(case["dir"]) / f"rank{rank}.json"
            assert path.exists(), f"case {name}: rank {rank} wrote no report:\n{output[-4000:]}"
            reports[name][rank] = json.loads(path.read_text())
    return reports, output


def messages(reports: dict[int, dict]) -> str:
    """Both ranks' messages of one case, as the job's output would show them."""
    return "\n".join(m for rank in (0, 1) for m in reports[rank]["warnings"] + reports[rank]["infos"])


def assert_one_handle_per_rank(report: dict) -> None:
    assert report["steps"], "no predict_step ran"
    assert report["sessions"] == 1  # one session served the rank's whole run
    for step in report["steps"]:
        assert step["handle_ids"] == [report["run_handle_id"]] * 3  # every engine, the run's one handle
        assert step["handle_is_none"] == [False] * 3
        assert step["cuda_graph_strategy"] == ["whole_graph_capture"] * 3


def save_on_fake_gpu(path: Path, data: bytes, rank: int) -> None:
    """A cache file with its record saying FAKE_GPU filled it (as a rank on that GPU saves it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = cache.save(str(path), data, placement=cache.Placement(rank=rank, world_size=2, gpu=FAKE_GPU))
    assert stats.saved, stats.save_error


def rows(report: dict, *keys: str) -> list[tuple]:
    """The gathered figures, one tuple of ``keys`` per rank."""
    return [tuple(row[k] for k in keys) for row in report["figures"]]


# --- the cases, prepared and run once for the whole module ---------------------------------------------

# case -> (ranks "on" FAKE_GPU, the ranks whose own default file exists before the run)
DEFAULT_CASES = {
    "cpu-both-files": (False, (0, 1)),
    "cpu-rank0-file": (False, (0,)),
    "fake-gpu-rank0-file": (True, (0,)),
}
SERVERS = [(server, engines) for server in ("callback", "plugin", "both") for engines in (True, False)]


def default_path(root, rank: int, gpu: cache.Gpu = NO_GPU) -> str:
    """Where rank ``rank`` of a 2-rank job whose ranks share ``gpu`` keeps its cache, under ``root``."""
    placement = cache.Placement.current(rank=rank, local_rank=rank, world_size=2)
    placement = cache.Placement(**{**vars(placement), "sm": gpu.sm, "gpu": gpu})
    template = os.path.join(str(root), "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}-rank{rank}.bin")
    return placement.resolve(template)


def default_payloads() -> dict[int, bytes]:
    return {rank: make_payload(REAL_CACHE_BYTES, f"rank{rank}", size=40_000 + 1000 * rank) for rank in (0, 1)}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, dict[int, dict]]:
    """Every case's reports by rank, from one launched pair."""
    out = tmp_path_factory.mktemp("ddp")
    cases: dict[str, dict] = {}

    def case(name: str, **options) -> Path:
        directory = out / name
        directory.mkdir()
        cases[name] = {"dir": str(directory), **options}
        return directory

    # both ranks "on" one GPU; rank 0's file was filled there: rank 0 warm, rank 1 seeded from it (same GPU)
    save_on_fake_gpu(case("own-files", fake_gpu=True) / "cache" / "rank0.bin", REAL_CACHE_BYTES, rank=0)
    # runtime_cache="default": both ranks on one GPU ("cpu" here, or FAKE_GPU), a file each
    for name, (on_gpu, seeded_ranks) in DEFAULT_CASES.items():
        root = out / name / "root"
        case(name, template="default", fake_gpu=on_gpu, print_table=True, cache_dir=str(root))
        gpu = FAKE_GPU if on_gpu else NO_GPU
        for rank in seeded_ranks:
            path = Path(default_path(root, rank, gpu))
            if on_gpu:
                save_on_fake_gpu(path, default_payloads()[rank], rank)
            else:  # no GPU identity on CPU: a file without a record, loaded as "unverified"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(default_payloads()[rank])
    for server, engines in SERVERS:
        case(f"{server}-{engines}", server=server, engines=engines, print_table=True, template=None)
    # last: a rank raising inside Trainer.predict; only another rank's file exists, filled on this GPU, so
    # each rank starts seeded and its own file appears only if it saved
    for mode in ("fail_rank1", "fail_both"):
        save_on_fake_gpu(case(mode, mode=mode, fake_gpu=True) / "cache" / "rank9.bin", REAL_CACHE_BYTES, rank=9)
    reports, output = run_ddp(out, cases)
    for name, by_rank in reports.items():
        for rank, report in by_rank.items():
            assert report["seconds"] < PREDICT_LIMIT_S, (name, rank, report["seconds"], output[-4000:])
    return reports


def test_ddp_ranks_get_their_own_cache_file_and_one_handle_per_run(ddp):
    reports = ddp["own-files"]
    directory = Path(reports[0]["cache_path"]).parent
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
    assert paths == [str(directory / "rank0.bin"), str(directory / "rank1.bin")]
    assert reports[0]["cache_source"] == "warm"
    assert reports[1]["cache_source"] == "seeded"  # rank 1 started warm from rank 0's file
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert cache.check_bytes(data) is None and data == REAL_CACHE_BYTES
        assert cache.read_record(path).gpu_uuid == FAKE_GPU.uuid
    # rank 1 handed its figures to rank 0 at teardown (no collective); rank 1 keeps its own
    figures = reports[0]
    assert rows(figures, "rank", "gpu") == [(0, FAKE_GPU.id), (1, FAKE_GPU.id)]
    assert [row["cache_path"] for row in figures["figures"]] == paths
    assert rows(figures, "batches", "engines", "failed") == [(3, 3, False), (3, 3, False)]
    assert rows(figures, "cache_source", "warm") == [("warm", True), ("seeded", True)]
    assert [row["cache"]["loaded_from"] for row in figures["figures"]] == [paths[0], paths[0]]
    assert rows(figures, "cache_bytes", "saved_bytes") == [(len(REAL_CACHE_BYTES),) * 2] * 2
    assert reports[1]["figures"] == [reports[1]["own_figures"]]
    for rank, report in reports.items():
        assert report["own_figures"] == figures["figures"][rank]


@pytest.mark.parametrize("mode", ["fail_rank1", "fail_both"])
def test_ddp_failing_predict_step_still_saves_and_restores(ddp, mode):
    reports = ddp[mode]
    failing = (1,) if mode == "fail_rank1" else (0, 1)
    for rank, report in reports.items():
        assert report["cache_source"] == "seeded"
        assert report["saved"] is True
        own = Path(report["cache_path"])
        assert own.name == f"rank{rank}.bin" and own.read_bytes() == REAL_CACHE_BYTES
        assert not own.with_name(f"rank{rank}.bin.tmp").exists()
        assert report["restored"] is True and report["closed"] is True
        assert_one_handle_per_rank(report)
        # each rank's own figures name it, also the failing rank's
        own_figures = report["own_figures"]
        assert (own_figures["rank"], own_figures["cache_source"], own_figures["failed"]) == (
            rank, "seeded", rank in failing
        )  # fmt: skip
        if rank in failing:
            # the user's exception reached the caller unchanged, and the rank waited for nobody
            assert report["error"] == {"same_object": True, "message": f"rank {rank} fails in predict_step"}
            assert len(report["steps"]) == 2  # fails at batch 1
            assert report["figures"] == [own_figures]
        else:
            # the healthy rank finishes: a peer's failure must not turn its run into an error; the failing
            # rank left its figures on its way out, so rank 0 reports both at once (no wait for a timeout)
            assert report["error"] is None, report["error"]
            assert report["predictions"] == 3
            assert rows(report, "rank", "failed", "cache_source") == [(0, False, "seeded"), (1, True, "seeded")]
            assert report["figures"][1] == reports[1]["own_figures"]
            assert report["warnings"] == ["Rank(s) 1 ended with an exception: their figures go up to it."]
    assert not any("Waited" in w for r in reports.values() for w in r["warnings"])


# --- the default template: one file per rank when the ranks share a GPU --------------------------------


@pytest.mark.parametrize("name", list(DEFAULT_CASES))
def test_ddp_default_cache_gives_each_rank_its_own_file_and_figures_say_what_it_loaded(ddp, name):
    """runtime_cache="default" in 2-process DDP: both ranks are on one GPU ("cpu" here, or FAKE_GPU), so the
    default gives each rank its own file, gpu-{gpu}-rank{rank}.bin; rank zero's table says what each loaded."""
    reports = ddp[name]
    on_gpu, seeded_ranks = DEFAULT_CASES[name]
    root = Path(reports[0]["cache_path"]).parents[1]
    gpu = FAKE_GPU if on_gpu else NO_GPU
    paths = [default_path(root, rank, gpu) for rank in (0, 1)]
    assert os.path.basename(paths[1]) == f"gpu-{'3b6d1a2c' if on_gpu else 'cpu'}-rank1.bin"
    payloads = default_payloads()
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
        assert report["own_figures"]["cache_source"] == expected[rank][0]
    figures = reports[0]
    assert rows(figures, "rank", "gpu") == [(0, gpu.id), (1, gpu.id)]
    assert [row["cache_path"] for row in figures["figures"]] == paths
    assert rows(figures, "cache_source", "cache_bytes") == expected
    assert [row["cache"]["loaded_from"] for row in figures["figures"]] == loaded_from
    assert [row["applies"] for row in figures["figures"]] == applies
    for rank, (source, loaded) in enumerate(expected):
        if loaded:  # on CPU the handle holds what was loaded: that is what each rank saved to its own file
            assert Path(paths[rank]).read_bytes() == (payloads[0] if source == "seeded" else payloads[rank])
            assert figures["figures"][rank]["saved_bytes"] == loaded
        else:  # nothing loaded, nothing compiled on CPU: nothing saved
            assert not os.path.exists(paths[rank])
    # rank zero prints one table, a row per rank naming its own file
    output = messages(reports)
    assert output.count("TensorRT-RTX serving (whole_graph_capture):") == 1, output
    table = output.split("TensorRT-RTX serving (whole_graph_capture):")[1].strip().splitlines()
    assert table[0].split()[:5] == ["rank", "gpu", "engines", "cache", "applies"]
    for rank, line in enumerate(table[2:4]):
        cells = line.split()
        assert cells[:5] == [str(rank), gpu.id, "3", expected[rank][0], applies[rank]], line
        assert cells[-1] == paths[rank]


# --- every rank's figures name it, with and without engines, callback or plugin ------------------------


@pytest.mark.parametrize("engines", [True, False], ids=["engines", "no-engines"])
@pytest.mark.parametrize("server", ["callback", "plugin", "both"])
def test_ddp_every_rank_reports_its_own_rank(ddp, server, engines):
    reports = ddp[f"{server}-{engines}"]
    for rank, report in reports.items():
        assert report["error"] is None, report["error"]
        assert report["predictions"] == 3
        assert report["sessions"] == 1 and report["closed"] is True
        own = report["own_figures"]
        assert (own["rank"], own["gpu"], own["engines"]) == (rank, "cpu", 3 if engines else 0)
        assert own["cache_source"] == "none"  # runtime_cache=None
        if server == "plugin":  # the plugin reports nothing but its summary: each rank keeps its own figures
            assert report["figures"] == []
        elif rank == 0:  # the callback hands every rank's row to rank zero
            assert rows(report, "rank", "engines") == [(0, own["engines"]), (1, own["engines"])]
            assert report["figures"][1] == reports[1]["own_figures"]
        else:
            assert report["figures"] == [own]
    # one report, printed by rank zero: the callback's table (with the callback present), else the
    # plugin's one-line summary
    output = messages(reports)
    assert output.count("TensorRT-RTX serving") == 1, output
    if server == "plugin":
        assert f"TensorRT-RTX serving: {3 if engines else 0} engine(s)" in output
    else:
        table = output.split("TensorRT-RTX serving (whole_graph_capture):")[1].strip().splitlines()
        assert [line.split()[:3] for line in table[2:4]] == [["0", "cpu", str(own["engines"])],
                                                              ["1", "cpu", str(own["engines"])]]
    assert output.count("No TensorRT engines found") == (0 if engines else 1)  # rank zero's warning, once
