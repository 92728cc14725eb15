"""The backend seam: lazy import of torch_tensorrt, build detection, errors that say what to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

from lightning_trt_rtx import _backend


def run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and fail with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture
def fresh_import_cache():
    """Clear ``torch_tensorrt()``'s memo before and after, so monkeypatched probes are consulted."""
    _backend.torch_tensorrt.cache_clear()
    yield
    _backend.torch_tensorrt.cache_clear()


def test_import_package_does_not_import_torch_tensorrt():
    run_python(
        """
        import sys
        import lightning_trt_rtx
        from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimePrecision, TRTRuntimeSettings, TRTSettings
        import lightning_trt_rtx.__main__, lightning_trt_rtx.cache, lightning_trt_rtx.engines
        assert 'torch_tensorrt' not in sys.modules, sorted(m for m in sys.modules if 'tensorrt' in m)
        """
    )


def test_build_detection_without_import():
    proc = run_python(
        """
        import sys
        from lightning_trt_rtx import _backend
        print(_backend.is_available(), _backend.is_rtx_build(), _backend.installed_distribution())
        assert not _backend.is_imported()
        assert 'torch_tensorrt' not in sys.modules
        """
    )
    assert proc.stdout.split() == ["True", "True", "torch-tensorrt-rtx"]


def test_torch_tensorrt_imports_on_cpu_and_restores_cuda_queries(fresh_import_cache):
    if torch.cuda.is_available():
        pytest.skip("the CUDA-query shim is only installed on hosts without CUDA")
    capability, current = torch.cuda.get_device_capability, torch.cuda.current_device
    module = _backend.torch_tensorrt()
    assert module is sys.modules["torch_tensorrt"]
    assert module.runtime.RuntimeSettings is _backend.runtime_settings_class()
    assert torch.cuda.get_device_capability is capability
    assert torch.cuda.current_device is current
    # the originals still behave like they do without a driver
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()
    assert _backend.torch_tensorrt() is module  # memoised


def test_torch_tensorrt_in_fresh_process_restores_cuda_queries():
    run_python(
        """
        import sys, torch
        from lightning_trt_rtx import _backend
        assert not torch.cuda.is_available()
        cap, cur = torch.cuda.get_device_capability, torch.cuda.current_device
        trt = _backend.torch_tensorrt()
        assert 'torch_tensorrt' in sys.modules and _backend.is_imported()
        assert torch.cuda.get_device_capability is cap and torch.cuda.current_device is cur
        assert trt.ENABLED_FEATURES.tensorrt_rtx
        rs = trt.runtime.RuntimeSettings(runtime_cache=None)
        assert rs.cuda_graph_strategy == 'disabled'
        """
    )


def test_is_rtx_build_after_import(trt):
    assert _backend.is_imported()
    assert _backend.is_rtx_build() is True
    assert trt.ENABLED_FEATURES.tensorrt_rtx


def test_missing_distribution_says_how_to_install(monkeypatch, fresh_import_cache):
    monkeypatch.setattr(_backend, "installed_distribution", lambda: None)
    assert not _backend.is_available()
    assert _backend.installed_version() is None
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-trt-rtx\[rtx\]'"):
        _backend.torch_tensorrt()
    with pytest.raises(ModuleNotFoundError):
        _backend.new_cache_handle()


@pytest.mark.parametrize("old", ["2.12.0", "2.11.1", "2.12.99"])
def test_old_version_names_installed_and_required(monkeypatch, fresh_import_cache, old):
    monkeypatch.setattr(_backend, "installed_version", lambda: Version(old))
    with pytest.raises(ImportError) as err:
        _backend.torch_tensorrt()
    message = str(err.value)
    assert old in message
    assert ">= 2.13" in message
    assert "pip install 'lightning-trt-rtx[rtx]'" in message
    assert "torch-tensorrt-rtx" in message


@pytest.mark.parametrize("new", ["2.13.0", "2.13.0.dev20250101", "2.14.0"])
def test_new_enough_version_is_accepted(monkeypatch, fresh_import_cache, new):
    monkeypatch.setattr(_backend, "installed_version", lambda: Version(new))
    assert _backend.torch_tensorrt().runtime.RuntimeSettings is not None


def test_codes_mirror_upstream(trt):
    from torch_tensorrt.runtime import _runtime_config

    assert _backend.KERNEL_STRATEGY_CODES == _runtime_config._DYNAMIC_SHAPES_KERNEL_STRATEGY_MAP
    assert _backend.CUDA_GRAPH_STRATEGY_CODES == _runtime_config._CUDA_GRAPH_STRATEGY_MAP


def test_new_cache_handle_has_no_path_and_no_autosave(trt):
    handle = _backend.new_cache_handle()
    assert isinstance(handle, trt.runtime.RuntimeCache)
    assert handle.path == ""
    assert handle.autosave_on_del is False
    assert _backend.new_cache_handle() is not handle


def test_recognisers(trt):
    ttm = trt.dynamo.runtime.TorchTensorRTModule(name="x")
    linear = torch.nn.Linear(2, 2)
    assert _backend.is_trt_module(ttm)
    assert not _backend.is_trt_module(linear)
    assert not _backend.is_bare_engine(linear)
    assert not _backend.is_bare_engine(object())
    assert not _backend.is_mutable_module(linear)
    mutable = trt.MutableTorchTensorRTModule(torch.nn.Linear(2, 2).eval(), device="cuda:0")
    assert _backend.is_mutable_module(mutable)
    assert _backend.cudagraphs_mode() == 0


def test_set_trt_module_settings_keeps_stash_exact(trt):
    """An engine-less TTM keeps exactly what it is given; the public setter would resolve a path."""
    RuntimeSettings = trt.runtime.RuntimeSettings
    ttm = trt.dynamo.runtime.TorchTensorRTModule(name="x")
    with_path = RuntimeSettings(runtime_cache="/nonexistent/dir/cache.bin", cuda_graph_strategy="whole_graph_capture")
    _backend.set_trt_module_settings(ttm, with_path)
    assert ttm.runtime_settings is with_path
    assert ttm.runtime_settings.runtime_cache == "/nonexistent/dir/cache.bin"


def test_bare_engine_settings_default_and_remembered(trt):
    class FakeEngine:
        def __init__(self):
            self.calls = []

        def update_runtime_settings(self, kernel, graphs, handle):
            self.calls.append((kernel, graphs, handle))

    engine = FakeEngine()
    default = _backend.bare_engine_settings(engine)
    assert default == trt.runtime.RuntimeSettings(runtime_cache=None)
    handle = _backend.new_cache_handle()
    settings = trt.runtime.RuntimeSettings(
        runtime_cache=handle,
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="none",
    )
    _backend.set_bare_engine_settings(engine, settings)
    assert _backend.bare_engine_settings(engine) is settings
    assert len(engine.calls) == 1
    kernel, graphs, torchbind_handle = engine.calls[0]
    assert (kernel, graphs) == (2, 1)
    assert torchbind_handle is handle._handle  # the torchbind handle behind the shared facade
    # another engine does not see these settings
    assert _backend.bare_engine_settings(FakeEngine()) == default
