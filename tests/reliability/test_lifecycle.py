"""Lifecycle with a real Trainer on CPU: repeated and reused loops, shared caches, errors and Ctrl-C, DDP.

The model holds real engine-less ``TorchTensorRTModule`` objects (settings given to them are what a
real engine would create its first execution context with) and runs a Linear in ``predict_step``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_trt_rtx import TRTRuntimePrecision, TRTRuntimeSettings, cache
from tests.procs.lightning_models import SessionSpy, make_trainer
from tests.reliability.workers import REPO, engine_model_class, make_payload


@pytest.fixture
def EngineModel(trt):
    return engine_model_class()


@pytest.fixture
def save_calls(monkeypatch):
    """Every RunCache.save that runs (the real one runs too), by path."""
    calls: list[str] = []
    real = cache.RunCache.save

    def spy(self):
        calls.append(self.path)
        return real(self)

    monkeypatch.setattr(cache.RunCache, "save", spy)
    return calls


def loader(batches: int = 4) -> DataLoader:
    return DataLoader(torch.randn(batches * 2, 4), batch_size=2)


def engine_state(model) -> list[tuple]:
    """Every field of every engine's RuntimeSettings (the cache compared by value or identity)."""
    return [
        (s.dynamic_shapes_kernel_specialization_strategy, s.cuda_graph_strategy, s.runtime_cache)
        for s in (e.runtime_settings for e in model.engines())
    ]


def with_custom_engine(model, trt):
    """Make the second engine start from non-default settings, so a restore to defaults would be caught."""
    model.trt[1].runtime_settings = trt.runtime.RuntimeSettings(
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=None,
    )
    return model


def seed(path: Path, payload: bytes) -> None:
    """A valid cache file whose mtime is the epoch: any save afterwards shows in the mtime."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    os.utime(path, (0, 0))


def assert_saved_since_seed(path: Path, payload: bytes) -> None:
    assert path.stat().st_mtime > 0, "no save happened"
    data = path.read_bytes()
    assert cache.check_bytes(data) is None and data == payload  # on CPU the handle holds what was loaded


def served_with(model, batch: int = 0) -> list:
    return model.seen[batch]


# --- repeated loops ---------------------------------------------------------------------------------


def test_several_predicts_in_one_process(tmp_path, real_cache_bytes, EngineModel, trt, save_calls, fake_gpu):
    """Three trainer.predict calls (a new Trainer each): served, saved and restored every time; one handle
    per run, each run reading the file again (the first finds it without a record, the others warm)."""
    template = str(tmp_path / "c" / "rank{rank}.bin")
    path = tmp_path / "c" / "rank0.bin"
    payload = make_payload(real_cache_bytes, "seed", size=60_000)
    model = with_custom_engine(EngineModel(), trt)
    initial = engine_state(model)
    handles, sources = [], []
    for call in range(3):
        seed(path, payload)
        model.seen.clear()
        callback = TRTRuntimeSettings(
            runtime_cache=template, cuda_graph_strategy="whole_graph_capture", print_table=False
        )
        predictions = make_trainer(tmp_path, [callback]).predict(model, loader(4))
        assert len(predictions) == 4
        assert len(model.seen) == 4
        for settings in model.seen:
            assert [s.cuda_graph_strategy for s in settings] == ["whole_graph_capture"] * 2
            assert [s.dynamic_shapes_kernel_specialization_strategy for s in settings] == ["lazy"] * 2
            assert settings[0].runtime_cache is settings[1].runtime_cache
        handles.append(model.seen[0][0].runtime_cache)
        assert engine_state(model) == initial, f"call {call}: engines not restored"
        assert_saved_since_seed(path, payload)
        assert save_calls == [str(path)] * (call + 1)
        (row,) = callback.figures
        assert (row.batches, row.engines, row.cache_bytes) == (4, 2, len(payload))
        sources.append(row.cache_source)
    assert sources == ["unverified", "warm", "warm"]  # the first save recorded this GPU
    assert len({id(h) for h in handles}) == 3  # one handle per run, none kept by the process


def test_one_trainer_reused_across_loops(tmp_path, real_cache_bytes, EngineModel, trt, save_calls):
    """One Trainer runs validate, test, predict and predict again: every loop served, saved and restored."""
    template = str(tmp_path / "c" / "rank{rank}.bin")
    path = tmp_path / "c" / "rank0.bin"
    payload = make_payload(real_cache_bytes, "seed", size=60_000)
    model = with_custom_engine(EngineModel(), trt)
    initial = engine_state(model)
    callback = TRTRuntimeSettings(
        runtime_cache=template, dynamic_shapes_kernel_specialization_strategy="none",
        loops=["validate", "test", "predict"], print_table=False,
    )
    trainer = make_trainer(tmp_path, [callback])
    runs = [
        lambda: trainer.validate(model, loader(3), verbose=False),
        lambda: trainer.test(model, loader(3), verbose=False),
        lambda: trainer.predict(model, loader(3)),
        lambda: trainer.predict(model, loader(2)),
    ]
    for i, run in enumerate(runs):
        seed(path, payload)
        model.seen.clear()
        run()
        assert model.seen, f"loop {i} ran no step"
        assert all(s.dynamic_shapes_kernel_specialization_strategy == "none" for step in model.seen for s in step)
        assert engine_state(model) == initial, f"loop {i}: engines not restored"
        assert_saved_since_seed(path, payload)
        assert len(save_calls) == i + 1
        assert callback.figures[0].batches == len(model.seen)


def test_unserved_loop_leaves_engines_alone(tmp_path, EngineModel, trt, save_calls):
    """A loop the callback does not serve (validate, with loops=['predict']) touches nothing."""
    model = with_custom_engine(EngineModel(), trt)
    initial = engine_state(model)
    callback = TRTRuntimeSettings(runtime_cache=str(tmp_path / "r{rank}.bin"), print_table=False)
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(model, loader(2), verbose=False)
    assert [step for step in model.seen] == [[s for s in (e.runtime_settings for e in model.engines())]] * 2
    assert engine_state(model) == initial and save_calls == []


# --- two modules, one file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spellings",
    [("{d}/shared/cache.bin", "{d}/shared/cache.bin"), ("{d}/shared/cache.bin", "{d}/shared/./sub/../cache.bin")],
    ids=["same-template", "same-file-other-spelling"],
)
def test_two_modules_on_one_file_each_run_reads_what_the_last_saved(
    tmp_path, real_cache_bytes, EngineModel, save_calls, fake_gpu, spellings
):
    """Two LightningModules whose templates (without {rank}) name one file: each run pools its engines'
    kernels in its own one handle, saves to the file, and the next run (any spelling) loads that save."""
    first, second = (s.format(d=tmp_path) for s in spellings)
    path = tmp_path / "shared" / "cache.bin"
    (tmp_path / "shared" / "sub").mkdir(parents=True)
    payload = make_payload(real_cache_bytes, "seed", size=60_000)
    seed(path, payload)
    model_a, model_b = EngineModel(), EngineModel(engines=3)
    cb_a, cb_b = (TRTRuntimeSettings(runtime_cache=t, print_table=False) for t in (first, second))
    spy_a, spy_b = SessionSpy(), SessionSpy()
    make_trainer(tmp_path, [cb_a, spy_a]).predict(model_a, loader(2))
    assert_saved_since_seed(path, payload)
    os.utime(path, (0, 0))  # the first run's save, with its record: the second run must save again
    make_trainer(tmp_path, [cb_b, spy_b]).predict(model_b, loader(2))
    for model, spy in ((model_a, spy_a), (model_b, spy_b)):
        handles = {id(s.runtime_cache) for step in model.seen for s in step}
        assert handles == {id(spy.only().cache.handle)}, "the engines of one run got different cache handles"
    assert spy_a.only().cache.handle is not spy_b.only().cache.handle  # one handle per run
    (row_a,), (row_b,) = cb_a.figures, cb_b.figures
    assert os.path.samefile(row_a.cache_path, path) and os.path.samefile(row_b.cache_path, path)
    assert (row_a.cache_source, row_a.cache_bytes) == ("unverified", len(payload))  # seed() writes no record
    # the second run loaded the first one's save, recorded as filled on this GPU, through its own spelling
    assert (row_b.cache_source, row_b.cache_bytes) == ("warm", len(payload))
    assert os.path.samefile(row_b.cache.loaded_from, path)
    assert_saved_since_seed(path, payload)
    assert len(save_calls) == 2


# --- configuration errors -------------------------------------------------------------------------------


def test_two_settings_callbacks_fail_at_trainer_construction(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `TRTRuntimeSettings`"):
        make_trainer(tmp_path, [TRTRuntimeSettings(), TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture")])


def test_conflicting_callback_and_plugin_fail_cleanly(tmp_path, real_cache_bytes, EngineModel, trt):
    """Different settings in the callback and the plugin: a ValueError naming both; engines left as they were."""
    model = with_custom_engine(EngineModel(), trt)
    initial = engine_state(model)
    trainer = make_trainer(
        tmp_path,
        [TRTRuntimeSettings(runtime_cache=None, cuda_graph_strategy="whole_graph_capture", print_table=False)],
        plugins=[TRTRuntimePrecision(runtime_cache=None)],
    )
    # checked at the callback's setup, which names itself first
    with pytest.raises(ValueError, match="TRTRuntimeSettings and TRTRuntimePrecision configure the same model"):
        trainer.predict(model, loader(2))
    assert model.seen == []
    assert engine_state(model) == initial


# --- errors inside the loop ------------------------------------------------------------------------------

SERVERS = {
    "callback": lambda t: dict(callbacks=[TRTRuntimeSettings(runtime_cache=t, cuda_graph_strategy="whole_graph_capture",
                                                             print_table=False)]),
    "plugin": lambda t: dict(plugins=[TRTRuntimePrecision(runtime_cache=t, cuda_graph_strategy="whole_graph_capture")]),
    "both": lambda t: dict(
        callbacks=[TRTRuntimeSettings(runtime_cache=t, cuda_graph_strategy="whole_graph_capture", print_table=False)],
        plugins=[TRTRuntimePrecision(runtime_cache=t, cuda_graph_strategy="whole_graph_capture")],
    ),
}


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_exception_in_predict_step_still_saves_and_reaches_the_user(
    tmp_path, real_cache_bytes, EngineModel, trt, save_calls, server
):
    template = str(tmp_path / "c" / "rank{rank}.bin")
    path = tmp_path / "c" / "rank0.bin"
    payload = make_payload(real_cache_bytes, "seed", size=60_000)
    seed(path, payload)
    error = ZeroDivisionError("user bug at batch 2")
    model = with_custom_engine(EngineModel(fail_at=2, error=error), trt)
    initial = engine_state(model)
    trainer = make_trainer(tmp_path, **SERVERS[server](template))
    with pytest.raises(ZeroDivisionError) as raised:
        trainer.predict(model, loader(4))
    assert raised.value is error and str(raised.value) == "user bug at batch 2"
    assert len(model.seen) == 3 and all(s.cuda_graph_strategy == "whole_graph_capture" for s in model.seen[2])
    assert_saved_since_seed(path, payload)
    assert save_calls == [str(path)], "the cache must be saved exactly once"
    assert engine_state(model) == initial
    # the process is usable afterwards: the next loop is served from the same handle
    model.fail_at = None
    seed(path, payload)
    assert len(make_trainer(tmp_path, **SERVERS[server](template)).predict(model, loader(2))) == 2
    assert_saved_since_seed(path, payload)


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_keyboard_interrupt_in_predict_step_still_saves(
    tmp_path, real_cache_bytes, EngineModel, trt, save_calls, server
):
    """Ctrl-C: Lightning 2.6.6 (trainer/call.py) runs on_exception and teardown, then sys.exit(1).

    What reaches the user is Lightning's SystemExit(1), with or without this package's callbacks
    (checked against a baseline Trainer without them); the cache is saved before it.
    """
    template = str(tmp_path / "c" / "rank{rank}.bin")
    path = tmp_path / "c" / "rank0.bin"
    payload = make_payload(real_cache_bytes, "seed", size=60_000)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as baseline:
            make_trainer(tmp_path).predict(EngineModel(fail_at=1, error=KeyboardInterrupt()), loader(3))
        seed(path, payload)
        model = with_custom_engine(EngineModel(fail_at=1, error=KeyboardInterrupt()), trt)
        initial = engine_state(model)
        with pytest.raises(SystemExit) as raised:
            make_trainer(tmp_path, **SERVERS[server](template)).predict(model, loader(3))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert raised.value.code == baseline.value.code == 1
    assert len(model.seen) == 2
    assert_saved_since_seed(path, payload)
    assert save_calls == [str(path)]
    assert engine_state(model) == initial


def test_exception_when_saving_fails_too(tmp_path, real_cache_bytes, EngineModel, trt, monkeypatch, messages):
    """The user's error still wins when the save on the error path fails as well (one warning, no masking)."""
    template = str(tmp_path / "c" / "rank{rank}.bin")
    path = tmp_path / "c" / "rank0.bin"
    payload = make_payload(real_cache_bytes, "seed", size=60_000)
    seed(path, payload)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    error = ValueError("user error")
    model = with_custom_engine(EngineModel(fail_at=0, error=error), trt)
    initial = engine_state(model)
    with pytest.raises(ValueError) as raised:
        make_trainer(tmp_path, **SERVERS["both"](template)).predict(model, loader(2))
    assert raised.value is error
    assert len(messages.matching("Could not save the kernel cache")) == 1
    assert path.read_bytes() == payload and path.stat().st_mtime == 0
    assert engine_state(model) == initial


# --- DDP on CPU ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_exception_on_every_rank_saves_every_rank(tmp_path, real_cache_bytes):
    """Trainer(devices=2, strategy='ddp') on CPU; predict_step raises on both ranks: both ranks' files saved."""
    template = str(tmp_path / "c" / "rank{rank}.bin")
    payloads = {rank: make_payload(real_cache_bytes, f"rank{rank}", size=50_000 + rank) for rank in range(2)}
    for rank, payload in payloads.items():
        seed(tmp_path / "c" / f"rank{rank}.bin", payload)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.workers", "ddp_predict",
         json.dumps({"template": template, "out_dir": str(out)})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: rank 0 and the rank-1 process it launches
    )
    try:
        try:
            log, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            pytest.fail(f"DDP run timed out:\n{log.decode()[-4000:]}")
        deadline = time.monotonic() + 60  # rank 1 is rank 0's child and may finish a moment later
        while len(list(out.glob("rank*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's group, if anything of it is left
    results = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    assert sorted(results) == [0, 1], log.decode()[-4000:]
    for rank, result in results.items():
        assert result["world_size"] == 2
        assert (result["raised"], result["message"], result["same_object"]) == ("RuntimeError", "boom", True), result
        assert result["batches_seen"] == 2 and result["applied"] == ["whole_graph_capture"] * 2, result
        assert result["restored"], result
        assert_saved_since_seed(tmp_path / "c" / f"rank{rank}.bin", payloads[rank])
        # each rank's figures are its own: its rank, its file, what it loaded (its own file, no GPU record on CPU)
        (row,) = result["figures"]
        assert (row["rank"], row["gpu"], row["engines"]) == (rank, "cpu", 2), row
        assert row["cache_path"] == str(tmp_path / "c" / f"rank{rank}.bin"), row
        assert (row["cache_source"], row["cache_bytes"], row["saved_bytes"]) == (
            "unverified", len(payloads[rank]), len(payloads[rank])
        ), row
        assert result["messages"] == [], result["messages"]  # nothing to warn about: each rank has its own file
