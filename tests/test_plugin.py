"""TRTRuntimePrecision in a real Trainer on CPU, alone and next to the TRTRuntimeSettings callback."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from lightning_trt_rtx import TRTRuntimePrecision, TRTRuntimeSettings, _backend, cache
from lightning_trt_rtx.session import ServingSession
from tests.procs.lightning_models import EngineModel, make_trainer, predict_loader


def snapshot(model: EngineModel) -> list[Any]:
    return [e.runtime_settings for e in model.engines()]


def assert_restored(model: EngineModel, prior: list[Any]) -> None:
    assert all(a is b for a, b in zip(snapshot(model), prior, strict=True))


def assert_served(seen: list[Any], strategy: str, kernel: str = "lazy") -> Any:
    assert len(seen) == 3
    assert len({id(rs.runtime_cache) for rs in seen}) == 1
    assert all(rs.cuda_graph_strategy == strategy for rs in seen)
    assert all(rs.dynamic_shapes_kernel_specialization_strategy == kernel for rs in seen)
    return seen[0].runtime_cache


def seed_sibling(tmp_path, data: bytes) -> str:
    """A valid cache for another rank: rank 0 starts seeded; its own file appears only if it is saved."""
    (tmp_path / "rank5.bin").write_bytes(data)
    return str(tmp_path / "rank{rank}.bin")


class ConvertRecorder(EngineModel):
    """Records what the engines held when the first hook after ``strategy.setup`` ran."""

    def on_predict_start(self) -> None:
        self.at_predict_start = snapshot(self)


def test_plugin_applies_in_convert_module_and_saves_in_teardown(tmp_path, real_cache_bytes):
    model = ConvertRecorder()
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(
        "32-true",
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=seed_sibling(tmp_path, real_cache_bytes),
    )
    trainer = make_trainer(tmp_path, plugins=[plugin])
    assert trainer.precision_plugin is plugin
    assert trainer.precision == "32-true"
    out = trainer.predict(model, predict_loader(batches=2))

    assert [o.dtype for o in out] == [torch.float32, torch.float32]
    handle = assert_served(model.at_predict_start, "whole_graph_capture", "eager")
    assert handle is not None
    for step in model.seen:
        assert assert_served(step, "whole_graph_capture", "eager") is handle
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes  # saved in teardown
    assert_restored(model, prior)
    assert ServingSession.of(model).active is False


def test_plugin_saves_and_restores_after_exception(tmp_path, real_cache_bytes):
    error = ValueError("plugin run fails")
    model = EngineModel(fail_at=0, error=error)
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(cuda_graph_strategy="whole_graph_capture", runtime_cache=seed_sibling(tmp_path, real_cache_bytes))
    with pytest.raises(ValueError, match="plugin run fails") as excinfo:
        make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader())
    assert excinfo.value is error
    assert_served(model.seen[0], "whole_graph_capture")
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)


def test_plugin_saves_after_keyboard_interrupt(tmp_path, real_cache_bytes):
    handler = signal.getsignal(signal.SIGINT)
    model = EngineModel(fail_at=0, error=KeyboardInterrupt())
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(runtime_cache=seed_sibling(tmp_path, real_cache_bytes))
    try:
        with pytest.raises(SystemExit) as excinfo:  # Lightning 2.6 turns Ctrl-C into sys.exit(1)
            make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader())
    finally:
        signal.signal(signal.SIGINT, handler)
    assert excinfo.value.code == 1
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)


def test_plugin_wraps_bf16_mixed(tmp_path):
    model = EngineModel()
    plugin = TRTRuntimePrecision("bf16-mixed", runtime_cache=None)
    assert isinstance(plugin.inner, MixedPrecision) and plugin.precision == "bf16-mixed"
    trainer = make_trainer(tmp_path, plugins=[plugin])
    assert trainer.precision == "bf16-mixed"
    out = trainer.predict(model, predict_loader(batches=1))
    assert out[0].dtype == torch.bfloat16  # the wrapped precision's autocast ran predict_step
    assert all(rs.runtime_cache is None and rs.cuda_graph_strategy == "disabled" for rs in model.seen[0])


def test_plugin_wraps_a_precision_instance(tmp_path):
    inner = MixedPrecision("bf16-mixed", device="cpu")
    plugin = TRTRuntimePrecision(inner, cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    assert plugin.inner is inner
    model = EngineModel()
    out = make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader(batches=1))
    assert out[0].dtype == torch.bfloat16
    assert all(rs.cuda_graph_strategy == "whole_graph_capture" for rs in model.seen[0])
    assert plugin.state_dict() == inner.state_dict()


@pytest.mark.parametrize("precision", ["64-true", "16-true", "bf16", 32])
def test_plugin_rejects_invalid_precision(precision):
    with pytest.raises(ValueError, match=r"Valid choices: \['32-true', '16-mixed', 'bf16-mixed'\]"):
        TRTRuntimePrecision(precision)


def test_plugin_rejects_nested_plugin_and_invalid_settings():
    with pytest.raises(TypeError, match="cannot wrap another TRTRuntimePrecision"):
        TRTRuntimePrecision(TRTRuntimePrecision(runtime_cache=None))
    with pytest.raises(ValueError, match="'disabled', 'whole_graph_capture'"):
        TRTRuntimePrecision(cuda_graph_strategy="on")
    with pytest.raises(ValueError, match="'lazy', 'eager', 'none'"):
        TRTRuntimePrecision(dynamic_shapes_kernel_specialization_strategy="Eager!")
    with pytest.raises(ValueError, match="Valid placeholders"):
        TRTRuntimePrecision(runtime_cache="/c/{device}.bin")


@pytest.fixture
def counted(monkeypatch):
    """Counts settings given to engines and cache saves, each passed through to the real function."""
    calls: dict[str, list] = {"set": [], "save": []}
    set_settings, save = _backend.set_trt_module_settings, cache.save

    def record_set(module, settings):
        calls["set"].append((module, settings))
        return set_settings(module, settings)

    def record_save(path, data, stats=None):
        calls["save"].append(path)
        return save(path, data, stats)

    monkeypatch.setattr(_backend, "set_trt_module_settings", record_set)
    monkeypatch.setattr(cache, "save", record_save)
    return calls


def test_plugin_and_callback_with_equal_settings_apply_and_save_once(tmp_path, real_cache_bytes, counted):
    template = seed_sibling(tmp_path, real_cache_bytes)
    model = EngineModel()
    prior = snapshot(model)
    kwargs = dict(cuda_graph_strategy="whole_graph_capture", runtime_cache=template)
    plugin, callback = TRTRuntimePrecision(**kwargs), TRTRuntimeSettings(**kwargs)
    make_trainer(tmp_path, plugins=[plugin], callbacks=[callback]).predict(model, predict_loader(batches=2))

    assert_served(model.seen[0], "whole_graph_capture")
    applied = [s for _, s in counted["set"] if s.cuda_graph_strategy == "whole_graph_capture"]
    assert len(applied) == 3  # once per engine
    assert len(counted["set"]) == 6  # and once per engine to restore
    assert counted["save"] == [str(tmp_path / "rank0.bin")]
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)
    assert callback.figures[0].engines == 3


def test_plugin_and_callback_with_different_settings_fail_clearly(tmp_path):
    model = EngineModel()
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    callback = TRTRuntimeSettings(cuda_graph_strategy="disabled", runtime_cache=None)
    with pytest.raises(ValueError, match="TRTRuntimePrecision and TRTRuntimeSettings configure different") as excinfo:
        make_trainer(tmp_path, plugins=[plugin], callbacks=[callback]).predict(model, predict_loader())
    assert "either the TRTRuntimeSettings callback or the TRTRuntimePrecision plugin" in str(excinfo.value)
    assert model.seen == []
    assert_restored(model, prior)


def test_plugin_repeated_predict(tmp_path):
    model = EngineModel()
    prior = snapshot(model)
    trainer = make_trainer(tmp_path, plugins=[TRTRuntimePrecision(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))])
    for _ in range(2):
        trainer.predict(model, predict_loader(batches=1))
        assert_served(model.seen[-1], "whole_graph_capture")
        assert_restored(model, prior)
    assert model.seen[0][0].runtime_cache is model.seen[1][0].runtime_cache


def test_plugin_without_engines_warns_once(tmp_path, recwarn):
    model = EngineModel(engines_in="none")
    trainer = make_trainer(tmp_path, plugins=[TRTRuntimePrecision(runtime_cache=str(tmp_path / "c" / "r{rank}.bin"))])
    out = trainer.predict(model, predict_loader(batches=2))
    assert len(out) == 2
    messages = [str(w.message) for w in recwarn if "No TensorRT engines" in str(w.message)]
    assert len(messages) == 1 and "EngineModel" in messages[0]
    assert not (tmp_path / "c").exists()


def test_plain_precision_instance_still_works_as_inner(tmp_path):
    inner = Precision()
    plugin = TRTRuntimePrecision(inner, runtime_cache=None)
    assert plugin.precision == "32-true"
    model = EngineModel()
    out = make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader(batches=1))
    assert out[0].dtype == torch.float32
    assert all(rs.runtime_cache is None for rs in model.seen[0])
