"""TRTRuntimeSettings and TRTCudaGraphs driven by a real Trainer on CPU.

The model holds real engine-less ``TorchTensorRTModule`` objects (settings given to them are what
``setup_engine`` would create the first execution context with) next to a Linear that really runs;
``predict_step`` records what every engine holds at that moment (``EngineModel.seen``).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimeSettings, _backend, cache
from lightning_trt_rtx.session import ServingSession
from lightning_trt_rtx.session import trainer_session as serving_session
from tests.conftest import FAKE_GPU, OTHER_GPU
from tests.procs.lightning_models import EngineModel, compiled_tree, predict_loader

NO_ENGINES = "No TensorRT engines found"


def make_trainer(tmp_path, callbacks=(), **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **kwargs,
    )


def assert_served(settings_seen: list[Any], cb: TRTRuntimeSettings) -> Any:
    """Every engine holds the callback's strategies and one shared cache handle; returns the handle."""
    assert settings_seen, "no engine seen"
    handles = {id(rs.runtime_cache) for rs in settings_seen}
    assert len(handles) == 1, f"engines hold {len(handles)} different cache handles"
    for rs in settings_seen:
        assert rs.cuda_graph_strategy == cb.settings.cuda_graph_strategy
        assert (
            rs.dynamic_shapes_kernel_specialization_strategy
            == cb.settings.dynamic_shapes_kernel_specialization_strategy
        )
    return settings_seen[0].runtime_cache


def snapshot(model: EngineModel) -> list[Any]:
    return [e.runtime_settings for e in model.engines()]


def assert_restored(model: EngineModel, prior: list[Any]) -> None:
    now = snapshot(model)
    assert len(now) == len(prior)
    assert all(a is b for a, b in zip(now, prior)), f"settings not restored: {now} vs {prior}"


class SessionSpy(Callback):
    """Records the run's serving session (``serving_session(trainer)``) at setup and at every batch."""

    def __init__(self) -> None:
        self.sessions: list[ServingSession | None] = []

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self.sessions.append(serving_session(trainer))

    def on_predict_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self.sessions.append(serving_session(trainer))


def assert_run_closed(cb: TRTRuntimeSettings, spy: SessionSpy) -> ServingSession:
    """The run had one session, the callback's; it is closed and dropped: nothing stays active."""
    seen = {id(session) for session in spy.sessions}
    assert len(seen) == 1 and spy.sessions[0] is not None, spy.sessions
    session = spy.sessions[0]
    assert session.closed
    assert cb.session is None
    return session


# --- settings, cache handle, figures -------------------------------------------------------------


def test_settings_on_every_engine_before_first_step_then_restored(tmp_path, trt):
    model = EngineModel()
    assert len(model.engines()) == 3  # two direct, one nested two levels down
    prior = snapshot(model)
    assert all(isinstance(rs.runtime_cache, str) for rs in prior)  # upstream default: a path string
    template = str(tmp_path / "k-{rank}-of-{world_size}.bin")
    cb = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=template,
    )
    spy = SessionSpy()
    out = make_trainer(tmp_path, [cb, spy]).predict(model, predict_loader(batches=3))

    assert len(out) == 3 and out[0].shape == (2, 2)  # the Linear really ran
    assert len(model.seen) == 3
    handle = assert_served(model.seen[0], cb)
    assert isinstance(handle, trt.runtime.RuntimeCache)
    for step in model.seen[1:]:  # the same handle for the whole loop
        assert assert_served(step, cb) is handle
    assert_restored(model, prior)

    (figures,) = cb.figures
    assert figures.engines == 3
    assert figures.batches == 3
    assert figures.cache_source == "cold"
    assert figures.cache_path == str(tmp_path / "k-0-of-1.bin")
    assert figures.first_batch_ms > 0 and figures.mean_batch_ms > 0
    # a cold, empty cache is never written: no file to trip a later run
    assert not os.path.exists(figures.cache_path)
    session = assert_run_closed(cb, spy)
    assert session.cache is not None and session.cache.handle is handle  # the run's one handle
    assert session.figures is figures


def test_own_cache_file_loaded_and_saved(tmp_path, real_cache_bytes, fake_gpu):
    own = tmp_path / "rank0.bin"
    own.write_bytes(real_cache_bytes)  # no record of the GPU that filled it (copied, or an older version)
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(EngineModel(), predict_loader())

    (figures,) = cb.figures
    assert figures.cache_source == "unverified" and figures.cache.applies == "unknown"
    assert figures.cache_bytes == len(real_cache_bytes)
    assert figures.saved_bytes == len(real_cache_bytes)
    assert own.read_bytes() == real_cache_bytes
    assert not (tmp_path / "rank0.bin.tmp").exists()
    # the save recorded this GPU: the next run's load of its own file is warm
    record = cache.read_record(str(own))
    assert record is not None and record.gpu_uuid == fake_gpu.uuid
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(EngineModel(), predict_loader())
    (figures,) = cb.figures
    assert figures.cache_source == "warm" and figures.warm and figures.cache.applies == "yes"
    assert figures.gpu == fake_gpu.id
    assert figures.cache_bytes == figures.saved_bytes == len(real_cache_bytes)
    assert own.read_bytes() == real_cache_bytes


def test_cache_seeded_from_sibling_rank_and_saved_to_own_file(tmp_path, real_cache_bytes, fake_gpu):
    # another rank's file, recorded as filled on this GPU: seeding is only from same-GPU files
    _seed_sibling(tmp_path, real_cache_bytes, rank=3)
    model = EngineModel()
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(model, predict_loader())

    (figures,) = cb.figures
    assert figures.cache_source == "seeded" and figures.warm
    assert figures.cache.loaded_from == str(tmp_path / "rank3.bin")
    assert figures.cache_path == str(tmp_path / "rank0.bin")
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert cache.check_bytes((tmp_path / "rank0.bin").read_bytes()) is None
    assert cache.read_record(str(tmp_path / "rank0.bin")).gpu_uuid == fake_gpu.uuid


def test_sibling_filled_on_another_gpu_is_not_seeded(tmp_path, real_cache_bytes, fake_gpu):
    (tmp_path / "rank3.bin").write_bytes(real_cache_bytes)  # no record: which GPU filled it is unknown
    _seed_sibling(tmp_path, real_cache_bytes, rank=5, gpu=OTHER_GPU)
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(EngineModel(), predict_loader())
    (figures,) = cb.figures
    assert figures.cache_source == "cold" and figures.cache_bytes == 0
    assert not (tmp_path / "rank0.bin").exists()  # nothing loaded, nothing compiled on CPU: nothing saved


@pytest.mark.parametrize("on_gpu", [False, True], ids=["no-cuda", "fake-gpu"])
def test_default_template_resolves_per_gpu_under_versioned_dir(tmp_path, monkeypatch, on_gpu):
    gpu = FAKE_GPU if on_gpu else cache.Gpu()
    monkeypatch.setattr(cache, "current_gpu", lambda: gpu)
    cb = TRTRuntimeSettings()  # "default", resolved at construction under the isolated dir
    assert cb.settings.runtime_cache == cache.default_template()
    make_trainer(tmp_path, [cb]).predict(EngineModel(), predict_loader(batches=1))
    (figures,) = cb.figures
    expected = os.path.join(
        str(tmp_path / "default-cache"),
        f"{gpu.sm}-trtrtx{_backend.trt_version() or 'none'}-cuda{torch.version.cuda or 'none'}",
        f"gpu-{'3b6d1a2c' if on_gpu else 'cpu'}.bin",
    )
    assert figures.cache_path == expected
    assert figures.gpu == ("3b6d1a2c" if on_gpu else "cpu")


def test_runtime_cache_none_gives_engines_no_handle(tmp_path):
    model = EngineModel()
    cb = TRTRuntimeSettings(runtime_cache=None)
    make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=1))
    assert all(rs.runtime_cache is None for rs in model.seen[0])
    assert cb.figures[0].cache_source == "none"
    assert cb.figures[0].engines == 3


def test_one_handle_per_run_and_each_run_reloads_the_file(tmp_path, real_cache_bytes, fake_gpu):
    """Within one run every engine (of every compiled child) shares the run's handle; each new run
    opens its own handle and reads the file again, even on the same file in the same process."""
    template = str(tmp_path / "rank{rank}.bin")
    (tmp_path / "rank0.bin").write_bytes(real_cache_bytes)
    first, second = EngineModel(), EngineModel()
    first.head = compiled_tree()
    cb1, cb2 = TRTRuntimeSettings(runtime_cache=template), TRTRuntimeSettings(runtime_cache=template)
    make_trainer(tmp_path, [cb1]).predict(first, predict_loader(batches=1))
    assert len(first.seen[0]) == 6
    first_handle = assert_served(first.seen[0], cb1)  # both compiled children: one handle
    make_trainer(tmp_path, [cb2]).predict(second, predict_loader(batches=1))
    second_handle = assert_served(second.seen[0], cb2)
    assert second_handle is not first_handle
    # the second run read the file the first one saved (with its record): warm, not the first run's handle
    assert cb1.figures[0].cache_source == "unverified"
    assert cb2.figures[0].cache_source == "warm"
    assert cb2.figures[0].cache_bytes == len(real_cache_bytes)
    other = EngineModel()
    make_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=str(tmp_path / "b{rank}.bin"))]).predict(
        other, predict_loader(batches=1)
    )
    assert other.seen[0][0].runtime_cache is not first_handle
    assert other.seen[0][0].runtime_cache is not second_handle


def test_figures_reach_the_logger(tmp_path):
    logger = CSVLogger(tmp_path, name="logs")
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb], logger=logger).predict(EngineModel(), predict_loader(batches=2))
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        header, row = f.read().strip().splitlines()[:2]
    values = dict(zip(header.split(","), row.split(",")))
    assert float(values["trt_rtx/rank0/engines"]) == 3
    assert float(values["trt_rtx/rank0/batches"]) == 2


def test_state_dict_records_settings():
    cb = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache="/x/{rank}.bin", loops=["predict", "test"]
    )
    assert cb.state_key == "TRTRuntimeSettings"
    assert cb.state_dict() == {
        "settings": {
            "cuda_graph_strategy": "whole_graph_capture",
            "dynamic_shapes_kernel_specialization_strategy": "lazy",
            "runtime_cache": "/x/{rank}.bin",
        },
        "loops": ["predict", "test"],
    }
    other = TRTRuntimeSettings(runtime_cache=None)
    other.load_state_dict(cb.state_dict())
    assert other.checkpoint_settings == cb.state_dict()["settings"]
    assert other.settings.runtime_cache is None  # its own arguments still decide


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(cuda_graph_strategy="whole_graph"), ValueError, r"'disabled', 'whole_graph_capture'"),
        (dict(cuda_graph_strategy=1), TypeError, r"'disabled', 'whole_graph_capture'"),
        (dict(dynamic_shapes_kernel_specialization_strategy="fast"), ValueError, r"'lazy', 'eager', 'none'"),
        (dict(loops=["fit"]), ValueError, r"\['predict', 'validate', 'test'\]"),
        (dict(loops=[]), ValueError, r"\['predict', 'validate', 'test'\]"),
        (dict(loops="predict"), TypeError, r"\['predict', 'validate', 'test'\]"),
        (dict(runtime_cache="/c/{device}.bin"), ValueError, r"Valid placeholders: \{gpu\}, \{rank\}"),
        (dict(runtime_cache="/c/{rank.bin"), ValueError, r"Malformed cache path template"),
        (dict(runtime_cache=""), ValueError, r"pass None"),
        # a directory: the run would go cold and fail to save at its end
        (dict(runtime_cache="/tmp/kernels/"), ValueError, r"names a directory: it must name a file, e\.g\. '/tmp/kern"),
        (dict(runtime_cache="kdir/{gpu}/"), ValueError, r"names a directory"),
        (dict(runtime_cache="s3://bucket/kernels/"), ValueError, r"names a directory"),
        (dict(runtime_cache=os.path.dirname(os.path.abspath(__file__))), ValueError, r"names a directory"),
        (dict(runtime_cache="file://" + os.path.dirname(os.path.abspath(__file__))), ValueError, r"names a directory"),
        (dict(print_table="yes"), TypeError, r"print_table must be True or False; got str 'yes'"),
        (dict(print_table=1), TypeError, r"print_table must be True or False; got int 1"),
        (dict(print_table=None), TypeError, r"print_table must be True or False"),
    ],
)
def test_settings_callback_rejects_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TRTRuntimeSettings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(targets="trt"), TypeError, "list of attribute names"),
        (dict(targets=["trt", "not a name"]), TypeError, "list of attribute names"),
        (dict(targets=[1]), TypeError, "list of attribute names"),
        (dict(loops=["train"]), ValueError, r"\['predict', 'validate', 'test'\]"),
    ],
)
def test_graphs_callback_rejects_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TRTCudaGraphs(**kwargs)


def test_two_settings_callbacks_rejected_at_trainer_construction(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `TRTRuntimeSettings`"):
        make_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=None), TRTRuntimeSettings(runtime_cache=None)])


# --- where engines come from ---------------------------------------------------------------------


def test_engines_created_in_configure_model(tmp_path, messages):
    model = EngineModel(engines_in="configure_model")
    assert model.engines() == []
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=2))
    # Callback.setup runs before configure_model: no "no engines" warning for engines that come later
    assert messages.matching(NO_ENGINES) == []
    assert len(model.seen[0]) == 3
    assert_served(model.seen[0], cb)
    assert cb.figures[0].engines == 3
    assert all(rs.cuda_graph_strategy == "disabled" for rs in snapshot(model))  # restored


@pytest.fixture
def cpu_state_dict_loading(monkeypatch):
    """Loading an engine-less TorchTensorRTModule's state builds ``CompilationSettings()``, whose default
    device asks ``torch.cuda.current_device()``: answer it on this CUDA-less host (as the backend does
    while importing torch_tensorrt). On a GPU host nothing is faked."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def _fit_and_save_checkpoint(tmp_path, callbacks=()) -> str:
    model = EngineModel()
    trainer = make_trainer(tmp_path, callbacks, max_steps=1)
    trainer.fit(model, predict_loader(batches=1))
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_predict_from_checkpoint(tmp_path, cpu_state_dict_loading):
    saved_with = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    ckpt_path = _fit_and_save_checkpoint(tmp_path, [saved_with])
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["callbacks"]["TRTRuntimeSettings"] == saved_with.state_dict()
    assert any(k.startswith("trt.e0.") for k in ckpt["state_dict"])  # the engines are in the checkpoint

    model = EngineModel()
    prior = snapshot(model)
    cb = TRTRuntimeSettings(
        dynamic_shapes_kernel_specialization_strategy="none", runtime_cache=str(tmp_path / "r{rank}.bin")
    )
    make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=2), ckpt_path=ckpt_path)

    assert cb.checkpoint_settings == saved_with.state_dict()["settings"]
    for step in model.seen:
        handle = assert_served(step, cb)  # this callback's settings, not the checkpoint's
        assert handle is not None
    assert_restored(model, prior)
    # the restored weights are the checkpoint's
    torch.testing.assert_close(model.linear.weight, ckpt["state_dict"]["linear.weight"])


class ResetOnLoad(EngineModel):
    """Upstream's ``set_extra_state`` resets a real engine's settings to ``RuntimeSettings(runtime_cache=None)``.

    Engine-less modules keep theirs, so this hook does the same reset during the checkpoint restore
    (which Lightning runs after ``Callback.setup`` applied the settings).
    """

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from lightning_trt_rtx import _backend

        for engine in self.engines():
            engine._runtime_settings = _backend.runtime_settings_class()(runtime_cache=None)
        self.reset_during_restore = True


def test_settings_reapplied_after_checkpoint_restore_resets_engines(tmp_path, cpu_state_dict_loading):
    ckpt_path = _fit_and_save_checkpoint(tmp_path)
    model = ResetOnLoad()
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=1), ckpt_path=ckpt_path)
    assert model.reset_during_restore
    handle = assert_served(model.seen[0], cb)
    assert handle is not None


# --- errors and interrupts -----------------------------------------------------------------------


def _seed_sibling(tmp_path, data: bytes, rank: int = 7, gpu: cache.Gpu = FAKE_GPU) -> str:
    """A valid cache for another rank, recorded as filled on ``gpu``; on that GPU (``fake_gpu``) this
    rank starts seeded from it, and its own file appears only if saved."""
    stats = cache.save(str(tmp_path / f"rank{rank}.bin"), data, placement=cache.Placement(rank=rank, gpu=gpu))
    assert stats.saved, stats.save_error
    return str(tmp_path / "rank{rank}.bin")


def test_exception_in_predict_step_saves_restores_and_reraises(tmp_path, real_cache_bytes, fake_gpu):
    error = ValueError("boom in predict_step")
    model = EngineModel(fail_at=1, error=error)
    prior = snapshot(model)
    cb = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=_seed_sibling(tmp_path, real_cache_bytes)
    )
    spy = SessionSpy()
    trainer = make_trainer(tmp_path, [cb, spy])
    with pytest.raises(ValueError, match="boom in predict_step") as excinfo:
        trainer.predict(model, predict_loader(batches=3))

    assert excinfo.value is error
    assert len(model.seen) == 2
    assert_served(model.seen[1], cb)
    own = tmp_path / "rank0.bin"
    assert own.read_bytes() == real_cache_bytes  # saved in on_exception
    assert_restored(model, prior)
    session = assert_run_closed(cb, spy)
    assert cb.figures == [session.figures] and cb.figures[0].cache_source == "seeded"
    assert cb.figures[0].saved_bytes == len(real_cache_bytes)
    assert trainer.state.status == "interrupted"


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_keyboard_interrupt_in_predict_step_saves_and_restores(tmp_path, real_cache_bytes, restore_sigint, fake_gpu):
    model = EngineModel(fail_at=0, error=KeyboardInterrupt())
    prior = snapshot(model)
    cb = TRTRuntimeSettings(runtime_cache=_seed_sibling(tmp_path, real_cache_bytes))
    # Lightning 2.6 (trainer/call.py): on KeyboardInterrupt it runs on_exception and the strategy
    # teardown, then calls sys.exit(1)
    with pytest.raises(SystemExit) as excinfo:
        make_trainer(tmp_path, [cb]).predict(model, predict_loader())
    assert excinfo.value.code == 1
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)


def test_zero_batches(tmp_path, real_cache_bytes):
    own = tmp_path / "rank0.bin"
    own.write_bytes(real_cache_bytes)
    model = EngineModel()
    prior = snapshot(model)
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "rank{rank}.bin"))
    spy = SessionSpy()
    out = make_trainer(tmp_path, [cb, spy]).predict(model, predict_loader(batches=0))
    assert out is None
    assert model.seen == []
    assert_restored(model, prior)
    assert_run_closed(cb, spy)  # teardown closed it
    (figures,) = cb.figures
    assert figures.batches == 0 and figures.engines == 3
    assert own.read_bytes() == real_cache_bytes
    assert not (tmp_path / "rank0.bin.corrupt").exists() and not (tmp_path / "rank0.bin.tmp").exists()


def test_repeated_predict_with_one_trainer(tmp_path):
    model = EngineModel()
    prior = snapshot(model)
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "rank{rank}.bin"))
    trainer = make_trainer(tmp_path, [cb])
    handles, figures = [], []
    for batches in (2, 3, 1):
        trainer.predict(model, predict_loader(batches=batches))
        handles.append(assert_served(model.seen[-1], cb))
        assert_restored(model, prior)
        assert cb.figures[0].batches == batches
        assert cb.figures[0].engines == 3
        assert cb.session is None
        figures.append(cb.figures[0])
    assert len(model.seen) == 6
    # each run (each predict call) opens its own handle and reads the file again
    assert len({id(h) for h in handles}) == 3
    assert [f.batches for f in figures] == [2, 3, 1]  # each run's figures are its own


def test_no_engines_one_warning_and_nothing_else(tmp_path, messages):
    model = EngineModel(engines_in="none")
    cb = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "c" / "rank{rank}.bin")
    )
    trainer = make_trainer(tmp_path, [cb, TRTCudaGraphs()])
    out = trainer.predict(model, predict_loader(batches=2))
    trainer.predict(model, predict_loader(batches=1))
    (message,) = messages.matching(NO_ENGINES)
    assert "EngineModel" in message
    assert len(out) == 2
    assert model.seen_modes == [0, 0, 0]  # no graph scope opened either
    assert not (tmp_path / "c").exists()
    assert cb.figures[0].engines == 0 and cb.figures[0].cache_source == "none"
    assert model.seen_children[0].keys() == {"linear"}


def test_loops_argument_selects_served_loops(tmp_path):
    model = EngineModel()
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, loops=["validate"])
    trainer = make_trainer(tmp_path, [cb])
    trainer.predict(model, predict_loader(batches=1))
    assert all(rs.cuda_graph_strategy == "disabled" for rs in model.seen[0])  # predict not served
    assert cb.figures == []
    trainer.validate(model, predict_loader(batches=2))
    assert all(rs.cuda_graph_strategy == "whole_graph_capture" for rs in model.seen[-1])
    assert cb.figures[0].batches == 2
    assert all(rs.cuda_graph_strategy == "disabled" for rs in snapshot(model))


# --- CUDA graphs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("graphs_first", [True, False], ids=["graphs-first", "settings-first"])
def test_real_cudagraphs_scope_inside_settings(tmp_path, graphs_first):
    """The real ``enable_cudagraphs`` runs on CPU for a module without graph breaks (subgraph mode)."""
    model = EngineModel()
    prior = snapshot(model)
    settings = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    callbacks = [TRTCudaGraphs(), settings] if graphs_first else [settings, TRTCudaGraphs()]
    assert _backend.cudagraphs_mode() == 0
    make_trainer(tmp_path, callbacks).predict(model, predict_loader(batches=2))
    assert model.seen_modes == [1, 1]  # SUBGRAPH_CUDAGRAPHS while serving
    assert_served(model.seen[0], settings)
    assert _backend.cudagraphs_mode() == 0  # the process-global mode is back
    assert_restored(model, prior)


def test_real_cudagraphs_scope_closed_on_exception(tmp_path):
    error = RuntimeError("inside graphs")
    model = EngineModel(fail_at=0, error=error)
    with pytest.raises(RuntimeError, match="inside graphs") as excinfo:
        make_trainer(tmp_path, [TRTCudaGraphs()]).predict(model, predict_loader())
    assert excinfo.value is error
    assert model.seen_modes == [1]
    assert _backend.cudagraphs_mode() == 0


class GraphsWrapper(nn.Module):
    """Stands in for ``CudaGraphsTorchTensorRTModule`` (needs CUDA): wraps the compiled module."""

    def __init__(self, compiled_module: nn.Module) -> None:
        super().__init__()
        self.compiled_module = compiled_module


class RecordingCudaGraphs:
    """Replaces ``_backend.enable_cudagraphs`` (our boundary) with a recording context manager.

    ``wrap=True`` behaves like a model with graph breaks: ``__enter__`` returns a new wrapper;
    ``wrap=None`` does as upstream: wraps only modules with graph breaks.
    """

    def __init__(self, wrap: bool | None = True) -> None:
        self.wrap = wrap
        self.events: list[tuple] = []

    def __call__(self, module: nn.Module, cuda_graph_strategy: str | None):
        @contextmanager
        def scope():
            engines = [m for m in module.modules() if _backend.is_trt_module(m)]
            self.events.append(("enter", module, cuda_graph_strategy, [e.runtime_settings for e in engines]))
            try:
                wrap = _backend.has_graph_breaks(module) if self.wrap is None else self.wrap
                yield GraphsWrapper(module) if wrap else module
            finally:
                self.events.append(("exit", module))

        return scope()

    def entered(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "enter"]

    def exited(self) -> list[tuple]:
        return [e for e in self.events if e[0] == "exit"]


@pytest.fixture
def recording_graphs(monkeypatch):
    recorder = RecordingCudaGraphs()
    monkeypatch.setattr(_backend, "enable_cudagraphs", recorder)
    return recorder


@pytest.mark.parametrize("engines_in", ["init", "configure_model"])
@pytest.mark.parametrize("graphs_first", [True, False], ids=["graphs-first", "settings-first"])
def test_graphs_wrapper_swapped_in_for_the_loop(tmp_path, recording_graphs, graphs_first, engines_in):
    # engines made in configure_model get no settings in Callback.setup: with the graphs callback
    # listed first, its scope opens before TRTRuntimeSettings' on_predict_start, and must still see them
    model = EngineModel(engines_in=engines_in)
    settings = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin")
    )
    callbacks = [TRTCudaGraphs(), settings] if graphs_first else [settings, TRTCudaGraphs()]
    make_trainer(tmp_path, callbacks).predict(model, predict_loader(batches=2))

    original = model.trt
    (enter,) = recording_graphs.entered()
    _, module, strategy, held = enter
    assert module is original
    assert strategy == "whole_graph_capture"
    assert len(held) == 3
    assert_served(held, settings)  # settings were on the engines when the scope opened
    assert len(recording_graphs.exited()) == 1 and recording_graphs.events[-1] == ("exit", original)
    for children in model.seen_children:  # calls went through the wrapper during the loop
        assert isinstance(children["trt"], GraphsWrapper) and children["trt"].compiled_module is original
    assert not isinstance(model.trt, GraphsWrapper)  # put back afterwards
    # restored: upstream's defaults again
    assert all(rs.cuda_graph_strategy == "disabled" and isinstance(rs.runtime_cache, str) for rs in snapshot(model))


def test_graphs_strategy_not_passed_when_disabled(tmp_path, recording_graphs):
    settings = TRTRuntimeSettings(cuda_graph_strategy="disabled", runtime_cache=None)
    make_trainer(tmp_path, [settings, TRTCudaGraphs()]).predict(EngineModel(), predict_loader(batches=1))
    (enter,) = recording_graphs.entered()
    assert enter[2] is None
    # graphs alone, no settings callback: no strategy either
    make_trainer(tmp_path, [TRTCudaGraphs()]).predict(EngineModel(), predict_loader(batches=1))
    assert recording_graphs.entered()[1][2] is None


def test_graphs_scope_closed_and_attribute_restored_on_exception(
    tmp_path, recording_graphs, real_cache_bytes, fake_gpu
):
    error = ValueError("fails inside the graphs scope")
    model = EngineModel(fail_at=1, error=error)
    original = model.trt
    prior = snapshot(model)
    settings = TRTRuntimeSettings(runtime_cache=_seed_sibling(tmp_path, real_cache_bytes))
    with pytest.raises(ValueError, match="fails inside") as excinfo:
        make_trainer(tmp_path, [TRTCudaGraphs(), settings]).predict(model, predict_loader())
    assert excinfo.value is error
    assert isinstance(model.seen_children[1]["trt"], GraphsWrapper)
    assert recording_graphs.events[-1] == ("exit", original)
    assert model.trt is original
    assert_restored(model, prior)
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes


def test_each_compiled_submodule_gets_its_own_scope(tmp_path, recording_graphs):
    model = EngineModel()
    model.head = compiled_tree()  # a second compiled child
    originals = {"trt": model.trt, "head": model.head}
    settings = TRTRuntimeSettings(runtime_cache=str(tmp_path / "r{rank}.bin"))
    make_trainer(tmp_path, [TRTCudaGraphs(), settings]).predict(model, predict_loader(batches=1))

    assert [e[1] for e in recording_graphs.entered()] == [originals["trt"], originals["head"]]
    # innermost first on the way out
    assert [e[1] for e in recording_graphs.exited()] == [originals["head"], originals["trt"]]
    for name, original in originals.items():
        wrapped = model.seen_children[0][name]
        assert isinstance(wrapped, GraphsWrapper) and wrapped.compiled_module is original
        assert getattr(model, name) is original
    assert len(model.seen[0]) == 6
    assert_served(model.seen[0], settings)  # one handle for both compiled children


def test_graphs_targets_select_attributes(tmp_path, recording_graphs):
    model = EngineModel()
    model.head = compiled_tree()
    make_trainer(tmp_path, [TRTCudaGraphs(targets=["head"])]).predict(model, predict_loader(batches=1))
    (enter,) = recording_graphs.entered()
    assert enter[1] is model.head
    assert not isinstance(model.seen_children[0]["trt"], GraphsWrapper)


def test_graphs_unknown_target_fails_naming_found_attributes(tmp_path, recording_graphs):
    model = EngineModel()
    prior = snapshot(model)
    settings = TRTRuntimeSettings(runtime_cache=None)
    with pytest.raises(AttributeError, match=r"no attribute 'missing'.*Compiled attributes found: \['trt'\]"):
        make_trainer(tmp_path, [settings, TRTCudaGraphs(targets=["missing"])]).predict(model, predict_loader())
    assert recording_graphs.events == []
    assert model.seen == []
    assert_restored(model, prior)


def test_cuda_graphs_rejects_an_empty_target_list():
    from lightning_trt_rtx import TRTCudaGraphs

    with pytest.raises(ValueError, match="pass None for every compiled one"):
        TRTCudaGraphs(targets=[])


# --- found in review ------------------------------------------------------------------------------


def _cpu_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    from tests.procs.lightning_models import make_trainer

    return make_trainer(tmp_path, callbacks, **kwargs)


def test_validation_inside_fit_keeps_settings_across_epochs_and_saves_once(tmp_path, monkeypatch, real_cache_bytes):
    """loops=["validate"] in trainer.fit: applied once, engines keep their context every epoch, one save."""
    saves = []
    original = cache.save
    monkeypatch.setattr(cache, "save", lambda *a, **k: saves.append(a[0]) or original(*a, **k))
    template = str(tmp_path / "r{rank}.bin")
    (tmp_path / "r0.bin").write_bytes(real_cache_bytes)
    model = EngineModel()
    prior = [e.runtime_settings for e in model.engines()]
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=template, loops=["validate"])
    trainer = _cpu_trainer(tmp_path, [callback], max_epochs=3, limit_train_batches=1, limit_val_batches=2,
                           num_sanity_val_steps=0)
    trainer.fit(model, predict_loader(batches=2), predict_loader(batches=2))
    assert len(model.seen) == 6  # 3 epochs x 2 validation batches
    handles = {id(s.runtime_cache) for step in model.seen for s in step}
    assert len(handles) == 1 and all(s.cuda_graph_strategy == "whole_graph_capture" for st in model.seen for s in st)
    assert saves == [str(tmp_path / "r0.bin")]  # once, at teardown
    assert [e.runtime_settings for e in model.engines()] == prior  # restored at the end of fit
    assert callback.figures and callback.figures[0].engines == len(prior)


def test_turning_the_cache_off_drops_the_previous_runs_handle(tmp_path):
    model = EngineModel()
    _cpu_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=str(tmp_path / "r{rank}.bin"))]).predict(
        model, predict_loader()
    )
    assert all(s.runtime_cache is not None for s in model.seen[-1])
    _cpu_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=None)]).predict(model, predict_loader())
    assert all(s.runtime_cache is None for s in model.seen[-1])


def test_engines_are_restored_even_when_saving_fails_unexpectedly(tmp_path, monkeypatch, messages):
    model = EngineModel()
    prior = [e.runtime_settings for e in model.engines()]

    def broken(self):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(cache.RunCache, "save", broken)
    callback = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin")
    )
    predictions = _cpu_trainer(tmp_path, [callback]).predict(model, predict_loader())
    assert len(messages.matching("disk controller on fire")) == 1
    assert len(predictions) == 3
    assert [e.runtime_settings for e in model.engines()] == prior


# --- graph scopes open all-or-nothing -------------------------------------------------------------


@pytest.fixture
def cudagraphs_mode_guard(trt):
    """torch_tensorrt's process-global CUDA-graphs mode before the test; put back afterwards whatever
    the test left, so one failure cannot leak into the tests after it."""
    module = sys.modules["torch_tensorrt.runtime._cudagraphs"]
    before = module._PY_RT_CUDAGRAPHS
    yield int(before)
    if module._PY_RT_CUDAGRAPHS != before:
        module._PY_RT_CUDAGRAPHS = before
        if trt.ENABLED_FEATURES.torch_tensorrt_runtime:
            torch.ops.tensorrt.set_cudagraphs_mode(before)


def collect_half_built_wrappers() -> None:
    """Upstream's wrapper whose ``__init__`` failed raises in ``__del__`` (it has no ``cudagraph`` yet).
    Collect it now: left to a garbage collection during pytest's report, it makes CPython 3.11 fail
    compiling the report (``SystemError: AST constructor recursion depth mismatch``), an INTERNALERROR."""
    gc.collect()


def graph_breaks(tree: nn.Module) -> nn.Module:
    """Give a compiled tree PyTorch ops between its engines, as upstream names them: ``_run_on_gpu_0``."""
    tree._run_on_gpu_0 = nn.Identity()
    assert _backend.has_graph_breaks(tree)
    return tree


COMPONENTS = {
    "settings-first": lambda s: [s, TRTCudaGraphs()],
    "graphs-first": lambda s: [TRTCudaGraphs(), s],
    "graphs-alone": lambda s: [TRTCudaGraphs()],
}


@pytest.mark.parametrize("failure", ["at-our-boundary", "inside-upstream"])
@pytest.mark.parametrize("components", list(COMPONENTS))
def test_graphs_open_all_or_nothing(tmp_path, monkeypatch, cudagraphs_mode_guard, components, failure):
    """Two targets; the second fails to open. The first target's real upstream scope (which changed the
    process-global mode) is exited, its attribute put back, engines restored, and the Trainer raises."""
    model = EngineModel()
    model.head = compiled_tree()
    trt_module, head = model.trt, model.head
    prior = snapshot(model)
    error = RuntimeError("head cannot be captured")
    real = _backend.enable_cudagraphs
    events: list[Any] = []

    def enable_cudagraphs(module: nn.Module, cuda_graph_strategy: str | None):
        if module is head:
            if failure == "at-our-boundary":
                raise error
            # a graph-break module upstream cannot wrap (not an fx graph): its __enter__ switches the global
            # mode to whole-graph, then fails building the wrapper
            return real(graph_breaks(module), cuda_graph_strategy)

        @contextmanager
        def first_target():
            with real(module, cuda_graph_strategy):  # the real upstream scope: the global mode changes
                events.append(("enter", _backend.cudagraphs_mode()))
                try:
                    yield GraphsWrapper(module)  # swapped in, as for a module with graph breaks
                finally:
                    events.append(("exit", module))

        return first_target()

    monkeypatch.setattr(_backend, "enable_cudagraphs", enable_cudagraphs)
    settings = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin")
    )
    callbacks = COMPONENTS[components](settings)
    assert _backend.cudagraphs_mode() == cudagraphs_mode_guard == 0
    if failure == "at-our-boundary":
        expected: tuple[type[Exception], str] = (RuntimeError, "head cannot be captured")
    else:
        expected = (AttributeError, "no attribute 'graph'")
    with pytest.raises(expected[0], match=expected[1]) as excinfo:
        make_trainer(tmp_path, callbacks).predict(model, predict_loader(batches=2))
    assert excinfo.value is error if failure == "at-our-boundary" else "no attribute 'graph'" in str(excinfo.value)
    del excinfo  # its traceback holds the half-built upstream wrapper
    collect_half_built_wrappers()

    assert events == [("enter", 1), ("exit", trt_module)]  # the first target was open, then closed
    assert model.trt is trt_module and model.head is head  # attributes put back
    assert _backend.cudagraphs_mode() == 0  # the process-global mode is what it was
    assert model.seen == []  # no batch ran half-captured
    assert_restored(model, prior)
    graphs = next(cb for cb in callbacks if isinstance(cb, TRTCudaGraphs))
    assert graphs._scopes is None
    if settings in callbacks:
        assert settings.session is None
        (figures,) = settings.figures
        assert figures.graphs == ""  # no scope was reported open


def test_graphs_open_failing_inside_upstream_restores_the_global_mode(tmp_path, cudagraphs_mode_guard):
    """A single target whose upstream ``__enter__`` switches the global mode and then fails: nothing
    entered before it, so only GraphScopes itself can put the mode back."""
    model = EngineModel()
    graph_breaks(model.trt)
    prior = snapshot(model)
    trt_module = model.trt
    settings = TRTRuntimeSettings(runtime_cache=None)
    with pytest.raises(AttributeError, match="no attribute 'graph'"):
        make_trainer(tmp_path, [settings, TRTCudaGraphs()]).predict(model, predict_loader(batches=1))
    collect_half_built_wrappers()
    assert model.trt is trt_module
    assert_restored(model, prior)
    assert _backend.cudagraphs_mode() == cudagraphs_mode_guard  # upstream left it at whole-graph (2)


# --- whole_graph_capture with graph breaks --------------------------------------------------------


class GraphBreakModel(EngineModel):
    """``trt`` has PyTorch ops between its engines (upstream wraps it whole); ``head`` has none.

    Records every engine's settings in training steps too (outside the served validation loop).
    """

    def __init__(self) -> None:
        super().__init__()
        graph_breaks(self.trt)
        self.head = compiled_tree()
        self.seen_training: list[list[Any]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen_training.append([e.runtime_settings for e in self.engines()])
        return super().training_step(batch, batch_idx)


class EngineSpy(Callback):
    """Every engine's settings at setup, after the settings callback served them (list it last)."""

    def __init__(self) -> None:
        self.at_setup: list[Any] = []

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self.at_setup = [e.runtime_settings for e in pl_module.engines()]


def assert_split(step: list[Any], handle: Any) -> None:
    """Inside the scope: the wrapped (graph-break) target's engines do not capture themselves, the
    other target's do; all hold the run's handle and kernel strategy."""
    trt_part, head_part = step[:3], step[3:]
    assert [rs.cuda_graph_strategy for rs in trt_part] == ["disabled"] * 3
    assert [rs.cuda_graph_strategy for rs in head_part] == ["whole_graph_capture"] * 3
    assert all(rs.runtime_cache is handle for rs in step)
    assert all(rs.dynamic_shapes_kernel_specialization_strategy == "eager" for rs in step)


@pytest.mark.parametrize("graphs_first", [True, False], ids=["graphs-first", "settings-first"])
def test_whole_graph_capture_turns_engine_capture_off_for_graph_break_targets(tmp_path, monkeypatch, graphs_first):
    recorder = RecordingCudaGraphs(wrap=None)
    monkeypatch.setattr(_backend, "enable_cudagraphs", recorder)
    model = GraphBreakModel()
    trt_module, head = model.trt, model.head
    prior = snapshot(model)
    assert len(prior) == 6
    settings = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=str(tmp_path / "r{rank}.bin"),
    )
    spy = EngineSpy()
    callbacks = [TRTCudaGraphs(), settings] if graphs_first else [settings, TRTCudaGraphs()]
    make_trainer(tmp_path, [*callbacks, spy]).predict(model, predict_loader(batches=2))

    # outside the scope the run's settings hold as given
    handle = assert_served(spy.at_setup, settings)
    assert all(rs.cuda_graph_strategy == "whole_graph_capture" for rs in spy.at_setup)
    # the graph-break target's scope opens without a strategy, its engines' own capture already off
    (trt_enter, head_enter) = recorder.entered()
    assert trt_enter[1] is trt_module and trt_enter[2] is None
    assert head_enter[1] is head and head_enter[2] == "whole_graph_capture"
    assert_split(trt_enter[3] + head_enter[3], handle)
    # inside the loop
    assert len(model.seen) == 2
    for step, children in zip(model.seen, model.seen_children):
        assert_split(step, handle)
        assert isinstance(children["trt"], GraphsWrapper) and children["trt"].compiled_module is trt_module
        assert children["head"] is head
    assert [e[1] for e in recorder.exited()] == [head, trt_module]
    (figures,) = settings.figures
    assert figures.graphs == "trt: not called; head: not called"  # what ran, not what was opened (see below)
    # after the run: every engine's prior settings, the original attributes
    assert model.trt is trt_module and model.head is head
    assert_restored(model, prior)


@pytest.mark.parametrize("graphs_first", [True, False], ids=["graphs-first", "settings-first"])
def test_whole_graph_capture_engine_capture_off_only_inside_each_validation_loop(tmp_path, monkeypatch, graphs_first):
    """In fit, validation runs every epoch: engines of the graph-break target capture themselves again
    between the loops (training steps), and get their prior settings at the end of fit."""
    recorder = RecordingCudaGraphs(wrap=None)
    monkeypatch.setattr(_backend, "enable_cudagraphs", recorder)
    model = GraphBreakModel()
    trt_module, head = model.trt, model.head
    prior = snapshot(model)
    settings = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=str(tmp_path / "r{rank}.bin"),
        loops=["validate"],
    )
    graphs = TRTCudaGraphs(loops=["validate"])
    trainer = make_trainer(
        tmp_path,
        [graphs, settings] if graphs_first else [settings, graphs],
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, predict_loader(batches=1), predict_loader(batches=1))

    assert len(model.seen_training) == 2 and len(model.seen) == 2  # train, validate, train, validate
    handle = model.seen[0][0].runtime_cache
    for step in model.seen_training:  # outside the scopes, the second one after the first scope closed
        assert_served(step, settings)
        assert all(rs.runtime_cache is handle for rs in step)
    for step in model.seen:
        assert_split(step, handle)
    assert [(e[1], e[2]) for e in recorder.entered()] == [(trt_module, None), (head, "whole_graph_capture")] * 2
    assert len(recorder.exited()) == 4
    assert model.trt is trt_module
    assert_restored(model, prior)


# --- a second Trainer in the same process -----------------------------------------------------------


@pytest.mark.parametrize("same_callback", [False, True], ids=["new-callback", "same-callback"])
def test_second_trainer_gets_a_fresh_session_that_reloads_the_file(
    tmp_path, real_cache_bytes, fake_gpu, messages, same_callback
):
    from tests.reliability.workers import make_payload

    template = str(tmp_path / "gpu-{gpu}.bin")
    path = tmp_path / f"gpu-{fake_gpu.id}.bin"
    first_bytes = make_payload(real_cache_bytes, "first run", size=4096)
    assert cache.save(str(path), first_bytes, placement=cache.Placement(gpu=fake_gpu)).saved
    model = EngineModel()
    cb1, spy1 = TRTRuntimeSettings(runtime_cache=template), SessionSpy()
    make_trainer(tmp_path, [cb1, spy1]).predict(model, predict_loader(batches=3))
    (first,) = cb1.figures
    assert (first.cache_source, first.cache_bytes, first.saved_bytes) == ("warm", len(first_bytes), len(first_bytes))
    assert first.batches == 3
    first_handle = model.seen[0][0].runtime_cache

    # between the runs another writer replaces the file with different valid kernels (and no record)
    second_bytes = make_payload(real_cache_bytes, "written between runs", size=2048)
    path.write_bytes(second_bytes)

    cb2, spy2 = (cb1 if same_callback else TRTRuntimeSettings(runtime_cache=template)), SessionSpy()
    make_trainer(tmp_path, [cb2, spy2]).predict(model, predict_loader(batches=1))
    (second,) = cb2.figures
    assert spy2.sessions[0] is not spy1.sessions[0] and spy1.sessions[0].closed
    assert model.seen[-1][0].runtime_cache is not first_handle  # a new handle
    assert_served(model.seen[-1], cb2)
    # it read the new file from disk: its bytes, and the first run's record no longer vouches for them
    assert second.cache_source == "unverified" and second.cache.filled_on == ""
    assert second.cache_bytes == len(second_bytes)
    assert second.saved_bytes == len(second_bytes)
    assert path.read_bytes() == second_bytes  # what this run loaded, not the first run's kernels
    assert cache.read_record(str(path)).gpu_uuid == fake_gpu.uuid
    assert messages.matching("changed on disk") == []  # it loaded what was there: nothing overwritten
    # each run's figures are its own
    assert second is not first
    assert (second.batches, first.batches) == (1, 3)
    assert (first.cache_source, first.cache_bytes) == ("warm", len(first_bytes))
