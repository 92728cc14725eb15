"""A worker process that saves kernel caches through ``lightning_trt_rtx.cache`` (used by tests/test_cache.py).

    python tests/procs/cache_writer.py '<json>'

JSON keys: ``mode`` (``rounds`` or ``hang``), ``template``, ``rank``, ``rounds``, ``base`` (path of a
real cache file the payloads are made from), ``go`` (a file to wait for before writing, so all workers
start together), ``stage`` (``hang`` only: ``fsync`` or ``replace``, where the save stops).

The worker loads ``lightning_trt_rtx/cache.py`` by file path: it is the library's own module, but
without importing the package (which pulls in torch and Lightning, ~3 s per process on a 2-core host).
Everything it does is reported as JSON lines on stdout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
import time

HEADER_LEN = 20


def load_cache_module():
    spec = importlib.util.find_spec("lightning_trt_rtx")
    path = os.path.join(spec.submodule_search_locations[0], "cache.py")
    module_spec = importlib.util.spec_from_file_location("lightning_trt_rtx_cache_worker", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look the module up by name
    module_spec.loader.exec_module(module)
    return module


def make_payload(base: bytes, rank: int, round_: int) -> bytes:
    """A valid cache blob unique to (rank, round): the real header with its size field rewritten, and
    a body cut to a (rank, round)-dependent length and stamped at both ends with rank and round."""
    body_len = len(base) - HEADER_LEN - ((rank * 7919 + round_ * 104729) % 50000)
    body = bytearray(base[HEADER_LEN : HEADER_LEN + body_len])
    stamp = struct.pack("<II", rank, round_)
    body[: len(stamp)] = stamp
    body[-len(stamp) :] = stamp
    return base[:8] + struct.pack("<Q", body_len) + base[16:HEADER_LEN] + bytes(body)


def emit(**record) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def wait_for(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


def run_rounds(cache, cfg: dict, base: bytes) -> None:
    rank = cfg["rank"]
    placement = cache.Placement(rank=rank, world_size=cfg.get("world_size", 1), sm="sm90", trt="1.6.1", cuda="13.0")
    path = placement.resolve(cfg["template"])
    emit(event="ready", rank=rank, path=path)
    wait_for(cfg["go"])
    previous = None
    for round_ in range(cfg["rounds"]):
        if cfg.get("check_own", False) and previous is not None:
            # a per-rank file is this rank's alone: it must hold exactly what this rank saved last
            data, stats = cache.load(cfg["template"], placement)
            emit(event="load", rank=rank, round=round_, source=stats.source, same=data == previous)
        payload = make_payload(base, rank, round_)
        stats = cache.save(path, payload)
        emit(event="save", rank=rank, round=round_, saved=stats.saved, error=stats.save_error, bytes=stats.save_bytes)
        previous = payload


def run_hang(cache, cfg: dict, base: bytes) -> None:
    """Start a save and stop dead at ``stage`` (the lock held, the .tmp written): the parent kills us."""
    stage = cfg["stage"]
    real = getattr(os, stage)

    def stop(*args, **kwargs):
        emit(event="hang", stage=stage, pid=os.getpid())
        time.sleep(120)
        return real(*args, **kwargs)

    setattr(os, stage, stop)
    payload = make_payload(base, cfg["rank"], cfg.get("round", 0))
    stats = cache.save(cfg["template"], payload)
    emit(event="save", saved=stats.saved, error=stats.save_error)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    cache = load_cache_module()
    with open(cfg["base"], "rb") as f:
        base = f.read()
    {"rounds": run_rounds, "hang": run_hang}[cfg["mode"]](cache, cfg, base)


if __name__ == "__main__":
    main()
