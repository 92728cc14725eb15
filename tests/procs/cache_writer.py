"""A worker process that saves kernel caches through ``lightning_trt_rtx.cache`` (used by tests/test_cache.py).

    python tests/procs/cache_writer.py '<json>'

JSON keys: ``mode`` (``rounds``, ``hang``, ``save_once`` or ``hold_lock``), ``template`` (a template or,
for ``hang``/``save_once``/``hold_lock``, a path), ``rank``, ``round``/``rounds``, ``base`` (path of a real
cache file the payloads are made from), ``go`` (a file to wait for before writing, so all workers start
together), ``stage`` (``hang`` only: ``fsync`` or ``replace``, where the save stops), ``gpu`` (``{"uuid",
"name", "sm"}``: the physical GPU this process "runs on", recorded with every save; none: no GPU),
``host`` (the host name its records give), ``hold_s`` and ``fix`` (``hold_lock`` only).

The worker loads ``lightning_trt_rtx/cache.py`` by file path: it is the library's own module, but
without importing torch or Lightning (~3 s per process on a 2-core host); only the package's tiny
``__init__`` and ``_messages`` come with it. Everything it does is reported as JSON lines on stdout;
the package's own messages go to stderr.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
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


def placement_of(cache, cfg: dict):
    """Who this worker is: its rank, and the (faked) physical GPU and host its saves record."""
    gpu = cache.Gpu(**cfg["gpu"]) if cfg.get("gpu") else cache.Gpu()
    return cache.Placement(
        rank=cfg.get("rank", 0),
        world_size=cfg.get("world_size", 1),
        sm="sm90",
        trt="1.6.1",
        cuda="13.0",
        host=cfg.get("host") or socket.gethostname(),
        gpu=gpu,
    )


def run_rounds(cache, cfg: dict, base: bytes) -> None:
    rank = cfg["rank"]
    placement = placement_of(cache, cfg)
    path = placement.resolve(cfg["template"])
    emit(event="ready", rank=rank, path=path)
    wait_for(cfg["go"])
    previous = None
    for round_ in range(cfg["rounds"]):
        if cfg.get("check_own", False) and previous is not None:
            # a per-rank (or per-GPU) file is this process's alone: it must hold exactly what it saved last
            data, stats = cache.load(cfg["template"], placement)
            emit(event="load", rank=rank, round=round_, source=stats.source, same=data == previous)
        payload = make_payload(base, rank, round_)
        stats = cache.save(path, payload, placement=placement)
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
    stats = cache.save(cfg["template"], payload, placement=placement_of(cache, cfg))
    emit(event="save", saved=stats.saved, error=stats.save_error)


def run_save_once(cache, cfg: dict, base: bytes) -> None:
    """One ordinary save of payload (rank, round), as another process (another run) would do it."""
    payload = make_payload(base, cfg["rank"], cfg.get("round", 0))
    stats = cache.save(cfg["template"], payload, placement=placement_of(cache, cfg))
    emit(event="save", pid=os.getpid(), saved=stats.saved, error=stats.save_error, bytes=stats.save_bytes)


def run_hold_lock(cache, cfg: dict, base: bytes) -> None:
    """Hold ``<path>.lock`` (the lock every writer and the quarantine take) for ``hold_s`` seconds; with
    ``fix``, replace the file with a good payload and its record while holding it, as a saving process does."""
    from filelock import FileLock

    path = cfg["template"]
    with FileLock(path + ".lock", timeout=30):
        emit(event="locked", at=time.time())
        time.sleep(cfg["hold_s"])
        if cfg.get("fix"):
            payload = make_payload(base, cfg["rank"], cfg.get("round", 0))
            placement = placement_of(cache, cfg)
            record = cache._new_record(payload, placement)  # what a real save records
            recorded = json.dumps(dataclasses.asdict(record)).encode()
            for target, content in ((path, payload), (path + cache.RECORD_SUFFIX, recorded)):
                with open(target + ".fix", "wb") as f:
                    f.write(content)
                os.replace(target + ".fix", target)
            emit(event="replaced", at=time.time())
        released = time.time()
    emit(event="released", at=released)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    cache = load_cache_module()
    with open(cfg["base"], "rb") as f:
        base = f.read()
    modes = {"rounds": run_rounds, "hang": run_hang, "save_once": run_save_once, "hold_lock": run_hold_lock}
    modes[cfg["mode"]](cache, cfg, base)


if __name__ == "__main__":
    main()
