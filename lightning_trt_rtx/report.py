"""Per-rank serving figures, gathered once at the end of a run, a rank-zero table, logger metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from lightning_trt_rtx._messages import warn
from lightning_trt_rtx.cache import CacheStats

log = logging.getLogger(__name__)


@dataclass
class RankFigures:
    """What one rank's serving looked like. ``cache`` is the run's cache stats (None: no cache)."""

    rank: int = 0
    gpu: str = "cpu"
    engines: int = 0
    graphs: str = ""
    batches: int = 0
    first_batch_ms: float = 0.0
    mean_batch_ms: float = 0.0
    cache: CacheStats | None = None
    # added later, so positional construction keeps working:
    prewarmed: int = 0  # shape entries prewarmed before the first batch
    capture: str = ""  # whole-graph capture: whether addresses were held still, and any new captures
    auto: str = ""  # cuda_graph_strategy="auto": what it kept and the median per-batch times that decided
    auto_ms: dict[str, float] = field(default_factory=dict)  # those medians, by candidate (the last trial's)

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
        capture = f"; whole-graph capture: {self.capture}" if self.capture else ""
        capture = f"; auto graphs: {self.auto}{capture}" if self.auto else capture
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


def gather(figures: RankFigures) -> list[RankFigures]:
    """Every rank's figures, in rank order: one collective, called by all ranks at the same point."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [figures]
    world = torch.distributed.get_world_size()
    if world == 1:
        return [figures]
    gathered: list[Any] = [None] * world
    try:
        torch.distributed.all_gather_object(gathered, asdict(figures))
    except Exception as err:
        # a peer that failed (its predict_step raised) closes its connections: this rank's run is done
        # and its cache saved, so the figures table must not turn its success into an error
        warn(f"Could not gather the other ranks' serving figures ({err}); reporting this rank only.", rank=figures.rank)
        return [figures]
    return [RankFigures.from_dict(g) for g in gathered]


def table(rows: list[RankFigures]) -> str:
    """A fixed-width table of every rank's figures."""
    header: tuple[str, ...] = ("rank", "gpu", "engines", "cache", "applies", "loaded", "saved", "batches")
    header += ("first batch", "mean batch", "cache file")
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
            r.cache_path or "-",
        )
        for r in rows
    ]
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
