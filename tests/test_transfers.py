"""Uploads ahead of the engine and host copies of predictions, on CPU.

CUDA is faked only at the package's own boundary (``transfers.CudaOps``): the recording ops below keep
the protocol's order (staging, copies, events, the consumer's wait and ``record_stream``) and give CPU
tensors, so everything else (the thread, the queue, batch structures, errors, closing, Lightning's
predict loop and its DDP sampler) runs for real. The GPU tests (tests/gpu/test_gpu_transfers.py) run
the real ops.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import UserDict, namedtuple
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_trt_rtx import _predict_loop, transfers
from lightning_trt_rtx.callbacks import TRTHostPredictions, TRTRuntimeSettings
from lightning_trt_rtx.report import RankFigures, table

Pair = namedtuple("Pair", "image label")


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    name: str


class RecordingOps:
    """``transfers.CudaOps`` on CPU: every call logged as ``(what, thread, detail)``."""

    def __init__(self, device: Any = "cpu", pinned: set[int] | None = None) -> None:
        self.device = torch.device("cpu")
        self.log: list[tuple[str, str, Any]] = []
        self.pinned = pinned if pinned is not None else set()
        self.events = 0
        self.lock = threading.Lock()

    def _note(self, what: str, detail: Any = None) -> None:
        with self.lock:
            self.log.append((what, threading.current_thread().name, detail))

    def new_stream(self) -> str:
        return "uploads-stream"

    def in_thread(self, stream: Any) -> Any:
        ops = self

        class Scope:
            def __enter__(self) -> None:
                ops._note("enter", stream)

            def __exit__(self, *exc: Any) -> None:
                ops._note("exit", stream)

        return Scope()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.pinned

    def pinned_like(self, tensor: torch.Tensor) -> torch.Tensor:
        self._note("stage", tuple(tensor.shape))
        return torch.empty_like(tensor)

    def device_like(self, tensor: torch.Tensor) -> torch.Tensor:
        self._note("alloc", tuple(tensor.shape))
        return torch.empty_like(tensor)

    def upload_here(self, staged: torch.Tensor) -> torch.Tensor:
        self._note("copy_here", tuple(staged.shape))
        return staged.clone()

    def record_event(self) -> int:
        self.events += 1
        self._note("event", self.events)
        return self.events

    def hand_over(self, event: Any, tensors: list[torch.Tensor]) -> None:
        self._note("wait", event)
        for tensor in tensors:
            self._note("record_stream", tuple(tensor.shape))

    def finish(self, stream: Any) -> None:
        self._note("finish", stream)


def uploads(
    source: Any, depth: int = 2, ops: RecordingOps | None = None, mode: str = "thread", **options: Any
) -> Any:
    """``mode``: "thread" (every batch counts as large) or "loop" (every batch counts as small; none is small
    enough to be copied without staging: see the tests of ``DIRECT_MAX_BYTES``)."""
    up = transfers.UploadsAhead(source, "cpu", depth=depth, ops=ops or RecordingOps(), **options)
    up.THREAD_MIN_BYTES = 0 if mode == "thread" else 1 << 62
    up.DIRECT_MAX_BYTES = 0
    return up


def consumer_steps(ops: RecordingOps) -> list[tuple[str, Any]]:
    return [(what, detail) for what, thread, detail in ops.log if thread == threading.current_thread().name]


# --- the protocol ------------------------------------------------------------------------------------


def test_each_large_batch_is_staged_copied_and_waited_for_by_its_own_event_in_order():
    batches = [torch.full((2, 3), float(i)) for i in range(5)]
    ops = RecordingOps()
    up = uploads(batches, ops=ops, mode="thread")
    got = list(up)
    assert up.stats["mode"] == "thread"
    assert [b.tolist() for b in got] == [b.tolist() for b in batches]
    assert all(g is not b for g, b in zip(got, batches))  # copies, not the sources
    # the consumer waited for event k at batch k and marked that batch's tensor as used, nothing else
    consumer = [s for s in consumer_steps(ops) if s[0] in ("wait", "record_stream", "finish")]
    assert consumer == [s for k in range(1, 6) for s in (("wait", k), ("record_stream", (2, 3)))] + [
        ("finish", "uploads-stream")
    ]
    # per batch: pinned staging, then the device buffer, then the event that covers the copy, all on
    # the uploads' stream, by the thread (the first batch too: its size chose the thread)
    copies = [(what, d) for what, _, d in ops.log if what in ("stage", "alloc", "event", "copy_here")]
    assert copies == [s for k in range(1, 6) for s in (("stage", (2, 3)), ("alloc", (2, 3)), ("event", k))]
    threads = {thread for what, thread, _ in ops.log if what == "stage"}
    assert threads == {"lightning-trt-rtx-uploads"}
    scopes = [what for what, _, _ in ops.log if what in ("enter", "exit", "stage")]
    for i, what in enumerate(scopes):  # every staging inside an enter/exit of the uploads' stream
        if what == "stage":
            assert "enter" in scopes[:i] and scopes[:i].count("enter") > scopes[:i].count("exit")


def test_each_small_batch_is_staged_and_copied_on_the_consumers_stream_when_taken():
    """No side stream, event or hand-over per batch (their calls cost the host more than the copy costs
    the GPU): the copy is queued on the consumer's stream, so its next step comes after it."""
    read: list[int] = []

    def source():
        for i in range(5):
            read.append(i)
            yield torch.full((2, 3), float(i))

    ops = RecordingOps()
    up = uploads(source(), ops=ops, mode="loop")
    got = []
    for batch in up:
        got.append(batch)
        assert len(read) == len(got)  # read when taken, not ahead
    assert up.stats["mode"] == "loop"
    assert [b.tolist() for b in got] == [[[float(i)] * 3] * 2 for i in range(5)]
    assert {thread for _, thread, _ in ops.log} == {threading.current_thread().name}
    # every batch, the first too, staged and copied here, with nothing to wait on
    steps = [(what, d) for what, _, d in ops.log]
    assert steps == [("stage", (2, 3)), ("copy_here", (2, 3))] * 5 + [("finish", "uploads-stream")]


def test_large_first_batches_get_a_thread_small_ones_the_loop():
    large = [torch.zeros(transfers.UploadsAhead.THREAD_MIN_BYTES // 4) for _ in range(3)]
    up = transfers.UploadsAhead(large, "cpu", ops=RecordingOps())
    assert len(list(up)) == 3 and up.stats["mode"] == "thread"
    small = transfers.UploadsAhead([torch.zeros(4)] * 3, "cpu", ops=RecordingOps())
    assert len(list(small)) == 3 and small.stats["mode"] == "loop"


def test_where_a_graph_may_be_captured_no_thread_calls_cuda():
    """TensorRT-RTX and enable_cudagraphs capture in CUDA's global mode: a thread's CUDA call breaks the capture."""
    large = [torch.zeros(transfers.UploadsAhead.THREAD_MIN_BYTES // 4) for _ in range(3)]
    asked: list[bool] = []

    def may_capture() -> bool:
        asked.append(True)
        return True

    ops = RecordingOps()
    up = transfers.UploadsAhead(large, "cpu", ops=ops, may_capture=may_capture)  # no gate: the loop stages
    assert len(list(up)) == 3 and up.stats["mode"] == "loop" and asked == [True]  # asked once, at the first batch
    assert {thread for _, thread, _ in ops.log} == {threading.current_thread().name}
    # large batches staged by the loop still go up on the uploads' stream, each with its event (a copy of
    # a MiB or more queued on the loop's stream would make the GPU wait for it)
    assert [what for what, _, _ in ops.log if what in ("copy_here", "event", "wait")] == ["event", "wait"] * 3
    up = transfers.UploadsAhead(large, "cpu", ops=RecordingOps(), may_capture=lambda: False)
    assert len(list(up)) == 3 and up.stats["mode"] == "thread"


def test_with_a_gate_the_thread_calls_cuda_only_between_steps_and_stages_meanwhile():
    import time

    batches = [torch.full((4,), float(i)) for i in range(6)]
    ops, gate = RecordingOps(), transfers.StepGate()
    up = transfers.UploadsAhead(batches, "cpu", ops=ops, may_capture=lambda: True, gate=gate)
    up.THREAD_MIN_BYTES = 0
    got = [next(up)]
    assert up.stats["mode"] == "thread"
    for _ in range(5):
        gate.step_started()  # the step (where an engine may capture) runs: no CUDA call from the thread
        calls = len(ops.log)
        time.sleep(0.3)
        assert [e for e in ops.log[calls:] if e[0] not in ("enter", "exit")] == []
        gate.step_ended()
        got.append(next(up))
    assert [b.tolist() for b in got] == [b.tolist() for b in batches]
    with pytest.raises(StopIteration):
        next(up)
    # a step that raised (the gate still held) never keeps the uploads from closing
    up = transfers.UploadsAhead(batches, "cpu", ops=RecordingOps(), may_capture=lambda: True, gate=gate)
    up.THREAD_MIN_BYTES = 0
    next(up)
    gate.step_started()
    start = time.perf_counter()
    up.close()
    gate.step_ended()
    assert time.perf_counter() - start < 2.0 and up._thread is None


def test_a_step_that_cannot_capture_lets_the_gated_thread_copy_while_it_runs():
    import time

    batches = [torch.full((4,), float(i)) for i in range(4)]
    ops, gate = RecordingOps(), transfers.StepGate(capture=lambda: False)  # e.g. "auto" running without graphs
    up = transfers.UploadsAhead(batches, "cpu", ops=ops, may_capture=lambda: True, gate=gate, depth=3)
    up.THREAD_MIN_BYTES = 0
    got = [next(up)]
    assert gate.attached
    gate.step_started()
    deadline = time.monotonic() + 5.0
    while sum(e[0] == "event" for e in ops.log) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not gate.in_step and sum(e[0] == "event" for e in ops.log) == 4  # the other 3 went up in the step
    got += [next(up) for _ in range(3)]  # taken inside the step: nothing waits for its end
    gate.step_ended()
    assert [b.tolist() for b in got] == [b.tolist() for b in batches]


def test_a_gate_without_a_gated_thread_holds_no_step():
    gate = transfers.StepGate()
    gate.step_started()  # nothing attached: no lock, whatever the step may capture
    assert not gate.in_step
    gate.step_ended()
    up = transfers.UploadsAhead([torch.zeros(4)] * 3, "cpu", ops=RecordingOps(), may_capture=lambda: True, gate=gate)
    up.THREAD_MIN_BYTES = 0
    next(up)
    assert gate.attached
    up.close()  # the thread is gone: steps take no lock again
    assert not gate.attached
    gate.step_started()
    assert not gate.in_step


def test_a_batch_taken_inside_a_step_is_an_error_not_a_wait_forever():
    import time

    gate = transfers.StepGate()
    up = transfers.UploadsAhead(
        [torch.zeros(4)] * 8, "cpu", ops=RecordingOps(), may_capture=lambda: True, gate=gate, depth=1
    )
    up.THREAD_MIN_BYTES = 0
    next(up)  # the first batch: read by the consumer
    gate.step_started()
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="take each batch before batch_started"):
        for _ in range(5):  # before the step started, the thread may have queued one and readied the next
            next(up)
    gate.step_ended()
    assert time.perf_counter() - start < 2.0 and up._thread is None  # closed


@pytest.mark.parametrize("strategy, scopes, thread", [("disabled", False, True), ("whole_graph_capture", False, False),
                                                      ("auto", False, False), ("disabled", True, False)])  # fmt: skip
def test_the_session_says_when_graphs_may_be_captured(strategy, scopes, thread, monkeypatch):
    from lightning_trt_rtx import ServingSession, TRTSettings, _backend

    session = ServingSession(settings=TRTSettings(cuda_graph_strategy=strategy, runtime_cache=None))
    if scopes:  # a user's own enable_cudagraphs scope is open: the process-wide mode is not "standard"
        monkeypatch.setattr(_backend, "cudagraphs_mode", lambda: _backend.WHOLE_GRAPH)
    assert session._graphs_may_capture() is not thread


def test_pinned_sources_go_up_without_staging_and_stats_count_both():
    pinned_tensor, pageable = torch.ones(4), torch.zeros(8)
    ops = RecordingOps(pinned={id(pinned_tensor)})
    up = uploads([pinned_tensor, pageable], ops=ops)
    assert [t.tolist() for t in up] == [pinned_tensor.tolist(), pageable.tolist()]
    assert [d for what, _, d in ops.log if what == "stage"] == [(8,)]
    waited = up.stats.pop("waited_s")
    expected = {"batches": 2, "staged_bytes": 8 * 4, "pinned_bytes": 4 * 4, "direct_batches": 0, "mode": "thread"}
    assert up.stats == expected
    assert 0.0 <= waited < 1.0


def test_the_consumers_wait_for_a_slow_data_path_is_counted_and_a_ready_batch_costs_none():
    def slow(n: int, seconds: float):
        for i in range(n):
            time.sleep(seconds)
            yield torch.full((4,), float(i))

    up = uploads(slow(4, 0.05))
    assert [t[0].item() for t in up] == [0.0, 1.0, 2.0, 3.0]
    assert up.stats["waited_s"] >= 3 * 0.04  # each batch after the first took the thread 50 ms to read
    # read by the loop itself: nothing to wait for (its reading is the loop's own work)
    looped = uploads(slow(3, 0.02), mode="loop")
    assert len(list(looped)) == 3 and looped.stats["waited_s"] == 0.0


def test_every_structure_lightning_moves_keeps_its_shape_and_non_tensor_leaves():
    image = torch.arange(6.0).reshape(2, 3)
    batches = [
        (image, torch.tensor([1, 2])),
        [image, "text", 7],
        {"x": image, "meta": {"ids": torch.tensor([3]), "tag": "a"}},
        Pair(image, torch.tensor(5)),
        Sample(image, "name"),
        "no tensors at all",
    ]
    got = list(uploads(batches))
    assert isinstance(got[0], tuple) and torch.equal(got[0][0], image) and got[0][1].tolist() == [1, 2]
    assert isinstance(got[1], list) and got[1][1:] == ["text", 7] and torch.equal(got[1][0], image)
    assert got[2]["meta"]["tag"] == "a" and got[2]["meta"]["ids"].tolist() == [3] and torch.equal(got[2]["x"], image)
    assert isinstance(got[3], Pair) and torch.equal(got[3].image, image) and got[3].label.item() == 5
    assert isinstance(got[4], Sample) and got[4].name == "name" and torch.equal(got[4].image, image)
    assert got[4].image is not image
    assert got[5] == "no tensors at all"


def test_a_frozen_dataclass_is_left_for_lightning_to_move():
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: torch.Tensor

    batch = Frozen(torch.ones(2))
    assert list(uploads([batch])) == [batch]


def test_shape_changes_and_a_smaller_last_batch_each_get_their_own_buffer():
    batches = [torch.ones(4, 3), torch.ones(4, 5), torch.ones(1, 5)]
    ops = RecordingOps()
    got = list(uploads(batches, ops=ops))
    assert [tuple(b.shape) for b in got] == [(4, 3), (4, 5), (1, 5)]
    assert [d for what, _, d in ops.log if what == "alloc"] == [(4, 3), (4, 5), (1, 5)]


def test_batches_under_64_kib_are_copied_from_where_they_are_and_larger_ones_staged():
    """CUDA queues a copy this small from pageable memory without waiting for the GPU: no staging."""
    assert transfers.UploadsAhead.DIRECT_MAX_BYTES == 64 << 10
    small = [torch.full((2, 3), float(i)) for i in range(3)]
    edge = torch.zeros((64 << 10) // 4)  # exactly 64 KiB of float32: staged
    ops = RecordingOps()
    up = transfers.UploadsAhead([small[0], (small[1], small[2]), edge], "cpu", ops=ops)
    got = list(up)
    assert up.stats["mode"] == "loop" and up.stats["direct_batches"] == 2
    assert torch.equal(got[0], small[0]) and got[0] is not small[0]  # a copy on the loop's stream
    assert all(torch.equal(g, s) for g, s in zip(got[1], small[1:]))
    steps = [(what, d) for what, _, d in ops.log if what in ("stage", "copy_here")]
    assert steps == [("copy_here", (2, 3))] * 3 + [("stage", tuple(edge.shape)), ("copy_here", tuple(edge.shape))]
    assert up.stats["staged_bytes"] == 64 << 10


def test_with_small_on_host_batches_under_64_kib_are_handed_over_as_they_are():
    source = [torch.full((2, 3), float(i)) for i in range(3)]
    ops = RecordingOps()
    up = transfers.UploadsAhead(source, "cpu", ops=ops, small_on_host=True)
    got = list(up)
    assert all(g is s for g, s in zip(got, source, strict=True))
    assert [what for what, _, _ in ops.log if what != "finish"] == [] and up.stats["direct_batches"] == 3


def test_small_on_host_hands_small_batches_over_staged_for_the_consumer_to_move():
    """For Lightning's own non-blocking transfer inside the step: one batch on the GPU at a time."""
    source = [torch.full((2, 3), float(i)) for i in range(4)]
    pinned = torch.full((2, 3), 9.0)
    ops = RecordingOps(pinned={id(pinned)})
    got = list(uploads([*source, pinned], ops=ops, mode="loop", small_on_host=True))
    assert [b.tolist() for b in got] == [b.tolist() for b in [*source, pinned]]
    assert all(g is not b for g, b in zip(got[1:4], source[1:4]))  # staged copies (pinned, on the host)
    assert got[4] is pinned  # came pinned: handed over as it is
    # only staged, never copied to the device here (the first batch too: one path for every batch)
    steps = [what for what, _, _ in ops.log if what != "finish"]
    assert steps == ["stage"] * 4
    with pytest.raises(TypeError, match="small_on_host must be True or False"):
        transfers.UploadsAhead([], "cpu", ops=RecordingOps(), small_on_host=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode, ahead, extra", [("thread", 3, 1), ("loop", 0, 0)])
def test_memory_is_bounded_the_source_is_read_at_most_depth_ahead(mode, ahead, extra):
    """Batches read but not handed over: none in the loop (read when taken); in a thread, ``depth``
    queued and one waiting for room."""
    read = []

    def source():
        for i in range(50):
            read.append(i)
            yield torch.tensor([i])

    up = uploads(source(), depth=3, mode=mode)
    it = iter(up)
    for consumed in range(1, 10):
        next(it)
        time.sleep(0.05)  # let the thread run as far ahead as it may
        assert consumed + ahead <= len(read) <= consumed + ahead + extra, (consumed, len(read))
    up.close()


@pytest.mark.parametrize("mode", ["thread", "loop"])
def test_an_error_in_the_source_is_raised_at_its_own_batch_after_the_earlier_ones(mode):
    def source():
        yield torch.tensor([0])
        yield torch.tensor([1])
        raise KeyError("sample 2 is missing")

    it = iter(uploads(source(), mode=mode))
    assert next(it).item() == 0 and next(it).item() == 1
    with pytest.raises(KeyError, match="sample 2 is missing"):
        next(it)
    with pytest.raises(StopIteration):  # closed: nothing more, and no thread left
        next(it)


def test_close_stops_an_endless_source_promptly_and_releases_the_staging():
    def endless():
        i = 0
        while True:
            i += 1
            yield torch.tensor([i])

    ops = RecordingOps()
    up = uploads(endless(), ops=ops)
    it = iter(up)
    next(it)
    thread = up._thread
    start = time.perf_counter()
    up.close()
    assert time.perf_counter() - start < 2.0
    assert thread is not None and not thread.is_alive()
    assert ops.log[-1][0] == "finish"
    with pytest.raises(StopIteration):
        next(it)
    up.close()  # idempotent


def test_at_most_depth_plus_one_batches_are_uploaded_ahead_of_the_one_handed_over():
    ops = RecordingOps()
    up = uploads([torch.zeros(4)] * 10, depth=2, ops=ops)
    next(iter(up))
    time.sleep(0.5)  # let the thread run as far ahead as it may
    assert sum(what == "alloc" for what, _, _ in ops.log) - 1 == 3  # two queued, one waiting for room
    up.close()


def test_close_waits_for_a_read_in_flight_when_nothing_is_raised(messages):
    """A loop that stops early (limit_predict_batches, a break): the source (a DataLoader with persistent
    workers) may be read again next, so close() waits for the thread's read to end."""
    arrived = threading.Event()

    def requests():
        yield torch.zeros(2)
        arrived.wait(30)
        yield torch.ones(2)

    up = uploads(requests())
    it = iter(up)
    next(it)
    time.sleep(0.2)  # the thread is now blocked in the source
    thread = up._thread
    threading.Timer(transfers.CLOSE_WAIT_S + 0.5, arrived.set).start()  # longer than an error's close waits
    start = time.perf_counter()
    up.close()
    assert time.perf_counter() - start >= transfers.CLOSE_WAIT_S + 0.4 and thread is not None
    assert not thread.is_alive()
    assert not messages.matching("still reading the source")


def test_a_loop_that_stops_early_over_a_stream_that_blocks_returns_after_the_end_wait(messages, monkeypatch):
    """A `break` (or limit_predict_batches) over a request stream whose next request never comes."""
    monkeypatch.setattr(transfers, "END_WAIT_S", 0.5)
    arrived = threading.Event()

    def requests():
        yield torch.zeros(2)
        yield torch.zeros(2)
        arrived.wait(30)
        yield torch.ones(2)

    up = uploads(requests())
    for _ in up:
        break
    time.sleep(0.3)
    start = time.perf_counter()
    up.close()
    assert time.perf_counter() - start < 2.0
    assert messages.matching("still reading the source 0.5 s after the loop ended")
    arrived.set()


def test_close_leaves_a_thread_blocked_in_a_read_behind_and_uploads_nothing_after_it(messages):
    """A source whose next read blocks (a stream waiting for its next request) while the loop raises (its
    step failed, Ctrl-C): close() returns after CLOSE_WAIT_S, and the read, when it returns, uploads nothing."""
    arrived = threading.Event()

    def requests():
        yield torch.zeros(2)
        arrived.wait(30)  # the next request is not here yet
        yield torch.ones(2)

    ops = RecordingOps()
    up = uploads(requests(), ops=ops)
    it = iter(up)
    next(it)
    time.sleep(0.2)  # the thread is now blocked in the source
    thread = up._thread
    start = time.perf_counter()
    try:
        raise RuntimeError("the step failed")
    except RuntimeError:
        up.close()  # as the callback's on_exception closes it
    assert time.perf_counter() - start < transfers.CLOSE_WAIT_S + 1.0
    assert messages.matching("still reading the source")
    allocs = sum(what == "alloc" for what, _, _ in ops.log)
    arrived.set()
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive() and sum(what == "alloc" for what, _, _ in ops.log) == allocs
    assert "finish" not in [what for what, _, _ in ops.log]  # not while a thread may still use the stream


def test_a_failing_step_with_a_blocked_source_reaches_the_user_without_waiting_for_the_source(monkeypatch):
    arrived = threading.Event()

    class Requests(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(3):
                yield torch.full((4,), float(i))
            arrived.wait(30)  # the next request is not here yet
            yield torch.full((4,), 3.0)

    class Fails(Doubler):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
            time.sleep(0.3)
            raise ValueError("bad request")

    UploadsOnCpu(monkeypatch)
    monkeypatch.setattr(transfers.UploadsAhead, "THREAD_MIN_BYTES", 0)
    trainer = cpu_trainer(callbacks=[TRTRuntimeSettings(runtime_cache=None, print_table=False)])
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="bad request"):
            trainer.predict(Fails(), DataLoader(Requests(), batch_size=None))
        assert time.perf_counter() - start < transfers.CLOSE_WAIT_S + 4.0  # the source answers after 30 s
    finally:
        arrived.set()


def test_batches_that_move_themselves_and_tensor_subclasses_are_left_for_lightning(monkeypatch):
    """A tokenizer's BatchEncoding (a mapping with its own .to() and state) and a tensor subclass carrying
    metadata (torchvision's tv_tensors): Lightning moves them with .to(), which keeps what they carry."""

    class Encoding(UserDict):
        def __init__(self, data: Any = None, encodings: Any = None) -> None:
            super().__init__(data)
            self._encodings = encodings

        def word_ids(self, i: int = 0) -> Any:
            if not self._encodings:
                raise ValueError("word_ids() is not available")
            return self._encodings[i]

        def to(self, device: Any) -> Encoding:
            self.data = {k: v.to(device) for k, v in self.data.items()}
            return self

    class Boxes(torch.Tensor):
        format = "XYXY"

    ops = RecordingOps()
    boxes = torch.zeros(2, 4).as_subclass(Boxes)
    batch = {"text": Encoding({"input_ids": torch.ones(2, 4, dtype=torch.long)}, [[None, 0, 0, 1]] * 2),
             "boxes": boxes, "image": torch.zeros(2, 3)}  # fmt: skip
    (got,) = list(uploads([batch], ops=ops))
    assert got["text"] is batch["text"] and got["text"].word_ids(0) == [None, 0, 0, 1]
    assert got["boxes"] is boxes and type(got["boxes"]) is Boxes
    assert got["image"] is not batch["image"]  # a plain tensor: uploaded
    assert [detail for what, _, detail in ops.log if what == "stage"] == [(2, 3)]

    class Tagger(LightningModule):
        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            return batch.word_ids(0)

    UploadsOnCpu(monkeypatch)
    monkeypatch.setattr(transfers.UploadsAhead, "THREAD_MIN_BYTES", 0)
    def tok(texts: list[str]) -> Encoding:  # a tokenizer as collate_fn
        return Encoding({"input_ids": torch.ones(len(texts), 4, dtype=torch.long)}, [[None, 0]] * len(texts))

    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = cpu_trainer(callbacks=[callback]).predict(Tagger(), DataLoader(["a b"] * 4, batch_size=2, collate_fn=tok))
    assert got == [[None, 0], [None, 0]]


def test_a_dataclass_batch_with_its_own_to_is_still_uploaded_ahead():
    """A dataclass is walked and rebuilt field by field (as Lightning's walk does), its .to() or not."""

    @dataclasses.dataclass
    class Batch:
        images: torch.Tensor
        labels: torch.Tensor

        def to(self, device: Any) -> Any:
            return Batch(self.images.to(device), self.labels.to(device))

    ops = RecordingOps()
    got = list(uploads([Batch(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))] * 2, ops=ops))
    assert all(isinstance(b, Batch) for b in got)
    assert [detail for what, _, detail in ops.log if what == "stage"] == [(4, 3), (4,)] * 2


def test_device_tensors_the_source_makes_in_the_thread_are_waited_for_and_marked_used():
    """A source doing GPU work itself (a lookup into a GPU table) runs on the uploads' stream in the thread:
    the consumer waits for it and marks its tensors used on its own stream, like the uploaded ones."""
    ops = RecordingOps()
    up = transfers.UploadsAhead(
        [{"image": torch.zeros(4), "ids": torch.zeros(3, device="meta")}, {"ids": torch.zeros(5, device="meta")}],
        "meta", ops=ops,
    )  # fmt: skip
    up.THREAD_MIN_BYTES = 0
    assert len(list(up)) == 2
    steps = consumer_steps(ops)
    assert [what for what, _ in steps].count("wait") == 2
    assert sorted(detail for what, detail in steps if what == "record_stream") == [(3,), (4,), (5,)]


def test_a_thread_that_fails_outside_reading_is_an_error_for_the_consumer_not_a_hang():
    class BrokenStream(RecordingOps):
        def in_thread(self, stream: Any) -> Any:
            if threading.current_thread().name == "lightning-trt-rtx-uploads":
                raise RuntimeError("no such device")
            return super().in_thread(stream)

    it = iter(uploads([torch.ones(1)] * 4, ops=BrokenStream()))
    start = time.perf_counter()  # every batch, the first too, is the thread's to read
    with pytest.raises(RuntimeError, match="no such device"):
        next(it)
    assert time.perf_counter() - start < 2.0


def test_iterates_once_and_rejects_bad_arguments():
    up = uploads([torch.ones(1)])
    list(up)
    with pytest.raises(RuntimeError, match="once"):
        iter(up)
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="depth"):
            transfers.UploadsAhead([], "cpu", depth=bad, ops=RecordingOps())
    with pytest.raises(TypeError, match="iterable"):
        transfers.UploadsAhead(42, "cpu", ops=RecordingOps())
    with pytest.raises(ValueError, match="CUDA device"):
        transfers.UploadsAhead([], "cpu")  # the real ops need a GPU
    assert transfers.HostCopies("cpu").device.type == "cpu"  # a CPU loop keeps its predictions as they are
    for bad in (None, True, 1.5):
        with pytest.raises(TypeError, match="device must be a torch.device, a str such as 'cuda:0' or a CUDA"):
            transfers.HostCopies(bad)
    for bad in ("gpu", "cuda:x", -1):
        with pytest.raises(ValueError, match=f"device {bad!r} is not a device: use e.g. 'cuda', 'cuda:1', 1 or 'cpu'"):
            transfers.HostCopies(bad)
        with pytest.raises(ValueError, match="is not a device"):
            transfers.UploadsAhead([], bad, ops=RecordingOps())


# --- Lightning's predict loop (the one private seam) ---------------------------------------------------


class Doubler(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.devices_seen: list[str] = []
        self.layer = torch.nn.Identity()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        x = batch["x"] if isinstance(batch, dict) else batch
        self.devices_seen.append(str(x.device))
        return x * 2


class UploadsOnCpu:
    """Routes the predict loop through ``UploadsAhead`` with the recording ops: the seam on a CPU host.
    ``direct``: the smallest batches are left unstaged, as on a GPU (else every batch is staged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, direct: bool = False) -> None:
        if not direct:
            monkeypatch.setattr(transfers.UploadsAhead, "DIRECT_MAX_BYTES", 0)
        self.ops: list[RecordingOps] = []
        original = transfers.UploadsAhead.__init__

        def init(up: Any, source: Any, device: Any, depth: int = 2, ops: Any = None, **options: Any) -> None:
            self.ops.append(RecordingOps())
            original(up, source, "cpu", depth, ops=self.ops[-1], **options)

        monkeypatch.setattr(transfers.UploadsAhead, "__init__", init)
        monkeypatch.setattr(_predict_loop, "why_not_upload", _predict_loop.why_not_wrap)
        monkeypatch.setattr(transfers, "why_not_on_cuda", lambda device: None)

    def staged(self) -> int:
        """Tensors the uploads staged in pinned memory (the seam's small batches: only that, Lightning's
        transfer moves them; never copied on the loop's stream by the uploads)."""
        log = [what for ops in self.ops for what, _, _ in ops.log]
        assert "copy_here" not in log
        return log.count("stage")


def cpu_trainer(**kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, **kwargs)  # fmt: skip


def test_trainer_predict_through_the_seam_gives_the_same_predictions_for_several_dataloaders(monkeypatch):
    seam = UploadsOnCpu(monkeypatch)
    first = DataLoader(torch.arange(10.0).reshape(10, 1), batch_size=3)  # a smaller last batch
    second = DataLoader([{"x": torch.full((2,), float(i))} for i in range(4)], batch_size=2)
    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = cpu_trainer(callbacks=[callback]).predict(Doubler(), [first, second])
    expected = cpu_trainer().predict(Doubler(), [first, second])
    assert [[p.tolist() for p in loader] for loader in got] == [[p.tolist() for p in loader] for loader in expected]
    # the batches went through the uploads (each batch's one tensor, staged)
    assert seam.staged() == 4 + 2
    assert callback.figures[0].uploads.startswith("ahead, depth 2: 6 batches")


def test_trainer_predict_leaves_batches_under_64_kib_to_lightning_and_the_figures_say_so(monkeypatch):
    seam = UploadsOnCpu(monkeypatch, direct=True)
    loader = DataLoader(torch.arange(10.0).reshape(10, 1), batch_size=3)
    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = cpu_trainer(callbacks=[callback]).predict(Doubler(), loader)
    assert [p.flatten().tolist() for p in got] == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0], [12.0, 14.0, 16.0], [18.0]]
    assert seam.staged() == 0
    assert callback.figures[0].uploads == "ahead, depth 2: 4 batches (4 under 64 KiB, not staged)"


def test_the_precision_plugin_alone_uploads_from_the_second_batch_and_times_the_loop(monkeypatch, messages):
    from lightning_trt_rtx import TRTRuntimePrecision

    seam = UploadsOnCpu(monkeypatch)
    loader = DataLoader(torch.arange(8.0).reshape(8, 1), batch_size=2)
    plugin = TRTRuntimePrecision(runtime_cache=None)
    got = cpu_trainer(plugins=[plugin]).predict(Doubler(), loader)
    assert [p.flatten().tolist() for p in got] == [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0], [12.0, 14.0]]
    # the first batch was fetched before the plugin's first step: the other three came through the uploads
    assert seam.staged() == 3
    summary = [m for m in messages.infos if m.startswith("TensorRT-RTX serving")]
    assert summary and "uploads: ahead, depth 2: 3 batches" in summary[-1]
    with pytest.raises(TypeError, match="upload_ahead must be True or False"):
        TRTRuntimePrecision(upload_ahead=1)  # type: ignore[arg-type]


def test_upload_ahead_false_and_host_side_hooks_leave_lightning_to_move_batches(monkeypatch):
    seam = UploadsOnCpu(monkeypatch)
    loader = DataLoader(torch.ones(4, 2), batch_size=2)
    off = TRTRuntimeSettings(runtime_cache=None, print_table=False, upload_ahead=False)
    cpu_trainer(callbacks=[off]).predict(Doubler(), loader)
    assert off.figures[0].uploads == "off: upload_ahead=False"

    class OnHost(Doubler):
        def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return batch + 1

    hooked = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = cpu_trainer(callbacks=[hooked]).predict(OnHost(), loader)
    assert [p.tolist() for p in got] == [[[4.0, 4.0], [4.0, 4.0]]] * 2  # the user's hook saw host batches
    reason = "off: OnHost overrides on_before_batch_transfer, which expects batches on the host"
    assert hooked.figures[0].uploads == reason
    assert seam.ops == []

    class IterStep(Doubler):
        def predict_step(self, dataloader_iter: Any) -> Any:
            batch, _, _ = next(dataloader_iter)
            return batch

    it_step = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    cpu_trainer(callbacks=[it_step]).predict(IterStep(), loader)
    assert it_step.figures[0].uploads == "off: predict_step takes dataloader_iter: it moves batches itself"


def test_on_cpu_the_loop_is_lightnings_own_and_the_figures_say_why():
    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = cpu_trainer(callbacks=[callback]).predict(Doubler(), DataLoader(torch.ones(4, 2), batch_size=2))
    assert len(got) == 2
    assert callback.figures[0].uploads == "off: the loop runs on cpu"
    with pytest.raises(TypeError, match="upload_ahead must be True or False"):
        TRTRuntimeSettings(upload_ahead="yes")  # type: ignore[arg-type]


def test_an_error_in_the_dataset_reaches_the_user_through_the_seam(monkeypatch):
    UploadsOnCpu(monkeypatch)

    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> torch.Tensor:
            if i == 4:
                raise RuntimeError("corrupt sample 4")
            return torch.ones(2)

    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    with pytest.raises(RuntimeError, match="corrupt sample 4"):
        cpu_trainer(callbacks=[callback]).predict(Doubler(), DataLoader(Broken(), batch_size=2))
    assert callback.session is None  # closed through on_exception
    alive = [t for t in threading.enumerate() if t.name == "lightning-trt-rtx-uploads"]
    assert alive == []


def test_the_seam_continues_lightnings_iterator_and_starts_no_workers_again(monkeypatch):
    UploadsOnCpu(monkeypatch)
    starts = []

    class Counted(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor([float(i)])

    class CountingLoader(DataLoader):
        def __iter__(self):
            starts.append(1)
            return super().__iter__()

    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = cpu_trainer(callbacks=[callback]).predict(Doubler(), CountingLoader(Counted(), batch_size=2, num_workers=1))
    assert [p.flatten().tolist() for p in got] == [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
    assert len(starts) == 1


def test_the_seam_exists_in_this_lightning_version():
    """The attributes the seam relies on (Lightning 2.6): a fetcher with an iterator at on_predict_start."""
    seen = {}

    class Look(Callback):
        def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            seen["reason"] = _predict_loop.why_not_wrap(trainer)
            fetcher = trainer.predict_loop._data_fetcher
            seen["iterator"] = fetcher.iterator is not None

    cpu_trainer(callbacks=[Look()]).predict(Doubler(), DataLoader(torch.ones(2, 1)))
    assert seen == {"reason": None, "iterator": True}


# --- DDP: the sampler Lightning injects still splits the batches --------------------------------------


class ShardedData(LightningDataModule):
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(16.0).reshape(16, 1), batch_size=2)


def test_the_seam_keeps_lightnings_sampler_injection(monkeypatch):
    """The sampler is injected before the loop starts, so the uploads read exactly this rank's shard
    (one process with a 2-rank sampler stand-in: the DDP subprocess test covers gloo)."""
    UploadsOnCpu(monkeypatch)
    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    model = Doubler()
    got = cpu_trainer(callbacks=[callback], limit_predict_batches=3).predict(model, datamodule=ShardedData())
    assert [p.flatten().tolist() for p in got] == [[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]]
    assert callback.figures[0].uploads.startswith("ahead, depth 2: 3 batches")


# --- predictions to the host, figures ------------------------------------------------------------------


def test_host_predictions_on_cpu_match_the_returned_predictions_per_dataloader():
    loaders = [DataLoader(torch.arange(6.0).reshape(6, 1), batch_size=4), DataLoader(torch.ones(2, 1))]
    collector = TRTHostPredictions()
    returned = cpu_trainer(callbacks=[collector]).predict(Doubler(), loaders)
    assert [[p.tolist() for p in loader] for loader in collector.predictions] == [
        [p.tolist() for p in loader] for loader in returned
    ]
    single = TRTHostPredictions()
    cpu_trainer(callbacks=[single]).predict(Doubler(), loaders[0], return_predictions=False)
    assert [p.tolist() for p in single.predictions] == [[[0.0], [2.0], [4.0], [6.0]], [[8.0], [10.0]]]


def test_a_session_without_cuda_gives_the_batches_as_they_are_and_says_so():
    from lightning_trt_rtx import ServingSession, TRTSettings

    loader = [torch.ones(2), torch.zeros(2)]
    copies = transfers.HostCopies("cpu")
    with ServingSession(torch.nn.Linear(2, 2), TRTSettings(runtime_cache=None)) as session:
        assert session.upload_ahead(loader, "cpu") is loader
        for batch in loader:
            copies.add(batch * 2)
        with pytest.raises(ValueError, match="depth"):
            session.upload_ahead(loader, "cpu", depth=0)
    assert [p.tolist() for p in copies.collect()] == [[2.0, 2.0], [0.0, 0.0]]
    assert session.figures.uploads == "off: the loop runs on cpu"


def test_uploads_that_fail_to_close_never_stop_the_session_closing(monkeypatch, tmp_path, fake_gpu, trt):
    """A CUDA error at the uploads' end (their stream cannot synchronise) is logged, and the session
    goes on closing (graphs, cache save, engines restored) instead of raising over the user's code."""

    class FailsAtTheEnd(RecordingOps):
        def finish(self, stream: Any) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    original = transfers.UploadsAhead.__init__
    monkeypatch.setattr(transfers, "why_not_on_cuda", lambda device: None)
    monkeypatch.setattr(
        transfers.UploadsAhead, "__init__",
        lambda up, source, device, depth=2, ops=None, **options: original(
            up, source, "cpu", depth, ops=FailsAtTheEnd(), **options
        ),
    )  # fmt: skip
    from lightning_trt_rtx import ServingSession, TRTSettings

    session = ServingSession(torch.nn.Linear(2, 2), TRTSettings(runtime_cache=str(tmp_path / "gpu-{gpu}.bin")))
    session.serve(warn_if_none=False)
    batches = iter(session.upload_ahead([torch.ones(2)] * 3, "cuda"))
    assert next(batches).tolist() == [1.0, 1.0]  # the loop stops early: its uploads close with the session
    figures = session.close()  # does not raise
    assert session.closed and figures is session.figures and session.uploads is None


def test_figures_show_the_step_gpu_time_beside_the_batch_time():
    row = RankFigures(rank=0, batches=10, mean_batch_ms=2.0, step_gpu_ms=1.9, uploads="ahead, depth 2: 10 batches")
    assert row.efficiency == pytest.approx(0.95)
    assert row.metrics()["trt_rtx/efficiency"] == pytest.approx(0.95)
    text = table([row])
    assert "step on GPU" in text and "1.900 ms (0.95)" in text and "ahead, depth 2: 10 batches" in text
    assert "efficiency 0.95" in row.summary()
    assert RankFigures().efficiency == 0.0  # not measured (CPU)
    assert RankFigures.from_dict(dataclasses.asdict(row)) == row
