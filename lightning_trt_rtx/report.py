"""Per-rank serving figures, gathered once at the end of a loop, a rank-zero table, logger metrics."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class RankFigures:
    """What one rank's serving looked like."""

    rank: int = 0
    engines: int = 0
    cache_source: str = "none"
    cache_path: str = ""
    cache_bytes: int = 0
    saved_bytes: int = 0
    batches: int = 0
    first_batch_ms: float = 0.0
    mean_batch_ms: float = 0.0

    def metrics(self, prefix: str = "trt_rtx") -> dict[str, float]:
        """Numeric figures for ``trainer.logger.log_metrics``."""
        return {
            f"{prefix}/{f.name}": float(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), (int, float)) and f.name != "rank"
        }


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
        warnings.warn(f"Could not gather the serving figures of the other ranks ({err}); reporting this rank only.")
        return [figures]
    return [RankFigures(**g) for g in gathered]


def table(rows: list[RankFigures]) -> str:
    """A fixed-width table of every rank's figures."""
    header = ("rank", "engines", "cache", "loaded", "saved", "batches", "first batch", "mean batch", "cache file")
    body = [
        (
            str(r.rank),
            str(r.engines),
            r.cache_source,
            format_bytes(r.cache_bytes),
            format_bytes(r.saved_bytes),
            str(r.batches),
            f"{r.first_batch_ms:.2f} ms",
            f"{r.mean_batch_ms:.3f} ms",
            r.cache_path or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    """``503.0 KiB``: a byte count for tables."""
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"
