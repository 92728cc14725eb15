"""The package's messages reach the user: through the ``lightning_trt_rtx`` logger, printed on stderr by the
package's own handler when the user configured no logging, by the user's handlers (once) when they did.

``import torch_tensorrt`` calls ``logging.captureWarnings(True)``, after which ``warnings.warn`` prints
nothing in a script that configured no logging. The subprocess tests reproduce exactly that: a fresh
interpreter imports torch_tensorrt first (through ``_backend.torch_tensorrt()``, which works on CPU), then
meets real cache faults (a corrupt file, a save that cannot create its directory) and says what it must.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from lightning_trt_rtx import _messages
from lightning_trt_rtx._messages import info, warn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: ``sys.argv[1]`` is a JSON dict (``corrupt``: a bad cache file to load,
# ``blocker``: a regular file a save must create a directory under, ``basic_config``: call the user's
# ``logging.basicConfig`` after the import). Prints ``captured=<bool>`` on stdout: whether torch_tensorrt
# turned on ``logging.captureWarnings``.
SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys

    cfg = json.loads(sys.argv[1])
    from lightning_trt_rtx import _backend

    _backend.torch_tensorrt()  # a user's ``import torch_tensorrt``, first of all
    if cfg.get("basic_config"):
        logging.basicConfig(level=logging.INFO, format="USER %(levelname)s %(name)s | %(message)s")
    from lightning_trt_rtx import _messages, cache

    data, stats = cache.load(cfg["corrupt"], cache.Placement())
    assert stats.source == "corrupt", stats
    with open(cfg["good"], "rb") as f:
        good = f.read()
    stats = cache.save(os.path.join(cfg["blocker"], "sub", "gpu-cpu.bin"), good)
    assert not stats.saved, stats
    _messages.warn("RANK-ZERO-ONLY said on rank 1", rank=1, rank_zero=True)
    _messages.warn("RANK-ZERO-ONLY said on rank 0", rank=0, rank_zero=True)
    _messages.warn("EVERY-RANK said on rank 1", rank=1)
    for _ in range(3):
        _messages.warn("ONCE-PER-PROCESS", once=True)
    _messages.info("AN-INFO-LINE")
    print("captured=" + str(getattr(logging, "_warnings_showwarning", None) is not None))
    """
)


def run_fresh(tmp_path, real_cache_bytes, basic_config: bool) -> subprocess.CompletedProcess:
    corrupt = tmp_path / "k" / "gpu-cpu.bin"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(real_cache_bytes[:5000])
    good = tmp_path / "good.bin"
    good.write_bytes(real_cache_bytes)
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file, not a directory")
    cfg = dict(corrupt=str(corrupt), good=str(good), blocker=str(blocker), basic_config=basic_config)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cfg)], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr
    return result


def lines_with(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


@pytest.mark.timeout(300)
def test_messages_reach_stderr_after_torch_tensorrt_import_without_logging_config(tmp_path, real_cache_bytes):
    result = run_fresh(tmp_path, real_cache_bytes, basic_config=False)
    # the premise: in this process torch_tensorrt turned on captureWarnings, so warnings.warn would print nothing
    assert "captured=True" in result.stdout, result.stdout
    corrupt = str(tmp_path / "k" / "gpu-cpu.bin")
    unusable = lines_with(result.stderr, f"Kernel cache {corrupt} is unusable")
    assert len(unusable) == 1, result.stderr
    assert "moved aside" in unusable[0] and "cold" in unusable[0]
    assert unusable[0].startswith("Kernel cache")  # the package's handler: the message itself, no log prefix
    failed = lines_with(result.stderr, "Could not save the kernel cache to")
    assert len(failed) == 1 and str(tmp_path / "blocker") in failed[0], result.stderr
    # rank_zero: said on rank 0 only; once: once in this process; infos reach the user too
    assert lines_with(result.stderr, "RANK-ZERO-ONLY said on rank 1") == []
    assert len(lines_with(result.stderr, "RANK-ZERO-ONLY said on rank 0")) == 1
    assert len(lines_with(result.stderr, "EVERY-RANK said on rank 1")) == 1
    assert len(lines_with(result.stderr, "ONCE-PER-PROCESS")) == 1
    assert len(lines_with(result.stderr, "AN-INFO-LINE")) == 1


@pytest.mark.timeout(300)
def test_with_the_users_basic_config_each_message_is_printed_once(tmp_path, real_cache_bytes):
    result = run_fresh(tmp_path, real_cache_bytes, basic_config=True)
    corrupt = str(tmp_path / "k" / "gpu-cpu.bin")
    unusable = lines_with(result.stderr, f"Kernel cache {corrupt} is unusable")
    assert len(unusable) == 1, result.stderr  # not twice: the package's handler steps aside
    assert unusable[0].startswith("USER WARNING lightning_trt_rtx | Kernel cache")  # through the user's handler
    failed = lines_with(result.stderr, "Could not save the kernel cache to")
    assert len(failed) == 1 and failed[0].startswith("USER WARNING"), result.stderr
    assert lines_with(result.stderr, "RANK-ZERO-ONLY said on rank 1") == []
    assert len(lines_with(result.stderr, "RANK-ZERO-ONLY said on rank 0")) == 1
    assert len(lines_with(result.stderr, "ONCE-PER-PROCESS")) == 1  # once in this process too
    info_lines = lines_with(result.stderr, "AN-INFO-LINE")
    assert len(info_lines) == 1 and info_lines[0].startswith("USER INFO")


DICT_CONFIG = textwrap.dedent(
    """
    import logging, logging.config, sys

    import torch.nn as nn

    from lightning_trt_rtx import ServingSession, TRTSettings, _backend, _messages, cache

    _backend.torch_tensorrt()
    # the user's logging, set up after the package's logger exists: disable_existing_loggers (the default)
    # switches that logger off
    logging.config.dictConfig({
        "version": 1,
        "handlers": {"out": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout",
                             "formatter": "user"}},
        "formatters": {"user": {"format": "USER %(levelname)s %(name)s | %(message)s"}},
        "root": {"handlers": ["out"], "level": "INFO"},
    })
    logging.getLogger("myapp").warning("THE-USERS-OWN")
    cache.save(sys.argv[1] + "/sub/gpu.bin", open(sys.argv[2], "rb").read())  # a save that cannot make its directory
    _messages.info("AN-INFO-LINE")
    print("disabled=" + str(logging.getLogger("lightning_trt_rtx").disabled))
    # a failure path's warning from a child logger: an engine's settings cannot be put back
    TTM = _backend.torch_tensorrt().dynamo.runtime.TorchTensorRTModule
    graphs = TRTSettings(runtime_cache=None, cuda_graph_strategy="whole_graph_capture")
    with ServingSession(nn.Sequential(TTM(name="e0")), graphs):
        _backend.set_trt_module_settings = lambda *a: (_ for _ in ()).throw(RuntimeError("ENGINE-GONE"))
    """
)


@pytest.mark.timeout(300)
def test_warnings_reach_handlers_set_up_by_dict_config_that_disabled_the_package_logger(tmp_path, real_cache_bytes):
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file, not a directory")
    good = tmp_path / "good.bin"
    good.write_bytes(real_cache_bytes)
    result = subprocess.run(
        [sys.executable, "-c", DICT_CONFIG, str(blocker), str(good)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "disabled=True" in result.stdout  # the premise: dictConfig switched the package logger off
    assert "USER WARNING myapp | THE-USERS-OWN" in result.stdout
    failed = lines_with(result.stdout, "Could not save the kernel cache to")
    assert len(failed) == 1 and failed[0].startswith("USER WARNING lightning_trt_rtx | "), result.stdout
    assert lines_with(result.stderr, "Could not save") == []  # through the user's handler, not printed twice
    assert lines_with(result.stdout + result.stderr, "AN-INFO-LINE") == []  # infos follow the user's config
    restore = lines_with(result.stdout, "Could not restore the runtime settings of engine")
    assert len(restore) == 1 and restore[0].startswith("USER WARNING lightning_trt_rtx.engines | "), result.stdout
    assert "ENGINE-GONE" in restore[0]


def test_rank_zero_messages_are_silent_on_other_ranks(messages):
    warn("said by rank zero only", rank=1, rank_zero=True)
    info("an info by rank zero only", rank=3, rank_zero=True)
    assert messages.records == []
    warn("said by rank zero only", rank=0, rank_zero=True)
    info("an info by rank zero only", rank=0, rank_zero=True)
    warn("every rank's own message", rank=1)  # without rank_zero every rank speaks
    assert messages.warnings == ["said by rank zero only", "every rank's own message"]
    assert messages.infos == ["an info by rank zero only"]


def test_once_gives_one_message_per_process(messages):
    for _ in range(3):
        warn("one cause, one message", once=True)
    warn("another cause", once=True)
    warn("not once", rank=2)
    warn("not once", rank=2)
    assert messages.warnings == ["one cause, one message", "another cause", "not once", "not once"]
    assert "one cause, one message" in _messages._said  # remembered for the rest of the process


def test_rank_zero_and_once_together(messages):
    warn("no engines", rank=1, rank_zero=True, once=True)  # rank 1 says nothing, and does not use up the once
    warn("no engines", rank=0, rank_zero=True, once=True)
    warn("no engines", rank=0, rank_zero=True, once=True)
    assert messages.warnings == ["no engines"]


def test_messages_go_through_the_package_logger_at_their_level(messages):
    warn("a warning")
    info("an info")
    assert [(r.name, r.levelno, r.getMessage()) for r in messages.records] == [
        ("lightning_trt_rtx", logging.WARNING, "a warning"),
        ("lightning_trt_rtx", logging.INFO, "an info"),
    ]


def test_install_is_idempotent_and_the_users_level_wins():
    logger = logging.getLogger(_messages.LOGGER)
    saved_handlers, saved_level = logger.handlers[:], logger.level
    try:
        logger.handlers = []
        logger.setLevel(logging.NOTSET)
        _messages.install()
        _messages.install()
        assert [type(h) for h in logger.handlers] == [_messages._StderrUntilConfigured]
        assert logger.level == logging.INFO
        logger.setLevel(logging.ERROR)  # the user's choice
        _messages.install()
        assert logger.level == logging.ERROR and len(logger.handlers) == 1
    finally:
        logger.handlers = saved_handlers
        logger.setLevel(saved_level)
