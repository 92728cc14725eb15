"""Subprocess workers for the reliability suite, and the payload helper the tests share.

Run from the repository root as ``python -m tests.reliability.workers MODE JSON_ARGS``:

* ``rounds``: save through ``lightning_trt_rtx.cache`` for several rounds, in lockstep with the other
  workers (a file barrier per round), reading the cache back each round; writes a JSON result file.
* ``crash``: start one save and stop at a chosen point (half-written temp file, before the file
  fsync, before the rename, after the rename but before the directory fsync, after the save);
  signal readiness through a file and block until the test SIGKILLs it.
* ``ddp_predict``: a two-process CPU DDP ``Trainer.predict`` whose ``predict_step`` raises on
  every rank; each rank records what reached it and its own figures.

The package's messages go through the ``lightning_trt_rtx`` logger (not ``warnings``): the workers
record them with :class:`PackageMessages` (and they still reach the worker's stderr).

The ``rounds`` and ``crash`` workers import ``lightning_trt_rtx/cache.py`` (the real module file)
without running the package ``__init__`` (which imports Lightning, ~3 s per process): many
processes start, and they must contend for files, not for the two CPU cores during imports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import time
import types
from pathlib import Path
from typing import Any

HEADER_LEN = 20  # TensorRT-RTX runtime-cache header: magic tag, ..., uint64 size at offset 8
REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "rtx-1.6.1-sm90.bin"


def make_payload(base: bytes, tag: str, size: int | None = None) -> bytes:
    """A valid, unique cache file built from real cache bytes.

    The body (after the 20-byte header) is cut to ``size`` bytes and stamped with ``tag`` at both
    ends, and the header's uint64 size at offset 8 is set to the body length: ``check_bytes`` accepts
    it, and any mix of two payloads (a torn write) is told apart from each of them.
    """
    body = bytearray(base[HEADER_LEN:] if size is None else base[HEADER_LEN : HEADER_LEN + size])
    mark = tag.encode()[:32].ljust(32, b".")
    if len(body) < 2 * len(mark):
        raise ValueError(f"size {size} too small for a payload")
    body[: len(mark)] = mark
    body[-len(mark) :] = mark
    header = bytearray(base[:HEADER_LEN])
    struct.pack_into("<Q", header, 8, len(body))
    return bytes(header + body)


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()[:16]


def round_payload(base: bytes, rank: int, round_: int) -> bytes:
    """What ``rank`` writes in ``round_``: unique, and a different length for every (rank, round)."""
    return make_payload(base, f"rank{rank}-round{round_}", size=len(base) - HEADER_LEN - 13 * (rank * 31 + round_))


def import_cache() -> Any:
    """``lightning_trt_rtx.cache`` from the repository, without the package ``__init__`` (see module doc)."""
    if "lightning_trt_rtx" not in sys.modules:
        package = types.ModuleType("lightning_trt_rtx")
        package.__path__ = [str(REPO / "lightning_trt_rtx")]
        sys.modules["lightning_trt_rtx"] = package
    from lightning_trt_rtx import cache

    return cache


def barrier(directory: str, name: str, rank: int, parties: int, timeout: float = 60.0) -> None:
    """Wait until ``parties`` processes reached barrier ``name`` (one marker file each)."""
    Path(directory, f"{name}.{rank}").touch()
    deadline = time.monotonic() + timeout
    while sum(1 for f in os.listdir(directory) if f.startswith(name + ".")) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: rank {rank} waited {timeout} s")
        time.sleep(0.0005)


class PackageMessages(logging.Handler):
    """Records the package's warnings (logger ``lightning_trt_rtx``) for the ``with`` block.

    ``echo``: also write each to stderr, as the package's own handler would (the workers that skip the
    package ``__init__`` have none installed).
    """

    def __init__(self, echo: bool = False) -> None:
        super().__init__(logging.WARNING)
        self.echo = echo
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.echo:
            sys.stderr.write(message + "\n")

    def __enter__(self) -> PackageMessages:
        logging.getLogger("lightning_trt_rtx").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("lightning_trt_rtx").removeHandler(self)


# --- rounds -------------------------------------------------------------------------------------------


def rounds(args: dict) -> None:
    cache = import_cache()
    base = FIXTURE.read_bytes()
    rank, world = args["rank"], args["world_size"]
    placement = cache.Placement(rank=rank, local_rank=rank % 4, node_rank=rank // 4, world_size=world, host="h")
    template = args["template"]
    path = placement.resolve(template)
    log = []
    for r in range(args["rounds"]):
        barrier(args["barrier_dir"], f"round{r}", rank, world)
        with PackageMessages(echo=True) as caught:
            data, stats = cache.load(template, placement)
            payload = round_payload(base, rank, r)
            saved = cache.save(path, payload)
        log.append(
            {
                "round": r,
                "source": stats.source,
                "loaded": digest(data),
                "loaded_valid": data is None or cache.check_bytes(data) is None,
                "loaded_from": stats.loaded_from,
                "wrote": digest(payload),
                "saved": saved.saved,
                "save_error": saved.save_error,
                "warnings": caught.messages,
            }
        )
    Path(args["out"]).write_text(json.dumps(log))


# --- crash --------------------------------------------------------------------------------------------

CRASH_POINTS = ("mid-write", "before-file-fsync", "before-rename", "before-dir-fsync", "after-save")


def _block(ready: str) -> None:
    Path(ready).touch()
    while True:  # until SIGKILL
        time.sleep(60)


def crash(args: dict) -> None:
    cache = import_cache()
    point, ready = args["point"], args["ready"]
    if point not in CRASH_POINTS:
        raise SystemExit(f"unknown crash point {point!r}; valid: {CRASH_POINTS}")
    real_open, real_fsync, real_replace = open, os.fsync, os.replace

    if point == "mid-write":

        class HalfWriter:
            """The temp file gets half the bytes, flushed to the OS, then the writer stalls."""

            def __init__(self, f: Any) -> None:
                self.f = f

            def __enter__(self) -> HalfWriter:
                return self

            def __exit__(self, *exc: Any) -> None:
                self.f.close()

            def write(self, data: bytes) -> int:
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                _block(ready)
                return 0

            def __getattr__(self, name: str) -> Any:
                return getattr(self.f, name)

        def opener(file: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            f = real_open(file, mode, *a, **kw)
            return HalfWriter(f) if "w" in mode and str(file).endswith(".tmp") else f

        cache.open = opener  # module global: shadows the builtin for cache.py only
    elif point in ("before-file-fsync", "before-dir-fsync"):
        import stat

        def fsync(fd: int) -> None:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if is_dir == (point == "before-dir-fsync"):
                _block(ready)
            real_fsync(fd)

        os.fsync = fsync
    elif point == "before-rename":

        def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
            _block(ready)
            real_replace(src, dst, *a, **kw)

        os.replace = replace

    payload = make_payload(FIXTURE.read_bytes(), args["tag"], size=args.get("size"))
    stats = cache.save(args["path"], payload)
    if point == "after-save":
        assert stats.saved, stats
        _block(ready)
    raise SystemExit(f"crash point {point} was never reached: {stats}")


def save_once(args: dict) -> None:
    """A plain save (used as a waiter on a lock another process holds)."""
    cache = import_cache()
    payload = make_payload(FIXTURE.read_bytes(), args["tag"], size=args.get("size"))
    Path(args["started"]).touch()
    start = time.monotonic()
    stats = cache.save(args["path"], payload)
    elapsed = time.monotonic() - start
    Path(args["out"]).write_text(json.dumps({"saved": stats.saved, "error": stats.save_error, "s": elapsed}))


# --- DDP ----------------------------------------------------------------------------------------------


def engine_model_class() -> type:
    """A LightningModule holding real engine-less TorchTensorRTModules; ``predict_step`` runs a Linear.

    It records, at every ``predict_step``, the runtime settings each engine holds (what a real
    engine would create its execution context with), and raises ``error`` at batch ``fail_at``.
    """
    global _EngineModel
    if _EngineModel is not None:
        return _EngineModel
    import torch
    from lightning.pytorch import LightningModule

    from lightning_trt_rtx import _backend

    _backend.torch_tensorrt()
    from torch_tensorrt.dynamo.runtime._TorchTensorRTModule import TorchTensorRTModule

    class EngineModel(LightningModule):
        def __init__(self, engines: int = 2, fail_at: int | None = None, error: BaseException | None = None):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.trt = torch.nn.ModuleList([TorchTensorRTModule(name=f"e{i}") for i in range(engines)])
            self.fail_at, self.error = fail_at, error
            self.seen: list = []

        def engines(self) -> list:
            return list(self.trt)

        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            self.seen.append([e.runtime_settings for e in self.trt])
            if self.fail_at is not None and batch_idx >= self.fail_at:
                raise self.error
            return self.linear(batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.predict_step(batch, batch_idx)

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.predict_step(batch, batch_idx)

    _EngineModel = EngineModel
    return EngineModel


_EngineModel: type | None = None


def ddp_predict(args: dict) -> None:
    import warnings

    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from lightning_trt_rtx import TRTRuntimeSettings

    warnings.simplefilter("ignore")  # Lightning's and torch's; the package's own go through logging
    model = engine_model_class()(fail_at=1, error=RuntimeError("boom"))
    callback = TRTRuntimeSettings(runtime_cache=args["template"], cuda_graph_strategy="whole_graph_capture")
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    loader = DataLoader(torch.randn(16, 4), batch_size=2)
    before = [repr(e.runtime_settings) for e in model.engines()]
    outcome: dict = {"raised": None}
    with PackageMessages() as messages:
        try:
            trainer.predict(model, loader)
        except BaseException as err:  # noqa: BLE001 - record exactly what reached the user
            outcome = {"raised": type(err).__name__, "message": str(err), "same_object": err is model.error}
    outcome.update(
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        batches_seen=len(model.seen),
        applied=[s.cuda_graph_strategy for s in model.seen[0]] if model.seen else [],
        restored=[repr(e.runtime_settings) for e in model.engines()] == before,
        # after an exception the callback keeps this rank's own figures (left for rank zero; it waits for nobody)
        figures=[
            {"rank": f.rank, "gpu": f.gpu, "engines": f.engines, "cache_source": f.cache_source,
             "cache_path": f.cache_path, "cache_bytes": f.cache_bytes, "saved_bytes": f.saved_bytes}
            for f in callback.figures
        ],
        messages=messages.messages,
    )
    Path(args["out_dir"], f"rank{trainer.global_rank}.json").write_text(json.dumps(outcome))


MODES = {"rounds": rounds, "crash": crash, "save_once": save_once, "ddp_predict": ddp_predict}

if __name__ == "__main__":
    MODES[sys.argv[1]](json.loads(sys.argv[2]))
