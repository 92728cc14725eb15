"""Per-rank serving figures, handed to rank zero at the end of a run, a rank-zero table, logger metrics.

No collective: a collective that one rank skips (it raised, it served nothing, it was never opened
there) blocks the others until the process group's timeout. Each rank other than zero leaves its
figures in the process group's store when its run ends, also after an exception (a ``set``, which
waits for nobody); rank zero reads them, waiting at most ``$LIGHTNING_TRT_RTX_FIGURES_TIMEOUT_S``
(default 60) for ranks still running, then reports without the ones missing and says which::

    report.open_run(rank, world_size)                      # rank zero numbers the run (where every rank starts it)
    report.post(figures, world_size)                       # every rank when its run ends, also after an exception
    rows = report.collect(figures, world_size=world_size)  # rank zero: every rank's rows; elsewhere its own

``world_size`` is the run's (a Trainer's): where it is not the process group's (a single-device
Trainer inside a larger group, e.g. ``predict`` on rank zero after a DDP ``fit``) each process reports
alone. A store that does not answer (rank zero frozen, its node gone without a reset) holds
:func:`post` no longer than the figures' timeout.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from lightning_trt_rtx._messages import warn
from lightning_trt_rtx.cache import CacheStats

log = logging.getLogger(__name__)

FIGURES_TIMEOUT_ENV = "LIGHTNING_TRT_RTX_FIGURES_TIMEOUT_S"
FIGURES_TIMEOUT_S = 60.0
_KEY = "lightning_trt_rtx/figures"  # store keys: f"{_KEY}/run" (rank zero's run number), f"{_KEY}/{rank}"


@dataclass
class RankFigures:
    """What one rank's serving looked like. ``cache`` is the run's cache stats (None: no cache)."""

    rank: int = 0
    gpu: str = "cpu"
    engines: int = 0
    graphs: str = ""  # TRTCudaGraphs: what each target ran at its first call in the loop
    batches: int = 0
    first_batch_ms: float = 0.0
    mean_batch_ms: float = 0.0
    cache: CacheStats | None = None
    # added later, so positional construction keeps working:
    prewarmed: int = 0  # shape entries prewarmed before the first batch
    capture: str = ""  # whole-graph capture: whether addresses were held still, and any new captures
    step_gpu_ms: float = 0.0  # GPU time from a steady batch's start to its end (CUDA events), mean of one in 8
    uploads: str = ""  # batches uploaded ahead of the engine, or why not
    failed: bool = False  # the rank's run ended with an exception: its figures are up to it
    auto: str = ""  # cuda_graph_strategy="auto": what it kept and the median per-batch times that decided
    auto_ms: dict[str, float] = field(default_factory=dict)  # those medians, by candidate (the last trial's)

    @property
    def efficiency(self) -> float:
        """The share of a steady batch's time the GPU spent on the step (1.0: the loop never kept the
        GPU waiting); 0.0 when not measured."""
        if self.step_gpu_ms <= 0 or self.mean_batch_ms <= 0:
            return 0.0
        return min(self.step_gpu_ms / self.mean_batch_ms, 1.0)

    @property
    def cache_source(self) -> str:
        """``warm``, ``seeded``, ``other-gpu``, ``unverified``, ``cold``, ``corrupt``; ``none`` without a cache."""
        return self.cache.source if self.cache is not None else "none"

    @property
    def cache_path(self) -> str:
        return self.cache.path if self.cache is not None else ""

    @property
    def cache_bytes(self) -> int:
        return self.cache.load_bytes if self.cache is not None else 0

    @property
    def saved_bytes(self) -> int:
        return self.cache.save_bytes if self.cache is not None else 0

    def metrics(self, prefix: str = "trt_rtx") -> dict[str, float]:
        """Numeric figures for ``trainer.logger.log_metrics``."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(cache_bytes=self.cache_bytes, saved_bytes=self.saved_bytes, cache_warm=float(self.warm))
        values.update(efficiency=self.efficiency)
        return {
            f"{prefix}/{name}": float(value)
            for name, value in values.items()
            if isinstance(value, (int, float)) and name != "rank"
        }

    @property
    def warm(self) -> bool:
        """Whether the kernels this run loaded were filled on this GPU."""
        return self.cache is not None and self.cache.applies == "yes"

    def summary(self) -> str:
        """One line: engines, what the cache loaded and whether it applied, what was saved."""
        capture = f"; CUDA graphs: {self.graphs}" if self.graphs else ""
        capture += f"; auto graphs: {self.auto}" if self.auto else ""
        capture += f"; whole-graph capture: {self.capture}" if self.capture else ""
        if self.step_gpu_ms > 0:
            capture += (f"; {self.mean_batch_ms:.3f} ms per batch, step on GPU {self.step_gpu_ms:.3f} ms"
                        f" (efficiency {self.efficiency:.2f})")
        if self.uploads:
            capture += f"; uploads: {self.uploads}"
        if self.cache is None:
            return f"TensorRT-RTX serving: {self.engines} engine(s), no kernel cache{capture}"
        c = self.cache
        saved = format_bytes(c.save_bytes) + " saved" if c.saved else f"not saved ({c.save_error or 'nothing new'})"
        return (
            f"TensorRT-RTX serving: {self.engines} engine(s) on GPU {self.gpu}, kernel cache {c.source}"
            f" ({format_bytes(c.load_bytes)} loaded, applies: {c.applies}; {saved}) {c.path}{capture}"
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RankFigures:
        values = dict(values)
        stats = values.pop("cache", None)
        return cls(**values, cache=CacheStats(**stats) if stats is not None else None)


def _store(world_size: int | None = None) -> Any | None:
    """The store of the initialised process group (a TCP or file store every rank reaches), None without one
    or where the run's ``world_size`` (None: the group's) is not the group's: then each process reports alone."""
    try:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group_world = torch.distributed.get_world_size()
        if group_world == 1 or (world_size is not None and world_size != group_world):
            return None
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception as err:  # a process group without a store: each rank reports alone
        log.debug("No process-group store for the serving figures: %s", err)
        return None


def _bounded(what: str, call: Callable[[], None]) -> None:
    """``call`` (store calls) in a daemon thread, waited for at most :func:`figures_timeout_s`: a store call
    to a rank zero that does not answer blocks without a limit of its own. Never raises."""

    def run() -> None:
        try:
            call()
        except Exception as err:  # rank zero's store may be gone (it failed): its report is not ours to give
            log.debug("Could not %s: %s", what, err)

    thread = threading.Thread(target=run, name="lightning-trt-rtx-figures", daemon=True)
    thread.start()
    thread.join(figures_timeout_s())
    if thread.is_alive():
        log.debug("Gave up waiting to %s: the process group's store did not answer", what)


def open_run(rank: int, world_size: int | None = None) -> None:
    """Rank zero numbers a new run, before any rank can end it (call where every rank starts one)."""
    store = _store(world_size)
    if rank != 0 or store is None:
        return
    _bounded("number this run in the process group's store", lambda: store.add(f"{_KEY}/run", 1))


def post(figures: RankFigures, world_size: int | None = None) -> None:
    """A rank other than zero leaves its figures for rank zero; waits for nobody (a store that does not answer:
    at most the figures' timeout), never raises."""
    store = _store(world_size)
    if figures.rank == 0 or store is None:
        return

    def leave() -> None:
        run = store.add(f"{_KEY}/run", 0)  # rank zero's current run number; 0 if it numbered none
        store.set(f"{_KEY}/{figures.rank}", json.dumps({"run": run, "figures": asdict(figures)}))

    _bounded(f"leave rank {figures.rank}'s serving figures for rank zero", leave)


def figures_timeout_s() -> float:
    """How long rank zero waits for the other ranks' figures: ``$LIGHTNING_TRT_RTX_FIGURES_TIMEOUT_S``, default 60."""
    value = os.environ.get(FIGURES_TIMEOUT_ENV, "")
    try:
        return max(0.0, float(value)) if value.strip() else FIGURES_TIMEOUT_S
    except ValueError:
        warn(f"${FIGURES_TIMEOUT_ENV}={value!r} is not a number of seconds; using {FIGURES_TIMEOUT_S:g}.", once=True)
        return FIGURES_TIMEOUT_S


def collect(
    figures: RankFigures, timeout_s: float | None = None, *, world_size: int | None = None
) -> list[RankFigures]:
    """On rank zero, every rank's figures in rank order: the ones posted for this run within ``timeout_s``
    (default :func:`figures_timeout_s`); missing ranks are named in a warning. Elsewhere ``[figures]``."""
    store = _store(world_size)
    if figures.rank != 0 or store is None:
        return [figures]
    timeout_s = figures_timeout_s() if timeout_s is None else timeout_s
    world = torch.distributed.get_world_size()
    rows: dict[int, RankFigures] = {0: figures}
    deadline = time.monotonic() + timeout_s
    try:
        run = store.add(f"{_KEY}/run", 0)
        while True:
            for rank in range(1, world):
                key = f"{_KEY}/{rank}"
                if rank not in rows and store.check([key]):
                    posted = json.loads(store.get(key))
                    if posted["run"] == run:  # else an earlier run's: this one has not ended there yet
                        rows[rank] = RankFigures.from_dict(posted["figures"])
            if len(rows) == world or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
    except Exception as err:
        warn(f"Could not read the other ranks' serving figures ({err}); reporting the ones read.", rank=0)
    missing = [rank for rank in range(world) if rank not in rows]
    if missing:
        warn(
            f"Waited {timeout_s:g} s for the serving figures of rank(s) {', '.join(map(str, missing))} (each rank"
            " leaves them in the process group's store when its run ends); reporting without them. A rank that was"
            f" killed leaves none; one still running may need a longer ${FIGURES_TIMEOUT_ENV}.",
            rank=0,
        )
    failed = [rank for rank, row in rows.items() if row.failed]
    if failed:
        warn(f"Rank(s) {', '.join(map(str, failed))} ended with an exception: their figures go up to it.", rank=0)
    return [rows[rank] for rank in sorted(rows)]


def table(rows: list[RankFigures]) -> str:
    """A fixed-width table of every rank's figures."""
    header: tuple[str, ...] = ("rank", "gpu", "engines", "cache", "applies", "loaded", "saved", "batches")
    header += ("first batch", "mean batch", "step on GPU", "uploads", "cache file")
    body: list[tuple[str, ...]] = [
        (
            str(r.rank),
            r.gpu,
            str(r.engines),
            r.cache_source,
            r.cache.applies if r.cache is not None else "-",
            format_bytes(r.cache_bytes),
            _saved_cell(r.cache),
            str(r.batches),
            f"{r.first_batch_ms:.2f} ms",
            f"{r.mean_batch_ms:.3f} ms",
            f"{r.step_gpu_ms:.3f} ms ({r.efficiency:.2f})" if r.step_gpu_ms > 0 else "-",
            r.uploads or "-",
            r.cache_path or "-",
        )
        for r in rows
    ]
    if any(r.graphs for r in rows):  # TRTCudaGraphs: what each target ran, read at its first call
        header = (*header[:-1], "CUDA graphs", header[-1])
        body = [(*row[:-1], r.graphs or "-", row[-1]) for row, r in zip(body, rows)]
    if any(r.auto for r in rows):  # cuda_graph_strategy="auto": what it kept, per rank
        header = (*header[:-1], "auto", header[-1])
        body = [(*row[:-1], r.auto or "-", row[-1]) for row, r in zip(body, rows)]
    if any(r.capture for r in rows):  # whole-graph capture: whether it could replay, per rank
        header = (*header[:-1], "whole-graph capture", header[-1])
        body = [(*row[:-1], r.capture or "-", row[-1]) for row, r in zip(body, rows)]
    return format_columns(header, body)


def format_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``header`` and ``rows`` as left-aligned columns, a dashed rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _saved_cell(stats: CacheStats | None) -> str:
    if stats is None or not (stats.saved or stats.save_error):
        return "-"
    if stats.saved:
        return format_bytes(stats.save_bytes)
    return "-" if stats.save_error.startswith("nothing to save") else "FAILED"


def format_bytes(n: int) -> str:
    """``503.0 KiB``: a byte count for tables."""
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"
