"""``ServingSession``, the public entry point for jobs without a Trainer: its whole lifecycle on CPU.

Real ``torch_tensorrt`` objects (engine-less ``TorchTensorRTModule``s, a real ``RuntimeCache`` handle),
real cache files and records under a per-test directory (the two-process gloo cases are in
``tests/test_ranks.py``).
Only what needs a GPU is faked, at our own boundary: the GPU identity (``cache.current_gpu``, the
``fake_gpu`` fixture), the kernels a run compiled (``RunCache.serialize`` returns the real bytes of
``tests/data/rtx-1.6.1-sm90.bin``: on CPU nothing is compiled) and upstream's ``setup_engine`` (it needs a
real engine) for ``engines_created``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
from torch import nn

from lightning_trt_rtx import ServingSession, TRTSettings, cache
from lightning_trt_rtx.session import Ranks
from tests.conftest import FAKE_GPU, OTHER_GPU


@pytest.fixture
def TTM(trt):
    return trt.dynamo.runtime.TorchTensorRTModule


def engine_tree(TTM) -> tuple[nn.Module, list]:
    """A model with four engine-less TorchTensorRTModules at several depths, and plain layers."""
    engines = [TTM(name=f"e{i}") for i in range(4)]
    model = nn.Sequential(
        nn.Linear(2, 2),
        nn.Sequential(engines[0], nn.ReLU(), nn.Sequential(engines[1])),
        nn.ModuleDict({"head": engines[2], "other": nn.Identity()}),
        engines[3],
    )
    return model, engines


@pytest.fixture
def compiled_kernels(monkeypatch, real_cache_bytes):
    """What the run's engines compiled into the cache handle: on CPU nothing is, so the handle's bytes are
    faked at our boundary with a real TensorRT-RTX cache."""
    monkeypatch.setattr(cache.RunCache, "serialize", lambda self: real_cache_bytes)
    return real_cache_bytes


def default_file(gpu: cache.Gpu, shared_gpu: bool = False, rank: int = 0) -> str:
    """The default per-GPU file this process resolves (under the test's LIGHTNING_TRT_RTX_CACHE_DIR)."""
    return cache.Placement.current(rank=rank, world_size=2 if shared_gpu else 1).resolve(
        cache.default_template(shared_gpu=shared_gpu)
    )


# --- the lifecycle ----------------------------------------------------------------------------------


def test_with_block_applies_saves_restores_and_returns_figures(TTM, fake_gpu, compiled_kernels, messages):
    model, engines = engine_tree(TTM)
    priors = [e.runtime_settings for e in engines]
    settings = TRTSettings(
        cuda_graph_strategy="whole_graph_capture", dynamic_shapes_kernel_specialization_strategy="eager"
    )
    path = default_file(fake_gpu)
    assert os.path.basename(path) == f"gpu-{FAKE_GPU.id}.bin"
    assert path.startswith(os.environ[cache.CACHE_DIR_ENV])

    with ServingSession(model, settings) as session:
        assert not session.closed and session.ranks == Ranks(0, 0, 0, 1)
        assert session.cache is not None and session.cache.path == path
        handle = session.cache.handle
        for engine in engines:  # every engine, the settings and the run's one cache handle
            held = engine.runtime_settings
            assert held.cuda_graph_strategy == "whole_graph_capture"
            assert held.dynamic_shapes_kernel_specialization_strategy == "eager"
            assert held.runtime_cache is handle
        assert not os.path.exists(path)  # saved when the run ends, not before
        assert session.figures.engines == 4 and session.figures.cache_source == "cold"

    assert session.closed
    assert all(e.runtime_settings is p for e, p in zip(engines, priors))  # exactly what they held before
    figures = session.figures
    assert (figures.rank, figures.gpu, figures.engines) == (0, FAKE_GPU.id, 4)
    assert (figures.cache_source, figures.cache_path, figures.cache_bytes) == ("cold", path, 0)
    assert figures.saved_bytes == len(compiled_kernels) and figures.cache.saved and not figures.warm
    with open(path, "rb") as f:
        assert f.read() == compiled_kernels
    record = cache.read_record(path)
    assert record is not None and record.gpu_uuid == FAKE_GPU.uuid  # the save says which GPU filled it
    assert "kernel cache cold" in figures.summary() and path in figures.summary()
    stamp = os.stat(path).st_mtime_ns
    assert session.close() is figures and os.stat(path).st_mtime_ns == stamp  # closing again does nothing
    assert messages.warnings == []

    # the next run opens its own session and reads what is on disk now: this GPU's file, warm
    with ServingSession(model, settings) as again:
        assert again.cache is not session.cache and again.cache.handle is not handle
    assert (again.figures.cache_source, again.figures.cache_bytes) == ("warm", len(compiled_kernels))
    assert again.figures.warm and again.figures.cache.applies == "yes"
    assert all(e.runtime_settings is p for e, p in zip(engines, priors))


@pytest.mark.parametrize("error_type", [ValueError, KeyboardInterrupt])
def test_exception_or_ctrl_c_propagates_unchanged_and_the_run_still_saves(
    TTM, fake_gpu, compiled_kernels, messages, error_type
):
    model, engines = engine_tree(TTM)
    priors = [e.runtime_settings for e in engines]
    error = error_type("the user's own error")
    with pytest.raises(error_type) as raised:
        with ServingSession(model, TRTSettings(cuda_graph_strategy="whole_graph_capture")) as session:
            assert all(e.runtime_settings.runtime_cache is session.cache.handle for e in engines)
            raise error
    assert raised.value is error and raised.value.__context__ is None  # nothing raised over it
    assert session.closed
    assert all(e.runtime_settings is p for e, p in zip(engines, priors))
    with open(session.figures.cache_path, "rb") as f:
        assert f.read() == compiled_kernels
    assert session.figures.saved_bytes == len(compiled_kernels)
    assert messages.warnings == []


def test_a_failed_save_after_an_exception_warns_and_still_restores(TTM, fake_gpu, compiled_kernels, messages, tmp_path):
    """The save cannot write (a file where its directory should be): the user's error still comes out."""
    (tmp_path / "blocked").write_text("a file, not a directory")
    settings = TRTSettings(runtime_cache=str(tmp_path / "blocked" / "{sm}" / "gpu-{gpu}.bin"))
    model, engines = engine_tree(TTM)
    priors = [e.runtime_settings for e in engines]
    error = RuntimeError("predict failed")
    with pytest.raises(RuntimeError) as raised:
        with ServingSession(model, settings) as session:
            raise error
    assert raised.value is error
    assert all(e.runtime_settings is p for e, p in zip(engines, priors))
    assert not session.figures.cache.saved and session.figures.cache.save_error
    assert len(messages.matching("Could not save the kernel cache")) == 1


def test_nested_sessions_restore_to_the_outer_settings_then_the_originals(TTM, fake_gpu, compiled_kernels, tmp_path):
    model, engines = engine_tree(TTM)
    priors = [e.runtime_settings for e in engines]
    outer_settings = TRTSettings(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "outer-{gpu}.bin")
    )
    inner_settings = TRTSettings(
        dynamic_shapes_kernel_specialization_strategy="eager", runtime_cache=str(tmp_path / "inner-{gpu}.bin")
    )
    with ServingSession(model, outer_settings) as outer:
        outer_held = [e.runtime_settings for e in engines]
        assert all(s.cuda_graph_strategy == "whole_graph_capture" for s in outer_held)
        assert all(s.runtime_cache is outer.cache.handle for s in outer_held)
        with ServingSession(model, inner_settings) as inner:
            for engine in engines:
                held = engine.runtime_settings
                assert (held.cuda_graph_strategy, held.dynamic_shapes_kernel_specialization_strategy) == (
                    "disabled",
                    "eager",
                )
                assert held.runtime_cache is inner.cache.handle
        assert inner.closed and not outer.closed
        assert all(e.runtime_settings is s for e, s in zip(engines, outer_held))  # the outer's, exactly
        assert os.path.isfile(inner.figures.cache_path) and not os.path.exists(outer.cache.path)
    assert all(e.runtime_settings is p for e, p in zip(engines, priors))  # the originals
    assert outer.figures.saved_bytes == inner.figures.saved_bytes == len(compiled_kernels)
    assert outer.figures.cache_path != inner.figures.cache_path


def test_a_closed_session_refuses_reuse(TTM, fake_gpu, compiled_kernels):
    model, engines = engine_tree(TTM)
    priors = [e.runtime_settings for e in engines]
    with ServingSession(model) as session:
        pass
    figures = session.figures
    for reuse in (
        lambda: session.serve(),
        lambda: session.serve(model),
        lambda: session.__enter__(),
        lambda: session.engines_created().__enter__(),
        lambda: session.open_graphs(),
    ):
        with pytest.raises(RuntimeError, match="ServingSession is closed: a session serves one run. Open a new one"):
            reuse()
    with pytest.raises(RuntimeError, match="is closed"):
        with session:
            pass
    assert all(e.runtime_settings is p for e, p in zip(engines, priors))  # nothing was applied again
    assert session.close() is figures

    never_served = ServingSession(model)
    assert never_served.close().engines == 0 and never_served.cache is None  # closing first: nothing to save
    with pytest.raises(RuntimeError, match="closed"):
        never_served.serve()


def test_serve_counts_engines_and_is_idempotent(TTM, fake_gpu):
    model, engines = engine_tree(TTM)
    with ServingSession(settings=TRTSettings(runtime_cache=None)) as session:
        assert session.cache is None and session.figures.engines == 0  # no module yet: nothing served
        assert session.serve(model) == 4
        held = [e.runtime_settings for e in engines]
        assert all(s.runtime_cache is None for s in held)
        assert session.serve() == 4  # the session's module again: settings already there, left alone
        assert all(e.runtime_settings is s for e, s in zip(engines, held))
        late = TTM(name="late")
        model.append(late)
        assert session.serve() == 5 and late.runtime_settings is not None
        assert late.runtime_settings.runtime_cache is None
    assert session.figures.cache_source == "none" and "no kernel cache" in session.figures.summary()


def test_a_module_without_engines_is_warned_about_once_and_opens_no_cache(fake_gpu, messages):
    model = nn.Sequential(nn.Linear(2, 2))
    with ServingSession(model) as session:
        assert session.serve() == 0
    assert session.cache is None and session.figures.cache_source == "none"
    assert len(messages.matching("No TensorRT engines found under Sequential")) == 1


def test_loop_timing_fills_the_figures(TTM, fake_gpu):
    model, _ = engine_tree(TTM)
    with ServingSession(model, TRTSettings(runtime_cache=None)) as session:
        session.loop_started()
        for _ in range(3):
            session.batch_started()
            time.sleep(0.01)
            session.batch_ended()
        session.loop_ended()
    figures = session.figures
    assert figures.batches == 3 and figures.first_batch_ms >= 10 and figures.mean_batch_ms >= 10


def test_the_steps_gpu_time_is_sampled_one_steady_step_in_eight(TTM, fake_gpu, monkeypatch):
    """Two CUDA events a step cost the host more than the rest of the package's per-batch work: one
    steady step in ``GPU_EVERY`` is timed, and the figure is their mean. CUDA's events and
    synchronize are faked (no GPU here); the timing logic is the package's own."""
    import torch

    from lightning_trt_rtx import session as session_module

    recorded: list[int] = []  # the batch each start event was recorded at

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at = -1

        def record(self) -> None:
            self.at = len(recorded)
            recorded.append(session.figures.batches)  # batches ended so far: this one's index

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Event) -> float:
            return float(recorded[self.at])  # this step's "GPU time": its batch index, in ms

    model, _ = engine_tree(TTM)
    with ServingSession(model, TRTSettings(runtime_cache=None)) as session, monkeypatch.context() as cuda:
        cuda.setattr(torch.cuda, "Event", Event)
        cuda.setattr(torch.cuda, "is_available", lambda: True)
        cuda.setattr(torch.cuda, "synchronize", lambda *a: None)
        session.loop_started(cuda=True)
        for _ in range(20):
            session.batch_started()
            session.batch_ended()
        session.loop_ended()
    assert session_module._BatchTimer.GPU_EVERY == 8
    starts = recorded[::2]  # start and end events alternate
    assert starts == [1, 9, 17]  # the first batch (context creation, JIT) is never timed
    assert session.figures.step_gpu_ms == pytest.approx((1 + 9 + 17) / 3)


# --- engines set up inside the block ----------------------------------------------------------------


def test_engines_created_inside_the_block_start_with_the_settings(trt, TTM, fake_gpu, compiled_kernels, monkeypatch):
    """Like tests/test_engines.py::test_created_with_*: upstream's setup_engine needs a real engine (a GPU),
    so it records what it would apply; our wrapper around it is the code under test."""
    Module = trt.dynamo.runtime.TorchTensorRTModule
    applied = []
    monkeypatch.setattr(Module, "setup_engine", lambda self: applied.append(self._runtime_settings))
    recorder = Module.setup_engine
    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture")
    with ServingSession(settings=settings) as session:
        with session.engines_created():
            assert Module.setup_engine is not recorder
            compiled = nn.Sequential(TTM(name="e0"), TTM(name="e1"))
            for engine in compiled:  # what torch_tensorrt.compile does before it returns
                engine.setup_engine()
        assert Module.setup_engine is recorder  # upstream's own again after the block
        assert len(applied) == 2 and all(s == session.runtime_settings() for s in applied)
        assert all(s.cuda_graph_strategy == "whole_graph_capture" for s in applied)
        assert all(s.runtime_cache is session.cache.handle for s in applied)  # this run's cache, before setup
        assert session.serve(compiled) == 2
        # already served: the settings they were set up with are left in place (no second context)
        assert [e._runtime_settings for e in compiled] == applied
        assert all(e._runtime_settings is s for e, s in zip(compiled, applied))
        outside = TTM(name="outside")
        outside.setup_engine()
        assert applied[-1].cuda_graph_strategy == "disabled"  # engines set up outside the block: upstream's default
    assert session.figures.engines == 2 and session.figures.saved_bytes == len(compiled_kernels)


def test_engines_created_without_a_cache(trt, TTM, monkeypatch):
    Module = trt.dynamo.runtime.TorchTensorRTModule
    applied = []
    monkeypatch.setattr(Module, "setup_engine", lambda self: applied.append(self._runtime_settings))
    with ServingSession(settings=TRTSettings(runtime_cache=None)) as session:
        with session.engines_created():
            TTM(name="e0").setup_engine()
    assert session.cache is None
    assert applied[0].runtime_cache is None and applied[0].cuda_graph_strategy == "disabled"


# --- ranks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "local_world_size", "shared"),
    [(2, None, False), (1, None, True), (4, "4", False), (2, "4", True), (1, "1", False)],
    ids=["2-gpus", "1-gpu", "torchrun-4-on-4", "torchrun-4-on-2", "torchrun-1-per-node"],
)
def test_ranks_from_arguments_share_a_gpu_when_the_node_has_fewer_gpus_than_ranks(
    TTM, fake_gpu, compiled_kernels, messages, monkeypatch, gpus, local_world_size, shared
):
    """Decided on each rank alone (no collective): ranks on this node (``LOCAL_WORLD_SIZE``, else the world
    size) against the GPUs it sees; ranks that share a GPU get a file each."""
    monkeypatch.setattr(cache, "visible_gpus", lambda: gpus)  # the GPU count, faked at our boundary
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    model, _ = engine_tree(TTM)
    with ServingSession(model, rank=1, local_rank=1, world_size=2) as session:
        assert session.ranks == Ranks(rank=1, local_rank=1, node_rank=0, world_size=2)
        assert session.cache.placement.rank == 1 and session.cache.placement.world_size == 2
    assert session.figures.rank == 1
    assert session.figures.cache_path == default_file(fake_gpu, shared_gpu=shared, rank=1)
    assert os.path.basename(session.figures.cache_path) == f"gpu-{FAKE_GPU.id}{'-rank1' if shared else ''}.bin"
    assert messages.warnings == []


@pytest.mark.parametrize(
    ("template", "local_world_size", "warned"),
    [("{local_rank}.bin", "2", False), ("{local_rank}.bin", "1", True), ("{host}.bin", "1", False),
     ("{host}.bin", "2", True), ("{node_rank}-{gpu}.bin", "2", False)],
)  # fmt: skip
def test_whether_ranks_share_a_file_is_judged_from_the_template_and_the_node(
    TTM, fake_gpu, messages, monkeypatch, tmp_path, template, local_world_size, warned
):
    monkeypatch.setattr(cache, "visible_gpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    model, _ = engine_tree(TTM)
    with ServingSession(model, TRTSettings(runtime_cache=str(tmp_path / template)), rank=0, world_size=2):
        pass
    assert len(messages.matching("Several ranks of this job share the kernel cache file")) == int(warned)


def test_a_template_that_gives_ranks_one_file_is_warned_about(TTM, fake_gpu, messages, tmp_path):
    model, _ = engine_tree(TTM)
    with ServingSession(model, TRTSettings(runtime_cache=str(tmp_path / "one.bin")), rank=0, world_size=2):
        pass
    (warning,) = messages.matching("Several ranks of this job share the kernel cache file")
    assert "{gpu}" in warning and "{rank}" in warning  # names the templates that work


def test_ranks_default_to_a_single_process(TTM, fake_gpu, monkeypatch):
    for name in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    model, _ = engine_tree(TTM)
    with ServingSession(model, TRTSettings(runtime_cache=None)) as session:
        assert session.ranks == Ranks(0, 0, 0, 1)
    assert session.figures.rank == 0


def test_a_single_process_keeps_its_launchers_local_and_node_rank(TTM):
    session = ServingSession(nn.Sequential(TTM(name="e")), rank=0, local_rank=3, node_rank=1, world_size=1)
    assert session.ranks == Ranks(0, 3, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"module": "model.pt"}, TypeError, "module must be a torch.nn.Module (or None), got str"),
        ({"settings": {"cuda_graph_strategy": "disabled"}}, TypeError, "settings must be a TRTSettings, got dict"),
        ({"settings": "whole_graph_capture"}, TypeError, "TRTSettings.from_dict"),
        ({"rank": -1}, ValueError, "rank must be a non-negative int, got -1"),
        ({"rank": 1.0}, ValueError, "rank must be a non-negative int, got 1.0"),
        ({"local_rank": True}, ValueError, "local_rank must be a non-negative int, got True"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank must be in [0, world_size): got rank 2, world_size 2"),
        ({"rank": 0, "world_size": 0}, ValueError, "world_size must be at least 1, got 0"),
        ({"local_rank": 5, "world_size": 2}, ValueError, "local_rank must be in [0, world_size): got local_rank 5"),
        ({"node_rank": 2, "world_size": 2}, ValueError, "node_rank must be in [0, world_size): got node_rank 2"),
    ],
)
def test_bad_arguments_say_what_is_valid(TTM, kwargs, error, message):
    args = {"module": nn.Sequential(TTM(name="e")), **kwargs}
    module, settings = args.pop("module"), args.pop("settings", None)
    with pytest.raises(error) as raised:
        ServingSession(module, settings, **args)
    assert message in str(raised.value)


def test_serve_and_open_graphs_reject_what_is_not_a_module_or_a_list_of_names(TTM):
    model = nn.Sequential(TTM(name="e"))
    with ServingSession(model, TRTSettings(runtime_cache=None)) as session:
        with pytest.raises(TypeError, match="module must be a torch.nn.Module .* got str"):
            session.serve("model")
        with pytest.raises(TypeError, match="warn_if_none must be True or False"):
            session.serve(model, warn_if_none="no")
        with pytest.raises(TypeError, match="targets must be a list of attribute names"):
            session.open_graphs(targets="net")  # not one target per letter
        model.lr = 0.1  # an attribute, but no module
        with pytest.raises(AttributeError, match=r"has a float, not a module, as attribute 'lr'.*Compiled attributes"):
            session.open_graphs(targets=["lr"])
        assert session.module is model


def test_batch_ended_without_batch_started_is_an_error_not_a_first_batch_of_hours(TTM):
    with ServingSession(nn.Sequential(TTM(name="e")), TRTSettings(runtime_cache=None)) as session:
        session.loop_started(cuda=False, batches=2)
        with pytest.raises(RuntimeError, match=r"batch_ended\(\) without batch_started\(\)"):
            session.batch_ended()
        for _ in range(2):
            session.batch_started()
            session.batch_ended()
        with pytest.raises(RuntimeError, match="without batch_started"):
            session.batch_ended()  # each batch ends once
        session.batch_started()  # a step that raised: the loop's end closes it
        session.loop_ended()
        assert session.figures.batches == 2 and session.figures.first_batch_ms < 60_000


def test_serve_and_open_graphs_without_a_module_say_where_to_pass_it():
    with ServingSession(settings=TRTSettings(runtime_cache=None)) as session:
        with pytest.raises(ValueError, match=r"serve needs a module: pass it here or to ServingSession\(module"):
            session.serve()
        with pytest.raises(ValueError, match=r"open_graphs needs the session's module: call serve\(module\) first"):
            session.open_graphs()
    assert session.closed


# --- the GPU the engines run on ------------------------------------------------------------------------

GPU_AT = {0: FAKE_GPU, 1: dataclasses.replace(OTHER_GPU, ordinal=1)}  # cuda:0 and cuda:1 of a two-GPU host


@pytest.fixture
def two_gpus(monkeypatch):
    """A host with two GPUs whose current device is cuda:0: faked at our boundary (``cache.current_device``,
    ``cache.gpu_at``); ``current_gpu`` and ``Placement.current`` go through them."""
    monkeypatch.setattr(cache, "current_device", lambda: 0)
    monkeypatch.setattr(cache, "gpu_at", lambda ordinal: GPU_AT[ordinal])
    monkeypatch.setattr(cache, "visible_gpus", lambda: 2)


def engines_on(trt, *devices: int) -> nn.Module:
    """Real TorchTensorRTModules compiled "for" ``cuda:N`` (lazily initialised: on CPU their engine bytes
    are never deserialized), as ``torch_tensorrt.compile(model.to(f"cuda:{N}"), ...)`` makes them."""
    from torch_tensorrt.dynamo._settings import CompilationSettings

    return nn.Sequential(
        *(
            trt.dynamo.runtime.TorchTensorRTModule(
                serialized_engine=b"engine", name=f"e{i}",
                settings=CompilationSettings(device=trt.Device(gpu_id=d), lazy_engine_init=True),
            )  # fmt: skip
            for i, d in enumerate(devices)
        )
    )


def test_the_cache_file_and_its_record_follow_the_engines_device_not_the_current_one(
    trt, two_gpus, compiled_kernels, messages
):
    # a torchrun rank that moved its model with .to("cuda:1") without torch.cuda.set_device(1)
    with ServingSession(engines_on(trt, 1, 1)) as session:
        pass
    gpu = GPU_AT[1]
    assert session.figures.gpu == gpu.id == f"{gpu.uuid.replace('-', '')[:8]}-1"
    assert os.path.basename(session.figures.cache_path) == f"gpu-{gpu.id}.bin"
    record = cache.read_record(session.figures.cache_path)
    assert (record.gpu_uuid, record.ordinal) == (gpu.uuid, 1)
    (warning,) = messages.warnings
    assert warning.startswith(f"The TensorRT engines run on cuda:1 (GPU {gpu.id}), but this process's current"
                              " CUDA device is cuda:0: the kernel cache file and its record follow the engines'")
    assert "torch.cuda.set_device(1)" in warning
    # the next run on that device loads it warm (the mismatch is said once per process)
    messages.records.clear()
    with ServingSession(engines_on(trt, 1)) as session:
        assert session.figures.cache_source == "warm"
    assert messages.warnings == []


def test_engines_on_the_current_device_or_that_do_not_say_use_it_quietly(trt, TTM, two_gpus, compiled_kernels,
                                                                         messages):
    for model in (engines_on(trt, 0), nn.Sequential(TTM(name="e"))):  # cuda:0; an engine-less module
        with ServingSession(model) as session:
            pass
        assert session.figures.gpu == FAKE_GPU.id
        assert os.path.basename(session.figures.cache_path) == f"gpu-{FAKE_GPU.id}.bin"
    assert messages.warnings == []


def test_engines_on_several_devices_are_served_on_the_first_and_warned_about(trt, two_gpus, messages):
    with ServingSession(engines_on(trt, 1, 0), TRTSettings(runtime_cache=None)) as session:
        pass
    assert session.figures.gpu == FAKE_GPU.id
    (warning,) = messages.matching("on several devices")
    assert "(cuda:0, cuda:1)" in warning and "follows cuda:0" in warning


def test_a_cache_opened_before_the_engines_existed_says_when_they_run_elsewhere(trt, two_gpus, compiled_kernels,
                                                                               messages):
    with ServingSession(settings=TRTSettings()) as session:
        with session.engines_created():  # the cache opens here, for the current device
            model = engines_on(trt, 1)
        session.serve(model)
    assert session.figures.cache_path.endswith(f"gpu-{FAKE_GPU.id}.bin")
    (warning,) = messages.matching("before the engines existed")
    assert f"GPU {FAKE_GPU.id}" in warning and "cuda:1" in warning and "before engines_created()" in warning
