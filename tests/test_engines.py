"""Finding every engine under a module tree, applying settings to all of them, restoring them exactly.

Real engine-less ``TorchTensorRTModule`` objects and real ``MutableTorchTensorRTModule`` objects work on
CPU. Bare torchbind ``Engine`` objects cannot be built without a GPU: a stand-in class is recognised
by monkeypatching ``_backend.is_bare_engine`` (our boundary); the real ``set_bare_engine_settings``
and ``bare_engine_settings`` run against it.
"""

from __future__ import annotations

import pytest
from torch import nn

from lightning_trt_rtx import _backend, cache
from lightning_trt_rtx.engines import EngineBinding, find_engines, find_mutable_modules
from lightning_trt_rtx.settings import TRTSettings


@pytest.fixture
def TTM(trt):
    return trt.dynamo.runtime.TorchTensorRTModule


@pytest.fixture
def RS(trt):
    return trt.runtime.RuntimeSettings


class Holder(nn.Module):
    """A module that keeps TTMs as submodules and an unrelated layer."""

    def __init__(self, *children: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*children)
        self.head = nn.Linear(2, 2)


def build_tree(TTM):
    a, b, c, d = (TTM(name=n) for n in "abcd")
    model = nn.Sequential(
        nn.Linear(2, 2),
        nn.Sequential(a, nn.ReLU(), nn.Sequential(b)),
        Holder(nn.Sequential(nn.Sequential(c)), nn.Identity()),
        d,
    )
    return model, [a, b, c, d]


def test_find_engines_finds_every_ttm(TTM):
    model, ttms = build_tree(TTM)
    found = find_engines(model)
    assert {id(e.obj) for e in found} == {id(t) for t in ttms}
    assert len(found) == 4
    assert all(e.kind == "module" for e in found)
    names = {e.name for e in found}
    assert names == {"1.0", "1.2.0", "2.body.0.0.0", "3"}
    assert find_engines(nn.Sequential(nn.Linear(2, 2))) == []
    # a TTM that is the root itself, and one reachable twice, are found once
    assert [e.obj for e in find_engines(ttms[0])] == [ttms[0]]
    twice = nn.Sequential(ttms[0], nn.Sequential(ttms[0]))
    assert len(find_engines(twice)) == 1


def test_apply_sets_all_and_is_idempotent(TTM, RS, tmp_path):
    model, ttms = build_tree(TTM)
    run_cache = cache.RunCache(str(tmp_path / "{sm}" / "gpu-{gpu}.bin"), cache.Placement())
    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture").to_runtime_settings(run_cache.handle)
    binding = EngineBinding(model)
    assert binding.apply(settings) == 4
    for t in ttms:
        assert t.runtime_settings == settings
        assert t.runtime_settings.cuda_graph_strategy == "whole_graph_capture"
        assert t.runtime_settings.runtime_cache is run_cache.handle  # one handle object for every engine
    # equal settings (a distinct but equal object) change nothing the second time
    again = TRTSettings(cuda_graph_strategy="whole_graph_capture").to_runtime_settings(run_cache.handle)
    assert again is not settings and again == settings
    assert binding.apply(again) == 0
    assert all(t.runtime_settings is settings for t in ttms)
    # a different handle is a different cache: every engine changes
    other = TRTSettings(cuda_graph_strategy="whole_graph_capture").to_runtime_settings(_backend.new_cache_handle())
    assert binding.apply(other) == 4
    assert len({id(t.runtime_settings.runtime_cache) for t in ttms}) == 1


def test_restore_returns_exact_prior(TTM, RS):
    model, ttms = build_tree(TTM)
    custom_handle = _backend.new_cache_handle()
    custom = RS(runtime_cache=custom_handle, dynamic_shapes_kernel_specialization_strategy="eager")
    ttms[2].runtime_settings = custom
    priors = [t.runtime_settings for t in ttms]
    assert isinstance(priors[0].runtime_cache, str)  # upstream default: the per-user path string
    binding = EngineBinding(model)
    first = TRTSettings(cuda_graph_strategy="whole_graph_capture").to_runtime_settings(_backend.new_cache_handle())
    second = TRTSettings(dynamic_shapes_kernel_specialization_strategy="none").to_runtime_settings(None)
    assert binding.apply(first) == 4
    assert binding.apply(second) == 4  # the snapshot is taken at the first touch only
    binding.restore()
    for t, prior in zip(ttms, priors):
        assert t.runtime_settings is prior
    assert ttms[2].runtime_settings.runtime_cache is custom_handle
    assert ttms[0].runtime_settings.runtime_cache == priors[0].runtime_cache
    # restore again is a no-op; a new apply snapshots afresh
    binding.restore()
    assert all(t.runtime_settings is p for t, p in zip(ttms, priors))
    assert binding.apply(first) == 4
    binding.restore()
    assert all(t.runtime_settings is p for t, p in zip(ttms, priors))


def test_engine_already_holding_settings_is_counted_unchanged(TTM):
    model, ttms = build_tree(TTM)
    settings = TRTSettings().to_runtime_settings(_backend.new_cache_handle())
    ttms[1].runtime_settings = settings
    binding = EngineBinding(model)
    assert binding.apply(settings) == 3
    binding.restore()
    assert ttms[1].runtime_settings is settings


def test_engine_added_after_apply_is_picked_up_by_next_apply(TTM):
    model, _ = build_tree(TTM)
    settings = TRTSettings().to_runtime_settings(None)
    binding = EngineBinding(model)
    assert binding.apply(settings) == 4
    late = TTM(name="late")
    late_prior = late.runtime_settings
    model.append(late)
    assert binding.apply(settings) == 1
    assert late.runtime_settings is settings
    binding.restore()
    assert late.runtime_settings is late_prior


# --- bare engines ----------------------------------------------------------------------------------


class FakeBareEngine:
    """Stands in for a torchbind ``tensorrt.Engine``: records ``update_runtime_settings`` calls."""

    def __init__(self) -> None:
        self.updates = []

    def update_runtime_settings(self, kernel_code, graph_code, handle):
        self.updates.append((kernel_code, graph_code, handle))


@pytest.fixture
def bare_engines(monkeypatch, trt):
    real = _backend.is_bare_engine
    monkeypatch.setattr(_backend, "is_bare_engine", lambda obj: isinstance(obj, FakeBareEngine) or real(obj))


class LoadedProgram(nn.Module):
    """Like ``torch_tensorrt.load(...).module()``: engines as plain attributes of (sub)modules."""

    def __init__(self) -> None:
        super().__init__()
        self._run_on_acc_0_engine = FakeBareEngine()
        self.sub = nn.Module()
        self.sub._run_on_acc_1_engine = FakeBareEngine()
        self.sub.inner = nn.Sequential(nn.Linear(2, 2))
        self.sub.inner[0]._run_on_acc_2_engine = FakeBareEngine()
        self.not_an_engine = object()


def test_bare_engines_found_and_set(bare_engines, TTM, RS):
    program = LoadedProgram()
    program.ttm = TTM(name="mixed")
    engines = find_engines(program)
    bare = {e.name: e.obj for e in engines if e.kind == "bare"}
    assert set(bare) == {"_run_on_acc_0_engine", "sub._run_on_acc_1_engine", "sub.inner.0._run_on_acc_2_engine"}
    assert [e.name for e in engines if e.kind == "module"] == ["ttm"]

    handle = _backend.new_cache_handle()
    settings = TRTSettings(
        cuda_graph_strategy="whole_graph_capture", dynamic_shapes_kernel_specialization_strategy="eager"
    ).to_runtime_settings(handle)
    binding = EngineBinding(program)
    assert binding.apply(settings) == 4
    for engine in bare.values():
        assert len(engine.updates) == 1
        kernel, graphs, torchbind_handle = engine.updates[0]
        assert (kernel, graphs) == (1, 1)
        assert torchbind_handle is handle._handle  # the same torchbind handle for every engine
        assert _backend.bare_engine_settings(engine) is settings
    assert program.ttm.runtime_settings is settings
    assert binding.apply(settings) == 0
    assert all(len(e.updates) == 1 for e in bare.values())  # no second context creation

    binding.restore()
    for engine in bare.values():
        assert len(engine.updates) == 2
        assert engine.updates[-1] == (0, 0, None)  # upstream's post-load default: lazy, disabled, no cache
        assert _backend.bare_engine_settings(engine) == RS(runtime_cache=None)


def test_bare_engine_settings_faked_at_boundary(monkeypatch, trt, RS):
    """With the whole bare-engine seam replaced, the binding still snapshots and restores per engine."""
    store = {}
    monkeypatch.setattr(_backend, "is_bare_engine", lambda obj: isinstance(obj, FakeBareEngine))
    monkeypatch.setattr(_backend, "bare_engine_settings", lambda e: store.get(id(e), "prior-" + str(id(e))))
    monkeypatch.setattr(_backend, "set_bare_engine_settings", lambda e, s: store.__setitem__(id(e), s))
    program = LoadedProgram()
    engines = [e.obj for e in find_engines(program)]
    settings = TRTSettings().to_runtime_settings(None)
    binding = EngineBinding(program)
    assert binding.apply(settings) == 3
    assert all(store[id(e)] is settings for e in engines)
    binding.restore()
    assert all(store[id(e)] == "prior-" + str(id(e)) for e in engines)


# --- MutableTorchTensorRTModule ---------------------------------------------------------------------


@pytest.fixture
def mutable(trt):
    # A real MutableTorchTensorRTModule; it cannot compile on CPU, so its ``.gm`` is set by hand below,
    # the way its first forward (compile) and a recompile set it.
    return trt.MutableTorchTensorRTModule(nn.Sequential(nn.Linear(2, 2)).eval(), device="cuda:0")


@pytest.mark.parametrize("held", ["root", "submodule", "attribute"])
def test_mutable_refresh_applies_only_when_gm_changes(mutable, TTM, held):
    if held == "root":
        root = mutable
    elif held == "submodule":  # ``self.model = MutableTorchTensorRTModule(...)`` in a LightningModule
        root = nn.Module()
        root.model = mutable
        assert "model" in root._modules
    else:
        root = nn.Module()
        object.__setattr__(root, "model", mutable)
        assert "model" in vars(root)
    assert find_mutable_modules(root) == [mutable]

    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture").to_runtime_settings(_backend.new_cache_handle())
    binding = EngineBinding(root)
    assert binding.refresh() == 0  # nothing applied yet
    assert mutable.gm is None
    assert binding.apply(settings) == 0
    assert binding.refresh() == 0

    first = TTM(name="first")
    first_prior = first.runtime_settings
    mutable.gm = nn.Sequential(nn.Sequential(first), nn.Linear(2, 2))  # first forward compiled
    assert binding.refresh() == 1
    assert first.runtime_settings is settings

    # unchanged gm: refresh is a no-op even if someone changed an engine behind our back
    manual = TRTSettings().to_runtime_settings(None)
    first.runtime_settings = manual
    assert binding.refresh() == 0
    assert first.runtime_settings is manual
    first.runtime_settings = settings

    second, third = TTM(name="second"), TTM(name="third")
    priors = {id(second): second.runtime_settings, id(third): third.runtime_settings}
    mutable.gm = nn.Sequential(second, nn.Sequential(third))  # recompiled: a new gm
    assert binding.refresh() == 2
    assert second.runtime_settings is settings and third.runtime_settings is settings
    assert binding.refresh() == 0

    binding.restore()
    # the replaced gm's engine left the model: the binding let go of it (and of its GPU memory)
    assert first.runtime_settings is settings and first_prior is not settings
    assert second.runtime_settings is priors[id(second)]
    assert third.runtime_settings is priors[id(third)]
    assert binding.refresh() == 0  # nothing to re-apply after restore


def test_mutable_found_by_find_engines(mutable, TTM):
    root = nn.Module()
    root.model = mutable
    inner = TTM(name="inner")
    mutable.gm = nn.Sequential(inner)
    engines = find_engines(root)
    assert [e.obj for e in engines] == [inner]
    assert engines[0].name == "model.gm.0"


def test_mutable_faked_at_boundary(monkeypatch, TTM):
    """The refresh logic with ``_backend.is_mutable_module`` recognising a small stand-in class."""

    class FakeMutable:
        def __init__(self):
            self.gm = None

    fake = FakeMutable()
    monkeypatch.setattr(_backend, "is_mutable_module", lambda obj: isinstance(obj, FakeMutable))
    root = nn.Module()
    root.sub = nn.Module()
    root.sub.compiled = fake
    settings = TRTSettings().to_runtime_settings(_backend.new_cache_handle())
    binding = EngineBinding(root)
    assert binding.apply(settings) == 0
    assert binding.refresh() == 0
    a = TTM(name="a")
    fake.gm = nn.Sequential(a)
    assert binding.refresh() == 1 and a.runtime_settings is settings
    assert binding.refresh() == 0
    b = TTM(name="b")
    fake.gm = nn.Sequential(b)
    assert binding.refresh() == 1 and b.runtime_settings is settings
    fake.gm = None
    assert binding.refresh() == 0  # gm went away: nothing to apply, but the new state is remembered
    assert binding.refresh() == 0


def test_created_with_stashes_settings_before_upstream_setup(trt, monkeypatch):
    """Engines set up inside the block hold the settings when upstream's setup_engine applies them."""
    from torch_tensorrt.dynamo.runtime._TorchTensorRTModule import TorchTensorRTModule

    from lightning_trt_rtx.engines import created_with
    from lightning_trt_rtx.settings import TRTSettings

    seen = []
    # upstream's setup_engine needs a real engine (a GPU): record what it would apply instead
    monkeypatch.setattr(TorchTensorRTModule, "setup_engine", lambda self: seen.append(self._runtime_settings))
    recorder = TorchTensorRTModule.setup_engine
    wanted = TRTSettings(cuda_graph_strategy="whole_graph_capture").to_runtime_settings(None)
    module = TorchTensorRTModule(name="e0")
    with created_with(wanted):
        assert TorchTensorRTModule.setup_engine is not recorder
        module.setup_engine()
    assert seen == [wanted]
    assert TorchTensorRTModule.setup_engine is recorder  # restored
    module.setup_engine()
    assert seen[-1] is wanted  # the stash stays; outside the block nothing is overridden
    other = TorchTensorRTModule(name="e1")
    other.setup_engine()
    assert seen[-1].cuda_graph_strategy == "disabled"


def test_refresh_without_mutable_modules_walks_nothing(monkeypatch, TTM):
    """The per-batch refresh is fenced to models holding a MutableTorchTensorRTModule (unverified on GPU)."""
    from lightning_trt_rtx import engines

    root = nn.Module()
    root.a = TTM(name="a")
    binding = EngineBinding(root)
    settings = TRTSettings().to_runtime_settings(_backend.new_cache_handle())
    assert binding.apply(settings) == 1
    walks: list[object] = []
    monkeypatch.setattr(engines, "find_mutable_modules", lambda root: walks.append(root) or [])
    root.b = TTM(name="b")  # a new engine: only apply (serve) finds it, not the per-batch refresh
    assert [binding.refresh() for _ in range(3)] == [0, 0, 0]
    assert walks == [] and root.b.runtime_settings is not settings
