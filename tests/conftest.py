"""Shared fixtures. GPU tests are gated like Lightning's own ``RunIf``: see ``tests/helpers.py``."""

from __future__ import annotations

import os

import pytest

from lightning_trt_rtx import cache


@pytest.fixture(scope="session")
def trt():
    """The real ``torch_tensorrt`` module, imported through the package's backend (works on CPU)."""
    from lightning_trt_rtx import _backend

    return _backend.torch_tensorrt()


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Each test gets its own default cache dir and no in-process shared handles from other tests."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "default-cache"))
    cache.forget_shared()
    yield
    cache.forget_shared()


@pytest.fixture
def real_cache_bytes() -> bytes:
    """A real TensorRT-RTX 1.6.1 runtime cache, saved on an H200 (sm90) from a small conv net."""
    with open(os.path.join(os.path.dirname(__file__), "data", "rtx-1.6.1-sm90.bin"), "rb") as f:
        return f.read()
