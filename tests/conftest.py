"""Shared fixtures. GPU tests are gated like Lightning's own ``RunIf``: see ``tests/helpers.py``."""

from __future__ import annotations

import logging
import os

import pytest

from lightning_trt_rtx import _messages, cache

FAKE_GPU = cache.Gpu(uuid="3b6d1a2c-5e2f-4a1b-9c3d-0123456789ab", name="NVIDIA H100 80GB HBM3", sm="sm90")
OTHER_GPU = cache.Gpu(uuid="9f8e7d6c-1a2b-4c3d-8e9f-ba9876543210", name="NVIDIA H100 80GB HBM3", sm="sm90")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``--numprocesses auto`` (tox.ini, ``--dist loadfile``: a file's tests in one worker, so module
    fixtures such as a gloo group of ranks start once): where a GPU is visible the tests run in this
    process, one at a time, as GPU tests must (some time the GPU); elsewhere xdist picks (one per core)."""
    import torch

    return 0 if torch.cuda.is_available() else None


@pytest.fixture(scope="session")
def trt():
    """The real ``torch_tensorrt`` module, imported through the package's backend (works on CPU)."""
    from lightning_trt_rtx import _backend

    return _backend.torch_tensorrt()


@pytest.fixture
def settings(trt):
    """Upstream ``RuntimeSettings`` without a cache, by ``cuda_graph_strategy`` (the addresses' and programs' tests)."""
    return {
        s: trt.runtime.RuntimeSettings(cuda_graph_strategy=s, runtime_cache=None)
        for s in ("disabled", "whole_graph_capture")
    }


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Each test gets its own default cache dir and forgets which one-time messages were given."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "default-cache"))
    monkeypatch.setattr(_messages, "_said", set())


@pytest.fixture
def fake_gpu(monkeypatch):
    """This process "runs on" FAKE_GPU: the GPU identity faked at our own boundary (``cache.current_gpu``)."""
    monkeypatch.setattr(cache, "current_gpu", lambda: FAKE_GPU)
    return FAKE_GPU


class Messages(logging.Handler):
    """Every record the package logs, as text; ``.matching(s)`` filters by substring."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]

    @property
    def infos(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == logging.INFO]

    def matching(self, text: str) -> list[str]:
        return [m for m in self.warnings if text in m]


@pytest.fixture
def messages():
    """The package's messages (warnings and infos) given during the test."""
    handler = Messages()
    logger = logging.getLogger(_messages.LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def real_cache_bytes() -> bytes:
    """A real TensorRT-RTX 1.6.1 runtime cache, saved on an H200 (sm90) from a small conv net."""
    with open(os.path.join(os.path.dirname(__file__), "data", "rtx-1.6.1-sm90.bin"), "rb") as f:
        return f.read()
