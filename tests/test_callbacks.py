"""TRTRuntimeSettings and TRTCudaGraphs driven by a real Trainer on CPU.

The model holds real engine-less ``TorchTensorRTModule`` objects (settings given to them are what
``setup_engine`` would create the first execution context with) next to a Linear that really runs;
``predict_step`` records what every engine holds at that moment (``EngineModel.seen``).
"""

from __future__ import annotations

import os
import signal
import warnings
from contextlib import contextmanager
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimeSettings, _backend, cache
from lightning_trt_rtx.session import ServingSession
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


def no_engine_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if NO_ENGINES in str(w.message)]


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
    out = make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=3))

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
    assert ServingSession.of(model).active is False


def test_own_cache_file_loaded_and_saved(tmp_path, real_cache_bytes):
    own = tmp_path / "rank0.bin"
    own.write_bytes(real_cache_bytes)
    model = EngineModel()
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(model, predict_loader())

    (figures,) = cb.figures
    assert figures.cache_source == "own"
    assert figures.cache_bytes == len(real_cache_bytes)
    assert figures.saved_bytes == len(real_cache_bytes)
    assert own.read_bytes() == real_cache_bytes
    assert not (tmp_path / "rank0.bin.tmp").exists()


def test_cache_seeded_from_sibling_rank_and_saved_to_own_file(tmp_path, real_cache_bytes):
    (tmp_path / "rank3.bin").write_bytes(real_cache_bytes)
    model = EngineModel()
    cb = TRTRuntimeSettings(runtime_cache=str(tmp_path / "rank{rank}.bin"))
    make_trainer(tmp_path, [cb]).predict(model, predict_loader())

    (figures,) = cb.figures
    assert figures.cache_source == "seeded"
    assert figures.cache_path == str(tmp_path / "rank0.bin")
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert cache.check_bytes((tmp_path / "rank0.bin").read_bytes()) is None


def test_default_template_resolves_per_rank_under_versioned_dir(tmp_path):
    # TRTRuntimeSettings' signature default is computed at import; build it from the isolated dir here
    cb = TRTRuntimeSettings(runtime_cache=cache.default_template())
    make_trainer(tmp_path, [cb]).predict(EngineModel(), predict_loader(batches=1))
    (figures,) = cb.figures
    expected = os.path.join(
        str(tmp_path / "default-cache"),
        f"cpu-trtrtx{_backend.trt_version() or 'none'}-cuda{torch.version.cuda or 'none'}",
        "rank0.bin",
    )
    assert figures.cache_path == expected


def test_runtime_cache_none_gives_engines_no_handle(tmp_path):
    model = EngineModel()
    cb = TRTRuntimeSettings(runtime_cache=None)
    make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=1))
    assert all(rs.runtime_cache is None for rs in model.seen[0])
    assert cb.figures[0].cache_source == "none"
    assert cb.figures[0].engines == 3


def test_two_models_on_one_file_share_one_handle(tmp_path):
    template = str(tmp_path / "rank{rank}.bin")
    first, second = EngineModel(), EngineModel()
    make_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=template)]).predict(first, predict_loader(batches=1))
    make_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=template)]).predict(second, predict_loader(batches=1))
    assert first.seen[0][0].runtime_cache is second.seen[0][0].runtime_cache
    other = EngineModel()
    make_trainer(tmp_path, [TRTRuntimeSettings(runtime_cache=str(tmp_path / "b{rank}.bin"))]).predict(
        other, predict_loader(batches=1)
    )
    assert other.seen[0][0].runtime_cache is not first.seen[0][0].runtime_cache


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
        (dict(runtime_cache="/c/{gpu}.bin"), ValueError, r"Valid placeholders: \{rank\}"),
        (dict(runtime_cache="/c/{rank.bin"), ValueError, r"Malformed cache path template"),
        (dict(runtime_cache=""), ValueError, r"pass None"),
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


def test_engines_created_in_configure_model(tmp_path):
    model = EngineModel(engines_in="configure_model")
    assert model.engines() == []
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=2))
    # Callback.setup runs before configure_model: no "no engines" warning for engines that come later
    assert no_engine_warnings(record) == []
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
    cb = TRTRuntimeSettings(dynamic_shapes_kernel_specialization_strategy="none", runtime_cache=str(tmp_path / "r{rank}.bin"))
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


def _seed_sibling(tmp_path, data: bytes) -> str:
    """A valid cache for another rank: this rank starts seeded, and its own file appears only if saved."""
    (tmp_path / "rank7.bin").write_bytes(data)
    return str(tmp_path / "rank{rank}.bin")


def test_exception_in_predict_step_saves_restores_and_reraises(tmp_path, real_cache_bytes):
    error = ValueError("boom in predict_step")
    model = EngineModel(fail_at=1, error=error)
    prior = snapshot(model)
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=_seed_sibling(tmp_path, real_cache_bytes))
    trainer = make_trainer(tmp_path, [cb])
    with pytest.raises(ValueError, match="boom in predict_step") as excinfo:
        trainer.predict(model, predict_loader(batches=3))

    assert excinfo.value is error
    assert len(model.seen) == 2
    assert_served(model.seen[1], cb)
    own = tmp_path / "rank0.bin"
    assert own.read_bytes() == real_cache_bytes  # saved in on_exception
    assert_restored(model, prior)
    assert ServingSession.of(model).active is False
    assert trainer.state.status == "interrupted"


@pytest.fixture
def restore_sigint():
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def test_keyboard_interrupt_in_predict_step_saves_and_restores(tmp_path, real_cache_bytes, restore_sigint):
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
    out = make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=0))
    assert out is None
    assert model.seen == []
    assert_restored(model, prior)
    assert ServingSession.of(model).active is False  # teardown closed it
    (figures,) = cb.figures
    assert figures.batches == 0 and figures.engines == 3
    assert own.read_bytes() == real_cache_bytes
    assert not (tmp_path / "rank0.bin.corrupt").exists() and not (tmp_path / "rank0.bin.tmp").exists()


def test_repeated_predict_with_one_trainer(tmp_path):
    model = EngineModel()
    prior = snapshot(model)
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "rank{rank}.bin"))
    trainer = make_trainer(tmp_path, [cb])
    handles = []
    for run, batches in enumerate((2, 3, 1)):
        trainer.predict(model, predict_loader(batches=batches))
        handles.append(assert_served(model.seen[-1], cb))
        assert_restored(model, prior)
        assert cb.figures[0].batches == batches
        assert cb.figures[0].engines == 3
    assert len(model.seen) == 6
    assert handles[0] is handles[1] is handles[2]  # one handle per file per process


def test_no_engines_one_warning_and_nothing_else(tmp_path):
    model = EngineModel(engines_in="none")
    cb = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "c" / "rank{rank}.bin"))
    trainer = make_trainer(tmp_path, [cb, TRTCudaGraphs()])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = trainer.predict(model, predict_loader(batches=2))
        trainer.predict(model, predict_loader(batches=1))
    (message,) = no_engine_warnings(record)
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

    ``wrap=True`` behaves like a model with graph breaks: ``__enter__`` returns a new wrapper.
    """

    def __init__(self, wrap: bool = True) -> None:
        self.wrap = wrap
        self.events: list[tuple] = []

    def __call__(self, module: nn.Module, cuda_graph_strategy: Optional[str]):
        @contextmanager
        def scope():
            engines = [m for m in module.modules() if _backend.is_trt_module(m)]
            self.events.append(("enter", module, cuda_graph_strategy, [e.runtime_settings for e in engines]))
            try:
                yield GraphsWrapper(module) if self.wrap else module
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
    settings = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))
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


def test_graphs_scope_closed_and_attribute_restored_on_exception(tmp_path, recording_graphs, real_cache_bytes):
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


def test_engines_are_restored_even_when_saving_fails_unexpectedly(tmp_path, monkeypatch):
    model = EngineModel()
    prior = [e.runtime_settings for e in model.engines()]

    def broken(self):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(cache.SharedCache, "save", broken)
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))
    with pytest.warns(UserWarning, match="disk controller on fire"):
        predictions = _cpu_trainer(tmp_path, [callback]).predict(model, predict_loader())
    assert len(predictions) == 3
    assert [e.runtime_settings for e in model.engines()] == prior
