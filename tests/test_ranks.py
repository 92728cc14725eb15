"""No rank waits on a peer that does not come: every path of a job whose ranks do different things.

One spawned pair of processes in a real gloo process group (file store) runs every case in turn
(``CASES``), each rank writing what it saw to ``rank{r}.json``. The group's timeout is 20 s: a
collective that one rank skips would hold the other for that long (and then raise), so each case
asserts its time well under it, and the whole pair has a hard limit. Faked, at our own boundary only:
the GPU identity (``cache.current_gpu``), the kernels a run compiled (``RunCache.serialize``) and, for
one rank, whether the build is TensorRT-RTX (``_backend.is_rtx_build``).

The same paths under Lightning (a rank raising inside ``Trainer.predict`` with DDP on gloo, the
figures handed to rank zero at teardown) are in ``tests/test_ddp.py``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from lightning_trt_rtx import ServingSession, TRTSettings, _backend, cache, report
from lightning_trt_rtx.report import RankFigures
from tests.conftest import FAKE_GPU, OTHER_GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR_TIMEOUT_S = 150  # both processes, every case (imports included)
GROUP_TIMEOUT_S = 20  # the process group's: what a skipped collective would cost each case
CASE_LIMIT_S = 8.0  # a case that took this long waited on something
CASES = (
    "session_same_gpu", "session_two_gpus",
    "rank0_only", "rank1_no_engines", "rank1_not_rtx", "figures_missing_rank", "figures_failed_and_stale",
    "single_device_trainers",
)  # fmt: skip


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _serve(rank: int, engines: bool) -> dict:
    """Open a session on an engine tree (or a model without engines), close it: what it did."""
    from torch import nn

    TTM = _backend.torch_tensorrt().dynamo.runtime.TorchTensorRTModule
    model = nn.Sequential(TTM(name="e0"), nn.Sequential(TTM(name="e1"))) if engines else nn.Linear(2, 2)
    with ServingSession(model, TRTSettings()) as session:
        pass
    figures = session.figures
    return {"engines": figures.engines, "gpu": figures.gpu, "source": figures.cache_source,
            "path": figures.cache_path, "saved": figures.saved_bytes}  # fmt: skip


def _sessions(rank: int, gpus: str, out_dir: str) -> list[dict]:
    """Two sessions in turn whose ranks come from torch.distributed, then from arguments; both ranks "on"
    FAKE_GPU of a one-GPU host (``same``), or on two GPUs of a two-GPU host (``distinct``)."""
    import torch.distributed as dist

    from tests.test_session import engine_tree

    gpu = OTHER_GPU if gpus == "distinct" and rank == 1 else FAKE_GPU
    current_gpu, visible_gpus = cache.current_gpu, cache.visible_gpus
    cache.current_gpu = lambda: gpu
    cache.visible_gpus = lambda: 2 if gpus == "distinct" else 1
    os.environ[cache.CACHE_DIR_ENV] = os.path.join(out_dir, f"cache-{gpus}")
    TTM = _backend.torch_tensorrt().dynamo.runtime.TorchTensorRTModule
    served = []
    try:
        for given in ({}, {"rank": rank, "local_rank": rank, "world_size": 2}):
            model, engines = engine_tree(TTM)
            priors = [e.runtime_settings for e in engines]
            with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture"), **given) as session:
                # both ranks have loaded before either saves: a rank that loads after the other's save
                # rightly seeds from that file, which would make the first session's source a race
                dist.barrier()
                handles = {id(e.runtime_settings.runtime_cache) for e in engines}
                one = {
                    "ranks": vars(session.ranks),
                    "one_handle": handles == {id(session.cache.handle)},
                    "strategies": sorted({e.runtime_settings.cuda_graph_strategy for e in engines}),
                }
            figures = session.figures
            one.update(
                rank=figures.rank, gpu=figures.gpu, engines=figures.engines, cache_source=figures.cache_source,
                cache_path=figures.cache_path, saved_bytes=figures.saved_bytes,
                restored=all(e.runtime_settings is p for e, p in zip(engines, priors)),
            )  # fmt: skip
            served.append(one)
            dist.barrier()  # both ranks' saves are done before the next session loads
    finally:
        cache.current_gpu, cache.visible_gpus = current_gpu, visible_gpus
        os.environ[cache.CACHE_DIR_ENV] = os.path.join(out_dir, "default-cache")
    return served


def _single_device_trainer(out_dir: str, rank: int) -> list[list[int]]:
    """A single-device ``Trainer.predict`` with the callback in a process of the 2-rank group (e.g. predict on
    rank zero after a DDP fit): its Trainer's world is 1, so it reports alone (a figures timeout of 10 s,
    over the case's limit, would show a wait for a rank 1 that this run does not have)."""
    from lightning_trt_rtx import TRTRuntimeSettings
    from tests.procs.lightning_models import EngineModel, make_trainer, predict_loader

    os.environ[report.FIGURES_TIMEOUT_ENV] = "10"
    try:
        callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
        trainer = make_trainer(os.path.join(out_dir, f"trainer{rank}"), [callback])
        trainer.predict(EngineModel(engines_in="none"), predict_loader(), return_predictions=False)
    finally:
        del os.environ[report.FIGURES_TIMEOUT_ENV]
    return [[row.rank, row.batches] for row in callback.figures]


def rank_worker(rank_: str, out_dir: str) -> None:
    """One rank (run as ``python -c``): every case of ``CASES`` in one gloo group, a barrier between cases."""
    import torch.distributed as dist

    rank = int(rank_)
    cache.current_gpu = lambda: FAKE_GPU  # both ranks "on" one GPU: each gets its own default file
    with open(os.path.join(ROOT, "tests", "data", "rtx-1.6.1-sm90.bin"), "rb") as f:
        kernels = f.read()
    cache.RunCache.serialize = lambda self: kernels
    _backend.torch_tensorrt()  # imported before the cases: their times are what they waited
    messages = Messages()
    logging.getLogger("lightning_trt_rtx").addHandler(messages)
    dist.init_process_group(
        "gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )  # fmt: skip
    results: dict = {}
    for case in CASES:
        dist.barrier()
        messages.messages.clear()
        start = time.monotonic()
        result: dict = {}
        try:
            if case in ("session_same_gpu", "session_two_gpus"):
                result["sessions"] = _sessions(rank, "same" if case == "session_same_gpu" else "distinct", out_dir)
            elif case == "rank0_only":  # `if rank == 0: with ServingSession(...)`: the other rank serves nothing
                if rank == 0:
                    result["served"] = _serve(rank, engines=True)
            elif case == "rank1_no_engines":
                result["served"] = _serve(rank, engines=rank == 0)
            elif case == "rank1_not_rtx":
                real = _backend.is_rtx_build
                _backend.is_rtx_build = (lambda: False) if rank == 1 else real
                try:
                    result["served"] = _serve(rank, engines=True)
                finally:
                    _backend.is_rtx_build = real
            elif case == "figures_missing_rank":  # rank 1 never ends its run: rank 0 waits 1 s, then reports
                report.open_run(rank)
                dist.barrier()
                rows = report.collect(RankFigures(rank=rank, engines=rank + 1), timeout_s=1.0)
                result["rows"] = [(r.rank, r.engines) for r in rows]
            elif case == "figures_failed_and_stale":
                report.open_run(rank)  # run n: rank 1 posts a row, which nobody collects
                dist.barrier()
                report.post(RankFigures(rank=rank, engines=7))
                dist.barrier()
                report.open_run(rank)  # run n + 1: the row left from run n does not count
                dist.barrier()
                stale = report.collect(RankFigures(rank=rank), timeout_s=0.5)
                result["stale_rows"] = [r.rank for r in stale]
                dist.barrier()
                report.post(RankFigures(rank=rank, engines=3, failed=True))  # ended with an exception
                rows = report.collect(RankFigures(rank=rank, engines=2), timeout_s=GROUP_TIMEOUT_S)
                result["rows"] = [(r.rank, r.engines, r.failed) for r in rows]
            elif case == "single_device_trainers":  # each process its own Trainer(devices=1) inside the group
                result["rows"] = _single_device_trainer(out_dir, rank)
        except Exception as err:  # noqa: BLE001 - reported to the test
            result["error"] = f"{type(err).__name__}: {err}"
        result["seconds"] = time.monotonic() - start
        result["warnings"] = list(messages.messages)
        results[case] = result
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[int, dict]:
    """Both ranks' results of every case, from one spawned pair."""
    out_dir = tmp_path_factory.mktemp("ranks")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p),
        CUDA_VISIBLE_DEVICES="",
        LOCAL_WORLD_SIZE="2",  # as torchrun sets it: two ranks on this node, which sees no GPU
        **{cache.CACHE_DIR_ENV: str(out_dir / "default-cache")},
    )
    code = "import sys; from tests.test_ranks import rank_worker; rank_worker(*sys.argv[1:])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), str(out_dir)], cwd=ROOT, env=dict(env, LOCAL_RANK=str(rank)),
            stdout=open(out_dir / f"rank{rank}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + PAIR_TIMEOUT_S
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            codes.append(proc.wait())
    logs = "\n".join(f"--- rank {r}\n" + (out_dir / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs
    results = {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)}
    for rank, cases in results.items():
        for case, result in cases.items():
            assert "error" not in result, (rank, case, result["error"], logs)
            assert result["seconds"] < CASE_LIMIT_S, (rank, case, result["seconds"], logs)
    return results


def test_a_session_on_rank_zero_only_serves_without_the_other_rank(pair):
    served = pair[0]["rank0_only"]["served"]
    kernels = os.path.getsize(os.path.join(ROOT, "tests", "data", "rtx-1.6.1-sm90.bin"))
    assert (served["engines"], served["gpu"], served["source"], served["saved"]) == (2, FAKE_GPU.id, "cold", kernels)
    # two ranks on a node without GPUs share one: rank 0 gets its own file, decided without asking rank 1
    assert os.path.basename(served["path"]) == f"gpu-{FAKE_GPU.id}-rank0.bin"
    assert "served" not in pair[1]["rank0_only"]
    assert pair[0]["rank0_only"]["warnings"] == [] == pair[1]["rank0_only"]["warnings"]


def test_a_rank_without_engines_or_without_rtx_holds_nobody_up(pair):
    for case in ("rank1_no_engines", "rank1_not_rtx"):
        zero, one = pair[0][case]["served"], pair[1][case]["served"]
        assert zero["engines"] == 2 and zero["source"] in ("cold", "warm", "seeded")
        assert os.path.basename(zero["path"]) == f"gpu-{FAKE_GPU.id}-rank0.bin"
        assert one["source"] == "none" and one["path"] == "" and one["gpu"] == FAKE_GPU.id  # no cache opened
        assert one["engines"] == (0 if case == "rank1_no_engines" else 2)
    # the not-RTX rank says why nothing applies only where rank zero would (its warnings are rank zero's)
    assert pair[1]["rank1_not_rtx"]["warnings"] == []


def test_rank_zero_waits_a_bounded_time_for_figures_that_never_come_and_says_for_whom(pair):
    zero = pair[0]["figures_missing_rank"]
    assert zero["rows"] == [[0, 1]]  # its own row only
    (warning,) = zero["warnings"]
    assert warning.startswith("Waited 1 s for the serving figures of rank(s) 1 ")
    assert report.FIGURES_TIMEOUT_ENV in warning
    assert 1.0 <= zero["seconds"] < CASE_LIMIT_S
    assert pair[1]["figures_missing_rank"]["rows"] == [[1, 2]]  # other ranks keep their own, waiting for nobody


def test_a_failed_ranks_figures_reach_rank_zero_and_an_earlier_runs_do_not(pair):
    zero = pair[0]["figures_failed_and_stale"]
    assert zero["stale_rows"] == [0]  # run n's row was left for run n + 1: not counted
    assert zero["rows"] == [[0, 2, False], [1, 3, True]]
    assert any(w.startswith("Waited 0.5 s for the serving figures of rank(s) 1") for w in zero["warnings"])
    assert "Rank(s) 1 ended with an exception: their figures go up to it." in zero["warnings"]
    assert pair[1]["figures_failed_and_stale"]["rows"] == [[1, 2, False]]


def test_a_single_device_trainer_inside_a_larger_group_reports_alone_without_waiting(pair):
    for rank in (0, 1):
        result = pair[rank]["single_device_trainers"]
        assert result["rows"] == [[0, 3]], result  # each its own run's rank 0, three batches
        assert not [w for w in result["warnings"] if w.startswith("Waited")], result["warnings"]


FROZEN_STORE = """
import sys, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
sys.stdin.read()
"""


def test_a_rank_posting_to_a_rank_zero_that_does_not_answer_gives_up_after_the_figures_timeout(monkeypatch):
    """Rank zero frozen (SIGSTOP) or its node gone without a reset: a real TCP store that accepts and never
    answers. Its client's own timeout is long (the group's); the post waits at most the figures' timeout."""
    import torch.distributed as dist

    server = subprocess.Popen([sys.executable, "-c", FROZEN_STORE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(server.stdout.readline())
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
        os.kill(server.pid, signal.SIGSTOP)
        monkeypatch.setattr(report, "_store", lambda world_size=None: client)
        monkeypatch.setenv(report.FIGURES_TIMEOUT_ENV, "1")
        start = time.monotonic()
        report.post(RankFigures(rank=1), world_size=2)
        assert time.monotonic() - start < 10
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()


# --- two sessions per rank, ranks from torch.distributed then from arguments ----------------------------


def test_two_processes_take_their_ranks_from_a_gloo_group_and_share_a_gpu(pair):
    kernels = os.path.getsize(os.path.join(ROOT, "tests", "data", "rtx-1.6.1-sm90.bin"))
    for rank in (0, 1):
        first, second = pair[rank]["session_same_gpu"]["sessions"]
        for session in (first, second):  # from torch.distributed, then from arguments: the same
            assert session["ranks"] == {"rank": rank, "local_rank": rank, "node_rank": 0, "world_size": 2}
            assert session["rank"] == rank and session["gpu"] == FAKE_GPU.id and session["engines"] == 4
            assert session["one_handle"] and session["strategies"] == ["whole_graph_capture"] and session["restored"]
            # two ranks on a one-GPU host: one default file each, per GPU and rank
            assert os.path.basename(session["cache_path"]) == f"gpu-{FAKE_GPU.id}-rank{rank}.bin"
            assert f"{os.sep}cache-same{os.sep}" in session["cache_path"] and session["saved_bytes"] == kernels
        assert (first["cache_source"], second["cache_source"]) == ("cold", "warm")
        assert cache.read_record(first["cache_path"]).gpu_uuid == FAKE_GPU.uuid
    paths = [pair[rank]["session_same_gpu"]["sessions"][0]["cache_path"] for rank in (0, 1)]
    assert paths[0] != paths[1]


def test_two_processes_on_two_gpus_get_one_file_per_gpu(pair):
    for rank, gpu in ((0, FAKE_GPU), (1, OTHER_GPU)):
        first, second = pair[rank]["session_two_gpus"]["sessions"]
        assert first["rank"] == rank and first["gpu"] == gpu.id
        assert os.path.basename(first["cache_path"]) == f"gpu-{gpu.id}.bin"
        assert (first["cache_source"], second["cache_source"]) == ("cold", "warm")
        assert cache.read_record(first["cache_path"]).gpu_uuid == gpu.uuid
