"""The one channel for what this package tells the user: the ``lightning_trt_rtx`` logger.

``import torch_tensorrt`` calls ``logging.captureWarnings(True)``, after which ``warnings.warn`` goes
to a logger that prints nothing unless the user configured logging: every warning of a real run
would vanish. So, as Lightning does for its own logger, messages go through ``logging`` and a
handler on the package logger writes them to stderr, but only while the user has configured no
logging of their own (then their handlers get the records, once, through propagation; warnings also
when ``logging.config.dictConfig`` disabled the package logger, as its ``disable_existing_loggers``
default does)::

    from lightning_trt_rtx._messages import warn
    warn("Kernel cache ... is unusable", rank=rank)          # every rank: the message names the rank's file
    warn("No TensorRT engines found ...", rank=rank, rank_zero=True, once=True)
"""

from __future__ import annotations

import logging
import sys

LOGGER = "lightning_trt_rtx"
_said: set[str] = set()  # messages given ``once=True``: one cause, one message per process


class _StderrUntilConfigured(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` while the root logger has no handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the user's (or pytest's) logging gets the record through propagation
        self.stream = sys.stderr
        super().emit(record)


def install() -> None:
    """Give the package logger its stderr handler and INFO level (idempotent; the user's level wins)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StderrUntilConfigured) for h in logger.handlers):
        handler = _StderrUntilConfigured()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def _emit(level: int, message: str, rank: int, rank_zero: bool, once: bool, logger: str) -> None:
    if rank_zero and rank != 0:
        return
    if once:
        if message in _said:
            return
        _said.add(message)
    log = logging.getLogger(logger)
    if log.disabled and level >= logging.WARNING and log.getEffectiveLevel() <= level:
        # logging.config.dictConfig() disables the loggers made before it (disable_existing_loggers, its
        # default): a warning about the user's caches still reaches their handlers; infos stay off
        log.callHandlers(log.makeRecord(log.name, level, "(unknown file)", 0, message, (), None))
        return
    log.log(level, message)


def warn(message: str, *, rank: int = 0, rank_zero: bool = False, once: bool = False, logger: str = LOGGER) -> None:
    """A warning on stderr. ``rank_zero`` where every rank would say the same; ``once`` per process."""
    _emit(logging.WARNING, message, rank, rank_zero, once, logger)


def info(message: str, *, rank: int = 0, rank_zero: bool = False, logger: str = LOGGER) -> None:
    """An informational message on stderr (the figures table, a one-line summary)."""
    _emit(logging.INFO, message, rank, rank_zero, False, logger)
