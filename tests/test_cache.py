"""The kernel-cache store: templates, checks, load/seed/quarantine, atomic saves that never lose a good
file, fsspec URLs, the shared in-process handle, and real concurrent and killed writer processes."""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import warnings

import fsspec
import pytest
import torch

from lightning_trt_rtx import _backend, cache
from tests.procs.cache_writer import make_payload

WRITER = os.path.join(os.path.dirname(__file__), "procs", "cache_writer.py")
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "rtx-1.6.1-sm90.bin")
PLACEMENT = cache.Placement(
    rank=3, local_rank=1, node_rank=2, world_size=8, sm="sm90", trt="1.6.1", cuda="13.0", host="nodeA"
)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def with_size_field(data: bytes, size: int) -> bytes:
    return data[:8] + struct.pack("<Q", size) + data[16:]


@pytest.fixture
def recorded():
    """Every warning raised inside the block, none filtered out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# --- templates and placement -----------------------------------------------------------------------


def test_template_fields():
    assert cache.template_fields("/c/{sm}-{trt}/{cuda}/{host}/n{node_rank}l{local_rank}r{rank}of{world_size}") == [
        "sm",
        "trt",
        "cuda",
        "host",
        "node_rank",
        "local_rank",
        "rank",
        "world_size",
    ]
    assert cache.template_fields("/c/plain.bin") == []
    assert cache.template_fields("/c/{{literal}}.bin") == []
    assert cache.is_per_rank("/c/rank{rank}.bin")
    assert not cache.is_per_rank("/c/{local_rank}.bin")  # local ranks repeat across nodes
    for bad in ("/c/{gpu}.bin", "/c/{rank:02d}.bin", "/c/{rank!s}.bin", "/c/{rank", "/c/rank}", "/c/{}.bin"):
        with pytest.raises(ValueError, match="Valid placeholders"):
            cache.template_fields(bad)
    with pytest.raises(ValueError):
        cache.template_fields("")
    with pytest.raises(TypeError):
        cache.template_fields(None)


@pytest.mark.parametrize(
    ("placeholder", "value"),
    [
        ("rank", "3"),
        ("local_rank", "1"),
        ("node_rank", "2"),
        ("world_size", "8"),
        ("sm", "sm90"),
        ("trt", "1.6.1"),
        ("cuda", "13.0"),
        ("host", "nodeA"),
    ],
)
def test_resolve_every_placeholder(placeholder, value, tmp_path):
    assert set(cache.PLACEHOLDERS) == {"rank", "local_rank", "node_rank", "world_size", "sm", "trt", "cuda", "host"}
    assert PLACEMENT.resolve(f"{tmp_path}/x-{{{placeholder}}}.bin") == f"{tmp_path}/x-{value}.bin"


def test_resolve_expands_user_and_literal_braces(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert PLACEMENT.resolve("~/k{{v}}/{sm}/rank{rank}.bin") == f"{tmp_path}/k{{v}}/sm90/rank3.bin"
    with pytest.raises(ValueError):
        PLACEMENT.resolve("~/{nope}.bin")


def test_placement_defaults_and_current():
    p = cache.Placement()
    assert (p.rank, p.local_rank, p.node_rank, p.world_size, p.sm, p.host) == (0, 0, 0, 1, "cpu", socket.gethostname())
    cur = cache.Placement.current(rank=5, local_rank=1, node_rank=2, world_size=6)
    assert (cur.rank, cur.local_rank, cur.node_rank, cur.world_size) == (5, 1, 2, 6)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert cur.sm == f"sm{major}{minor}"
    else:
        assert cur.sm == "cpu"
    assert cur.trt == (_backend.trt_version() or "none")
    assert cur.cuda == (torch.version.cuda or "none")


def test_siblings_pattern_matches_every_rank_under_the_key_only(tmp_path):
    template = str(
        tmp_path / "{sm}-trt{trt}-cuda{cuda}" / "n{node_rank}-r{rank}-of{world_size}-{host}-{local_rank}.bin"
    )
    pattern = PLACEMENT.siblings_pattern(template)
    assert pattern == str(tmp_path / "sm90-trt1.6.1-cuda13.0" / "n*-r*-of*-*-*.bin")
    mine = [
        write(
            cache.Placement(rank=r, world_size=4, sm="sm90", trt="1.6.1", cuda="13.0", host=f"h{r}").resolve(template),
            b"x",
        )
        for r in range(4)
    ]
    write(cache.Placement(rank=0, sm="sm89", trt="1.6.1", cuda="13.0").resolve(template), b"x")  # another GPU
    write(cache.Placement(rank=0, sm="sm90", trt="1.5.0", cuda="13.0").resolve(template), b"x")  # another TRT-RTX
    assert sorted(glob.glob(pattern)) == sorted(mine)


def test_siblings_pattern_escapes_glob_characters(tmp_path):
    odd = cache.Placement(sm="sm[90]", trt="1.6*", cuda="13.0?")
    template = str(tmp_path / "{sm}-{trt}-{cuda}" / "rank{rank}.bin")
    target = write(cache.Placement(rank=1, sm="sm[90]", trt="1.6*", cuda="13.0?").resolve(template), b"x")
    write(str(tmp_path / "s9-1.6.1-13.01" / "rank1.bin"), b"x")  # would match the unescaped pattern
    assert glob.glob(odd.siblings_pattern(template)) == [target]


# --- check_bytes ----------------------------------------------------------------------------------


def test_real_fixture_is_valid(real_cache_bytes):
    assert real_cache_bytes[:4] == cache.MAGIC
    (size,) = struct.unpack_from("<Q", real_cache_bytes, 8)
    assert size == len(real_cache_bytes) - cache.HEADER_LEN
    assert cache.check_bytes(real_cache_bytes) is None
    assert cache.check_bytes(make_payload(real_cache_bytes, 7, 3)) is None


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: b"", "empty"),
        (lambda d: d[:10], "shorter than the 20-byte header"),
        (lambda d: d[:20], "header says"),
        (lambda d: d[: len(d) // 2], "header says"),
        (lambda d: d[:-1], "header says"),
        (lambda d: d + b"\0", "header says"),
        (lambda d: b"\x7fELF" + d[4:], "magic tag"),
        (lambda d: bytes(range(256)) * (len(d) // 256), "magic tag"),
        (lambda d: with_size_field(d, len(d) - 21), "header says"),
        (lambda d: with_size_field(d, 2**63), "header says"),
    ],
    ids=[
        "empty",
        "short",
        "header-only",
        "truncated-half",
        "truncated-1",
        "padded",
        "bad-magic",
        "garbage",
        "size-off-by-one",
        "size-huge",
    ],
)
def test_check_bytes_rejects(real_cache_bytes, mutate, expected):
    problem = cache.check_bytes(mutate(real_cache_bytes))
    assert problem is not None and expected in problem


# --- load ------------------------------------------------------------------------------------------


@pytest.fixture
def template(tmp_path):
    return str(tmp_path / "root" / "{sm}-trtrtx{trt}-cuda{cuda}" / "rank{rank}.bin")


def rank(r: int, **kwargs) -> cache.Placement:
    return cache.Placement(rank=r, world_size=8, sm="sm90", trt="1.6.1", cuda="13.0", **kwargs)


def test_load_own(template, real_cache_bytes, recorded):
    path = write(rank(0).resolve(template), real_cache_bytes)
    write(rank(1).resolve(template), make_payload(real_cache_bytes, 1, 0))
    data, stats = cache.load(template, rank(0))
    assert data == real_cache_bytes
    assert (stats.source, stats.path, stats.loaded_from, stats.load_bytes) == ("own", path, path, len(real_cache_bytes))
    assert stats.load_ms > 0
    assert not recorded


def test_load_seeds_from_a_valid_sibling(template, real_cache_bytes, recorded):
    sibling = write(rank(1).resolve(template), real_cache_bytes)
    data, stats = cache.load(template, rank(5))
    assert data == real_cache_bytes
    assert (stats.source, stats.loaded_from, stats.load_bytes) == ("seeded", sibling, len(real_cache_bytes))
    assert stats.path == rank(5).resolve(template)
    assert not os.path.exists(stats.path)  # loading never writes
    assert not recorded


def test_seeding_skips_corrupt_siblings_and_prefers_the_largest_valid(template, real_cache_bytes, recorded):
    small, large = sorted((make_payload(real_cache_bytes, 2, 1), make_payload(real_cache_bytes, 3, 0)), key=len)
    assert len(small) < len(large) < len(real_cache_bytes)
    write(rank(1).resolve(template), real_cache_bytes + b"padding" * 100)  # largest, but invalid
    write(rank(2).resolve(template), small)
    good = write(rank(3).resolve(template), large)
    write(rank(4).resolve(template), real_cache_bytes[:1000])  # truncated
    write(rank(6).resolve(template), b"")
    data, stats = cache.load(template, rank(0))
    assert data == large
    assert (stats.source, stats.loaded_from) == ("seeded", good)
    assert os.path.exists(rank(1).resolve(template))  # another rank's file is not ours to move
    assert not recorded


def test_seeding_ignores_tmp_lock_corrupt_and_other_keys(tmp_path, real_cache_bytes):
    template = str(tmp_path / "{sm}" / "cache-{rank}")
    own = rank(0).resolve(template)
    for suffix in (".tmp", ".lock", ".corrupt"):
        write(own + suffix, real_cache_bytes)
        write(rank(1).resolve(template) + suffix, real_cache_bytes)
    write(cache.Placement(rank=1, sm="sm89").resolve(template), real_cache_bytes)
    data, stats = cache.load(template, rank(0))
    assert data is None and stats.source == "cold" and stats.load_bytes == 0


def test_load_cold(template):
    data, stats = cache.load(template, rank(0))
    assert data is None
    assert (stats.source, stats.loaded_from, stats.load_bytes) == ("cold", "", 0)
    assert not os.path.exists(os.path.dirname(stats.path))


def test_no_seeding_without_rank_placeholder(tmp_path, real_cache_bytes):
    template = str(tmp_path / "{sm}" / "node{node_rank}.bin")
    write(cache.Placement(node_rank=1, sm="sm90").resolve(template), real_cache_bytes)
    data, stats = cache.load(template, cache.Placement(node_rank=0, sm="sm90"))
    assert data is None and stats.source == "cold"


@pytest.mark.parametrize("bad", [b"", b"garbage" * 10, "truncated"])
def test_corrupt_own_is_quarantined_with_one_warning(template, real_cache_bytes, recorded, bad):
    bad = real_cache_bytes[:5000] if bad == "truncated" else bad
    path = write(rank(0).resolve(template), bad)
    data, stats = cache.load(template, rank(0))
    assert data is None
    assert stats.source == "corrupt" and stats.load_bytes == 0
    assert len(recorded) == 1
    message = str(recorded[0].message)
    assert path in message and ".corrupt" in message and "cold" in message
    assert not os.path.exists(path)
    assert read(path + ".corrupt") == bad
    # the next run starts cold, quietly, and its save puts a good file back
    data, stats = cache.load(template, rank(0))
    assert data is None and stats.source == "cold" and len(recorded) == 1
    assert cache.save(path, real_cache_bytes).saved
    assert cache.load(template, rank(0))[0] == real_cache_bytes


# --- save ------------------------------------------------------------------------------------------


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def test_save_creates_directories_and_replaces_atomically(tmp_path, real_cache_bytes, recorded):
    path = str(tmp_path / "a" / "b" / "rank0.bin")
    stats = cache.save(path, real_cache_bytes)
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and stats.save_ms > 0 and stats.save_error == ""
    assert read(path) == real_cache_bytes
    newer = make_payload(real_cache_bytes, 0, 1)
    with open(path, "rb") as reader:  # a reader that opened the old file keeps reading all of it
        head = reader.read(100)
        inode = os.stat(path).st_ino
        stats = cache.save(path, newer, cache.CacheStats(path=path, source="own"))
        assert head + reader.read() == real_cache_bytes
    assert stats.saved and stats.source == "own"  # the given stats object is filled in
    assert read(path) == newer
    assert os.stat(path).st_ino != inode  # replaced by rename, not rewritten in place
    assert leftovers(tmp_path / "a" / "b") == []
    assert not recorded


@pytest.mark.parametrize("bad", [b"", b"garbage", "truncated"])
def test_empty_or_invalid_data_never_overwrites(tmp_path, real_cache_bytes, recorded, bad):
    bad = real_cache_bytes[:-10] if bad == "truncated" else bad
    path = write(tmp_path / "rank0.bin", real_cache_bytes)
    stats = cache.save(path, bad)
    assert not stats.saved and stats.save_bytes == 0
    assert "nothing to save" in stats.save_error
    assert read(path) == real_cache_bytes
    assert leftovers(tmp_path) == []
    assert not recorded  # nothing to save is not a failure
    # nor is an invalid blob written where there was nothing
    assert not cache.save(str(tmp_path / "new.bin"), bad).saved
    assert not os.path.exists(tmp_path / "new.bin")


def test_read_only_directory(tmp_path, real_cache_bytes, recorded):
    directory = tmp_path / "ro"
    path = write(directory / "rank0.bin", real_cache_bytes)
    os.chmod(directory, 0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as a user who can write a 0o555 directory (root); see the simulated EROFS test")
        stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
        assert not stats.saved and stats.save_error
        assert len(recorded) == 1
        assert read(path) == real_cache_bytes
        assert leftovers(directory) == []
    finally:
        os.chmod(directory, 0o755)


def _assert_failed_save_kept_old(path, old, stats, recorded, code):
    assert not stats.saved and stats.save_bytes == 0
    assert os.strerror(code) in stats.save_error
    assert len(recorded) == 1
    message = str(recorded[0].message)
    assert path in message and "untouched" in message
    assert read(path) == old
    assert leftovers(os.path.dirname(path)) == []


def test_read_only_filesystem_simulated(tmp_path, real_cache_bytes, recorded, monkeypatch):
    path = write(tmp_path / "rank0.bin", real_cache_bytes)

    def erofs(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)

    monkeypatch.setattr(cache.os, "replace", erofs)
    stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
    _assert_failed_save_kept_old(path, real_cache_bytes, stats, recorded, errno.EROFS)


def test_disk_full_simulated(tmp_path, real_cache_bytes, recorded, monkeypatch):
    """ENOSPC halfway through writing the .tmp: the half file is removed, the old file stays."""
    path = write(tmp_path / "rank0.bin", real_cache_bytes)
    real_open = open
    opened = []

    class HalfWriter:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            assert os.path.getsize(self._f.name) > 0  # the partial .tmp is really on disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            opened.append(file)
            return HalfWriter(f)
        return f

    monkeypatch.setattr(cache, "open", full_disk_open, raising=False)
    stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
    assert opened == [path + ".tmp"]
    _assert_failed_save_kept_old(path, real_cache_bytes, stats, recorded, errno.ENOSPC)


def test_fsync_failure_simulated(tmp_path, real_cache_bytes, recorded, monkeypatch):
    path = write(tmp_path / "rank0.bin", real_cache_bytes)

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(cache.os, "fsync", eio)
    stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
    _assert_failed_save_kept_old(path, real_cache_bytes, stats, recorded, errno.EIO)


def test_parent_is_a_file(tmp_path, real_cache_bytes, recorded):
    blocker = write(tmp_path / "blocker", b"not a directory")
    stats = cache.save(os.path.join(blocker, "sub", "rank0.bin"), real_cache_bytes)
    assert not stats.saved and stats.save_error
    assert len(recorded) == 1
    assert read(blocker) == b"not a directory"


def test_keyboard_interrupt_during_write_removes_tmp_and_propagates(tmp_path, real_cache_bytes, monkeypatch):
    path = write(tmp_path / "rank0.bin", real_cache_bytes)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path, make_payload(real_cache_bytes, 0, 1))
    assert read(path) == real_cache_bytes
    assert leftovers(tmp_path) == []


# --- fsspec URLs -----------------------------------------------------------------------------------


@pytest.fixture
def memory_root():
    root = f"memory://lttr-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_fsspec_save_load_roundtrip_and_seed(memory_root, real_cache_bytes, recorded):
    fs = fsspec.filesystem("memory")
    template = memory_root + "/{sm}-trtrtx{trt}/rank{rank}.bin"
    path = rank(0).resolve(template)
    assert path == memory_root + "/sm90-trtrtx1.6.1/rank0.bin"
    stats = cache.save(path, real_cache_bytes)
    assert stats.saved and stats.save_bytes == len(real_cache_bytes)
    assert fs.cat_file(path) == real_cache_bytes
    assert not fs.exists(path + ".tmp")

    data, stats = cache.load(template, rank(0))
    assert data == real_cache_bytes and stats.source == "own"

    data, stats = cache.load(template, rank(4))
    assert data == real_cache_bytes
    assert stats.source == "seeded"
    assert stats.loaded_from.startswith("memory://") and stats.loaded_from.endswith("/sm90-trtrtx1.6.1/rank0.bin")

    assert not cache.save(path, b"").saved  # never overwrites a good remote file with nothing
    assert fs.cat_file(path) == real_cache_bytes
    assert not recorded


def test_fsspec_corrupt_is_quarantined(memory_root, real_cache_bytes, recorded):
    fs = fsspec.filesystem("memory")
    template = memory_root + "/{sm}/rank{rank}.bin"
    path = rank(0).resolve(template)
    fs.pipe_file(path, real_cache_bytes[:100])
    data, stats = cache.load(template, rank(0))
    assert data is None and stats.source == "corrupt"
    assert len(recorded) == 1
    assert not fs.exists(path) and fs.cat_file(path + ".corrupt") == real_cache_bytes[:100]


# --- the shared in-process handle --------------------------------------------------------------------


def test_open_shared_one_object_per_path(trt, tmp_path):
    per_rank = str(tmp_path / "{sm}" / "rank{rank}.bin")
    shared_file = str(tmp_path / "{sm}" / "all.bin")
    a = cache.open_shared(per_rank, rank(0))
    assert cache.open_shared(per_rank, rank(0)) is a
    assert cache.open_shared(per_rank, rank(1)) is not a
    assert cache.open_shared(shared_file, rank(0)) is cache.open_shared(shared_file, rank(1))  # same file
    assert isinstance(a.handle, trt.runtime.RuntimeCache)
    assert a.handle.path == "" and a.handle.autosave_on_del is False
    cache.forget_shared()
    assert cache.open_shared(per_rank, rank(0)) is not a


def test_shared_cache_loads_real_bytes_and_saves_them_identically(trt, template, real_cache_bytes, recorded):
    path = write(rank(0).resolve(template), real_cache_bytes)
    shared = cache.open_shared(template, rank(0))
    assert (shared.stats.source, shared.stats.load_bytes, shared.path) == ("own", len(real_cache_bytes), path)
    assert shared.stats.load_ms > 0
    assert shared.serialize() == real_cache_bytes  # the handle really holds the kernels
    os.remove(path)
    stats = shared.save()
    assert stats is shared.stats
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and stats.save_ms > 0
    assert read(path) == real_cache_bytes
    assert set(dataclasses.asdict(stats)) >= {
        "path",
        "source",
        "loaded_from",
        "load_bytes",
        "load_ms",
        "save_bytes",
        "save_ms",
        "saved",
        "save_error",
    }
    assert json.loads(json.dumps(dataclasses.asdict(stats)))["source"] == "own"
    assert not recorded


def test_shared_cache_seeded_rank_saves_its_own_file(trt, template, real_cache_bytes):
    write(rank(0).resolve(template), real_cache_bytes)
    shared = cache.open_shared(template, rank(2))
    assert shared.stats.source == "seeded"
    assert shared.save().saved
    assert read(rank(2).resolve(template)) == real_cache_bytes


def test_cold_shared_cache_never_overwrites_a_good_file(trt, template, real_cache_bytes, recorded):
    shared = cache.open_shared(template, rank(0))
    assert shared.stats.source == "cold" and shared.serialize() == b""
    write(shared.path, real_cache_bytes)  # another run saved meanwhile
    stats = shared.save()
    assert not stats.saved and "nothing to save" in stats.save_error
    assert read(shared.path) == real_cache_bytes
    assert not recorded


def test_corrupt_file_gives_an_empty_handle(trt, template, real_cache_bytes, recorded):
    path = write(rank(0).resolve(template), real_cache_bytes[:-1])
    shared = cache.open_shared(template, rank(0))
    assert shared.stats.source == "corrupt" and shared.serialize() == b""
    assert len(recorded) == 1 and os.path.exists(path + ".corrupt")


def test_broken_handle_save_warns_and_does_not_raise(trt, template, real_cache_bytes, recorded):
    path = write(rank(0).resolve(template), real_cache_bytes)
    shared = cache.open_shared(template, rank(0))
    shared.handle = object()
    stats = shared.save()
    assert not stats.saved and "could not serialize" in stats.save_error
    assert len(recorded) == 1
    assert read(path) == real_cache_bytes


# --- real processes ------------------------------------------------------------------------------------


def start_writer(**cfg) -> subprocess.Popen:
    cfg.setdefault("base", FIXTURE)
    return subprocess.Popen(
        [sys.executable, WRITER, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def next_event(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise AssertionError(f"worker exited ({proc.returncode}) without reporting:\n{proc.stderr.read()}")
    return json.loads(line)


def finish(procs, timeout=120) -> list[dict]:
    events = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        events.extend(json.loads(line) for line in out.splitlines())
    return events


def start_together(tmp_path, n, **cfg) -> list[subprocess.Popen]:
    go = str(tmp_path / f"go-{uuid.uuid4().hex}")
    procs = [start_writer(rank=r, go=go, **cfg) for r in range(n)]
    for proc in procs:
        assert next_event(proc)["event"] == "ready"
    open(go, "w").close()
    return procs


N_WRITERS = 8


@pytest.mark.timeout(180)
def test_concurrent_per_rank_saves_lose_nothing(tmp_path, real_cache_bytes):
    template = cache.default_template()  # per-rank files under the conftest-isolated default dir
    assert template.startswith(str(tmp_path))
    rounds = 6
    procs = start_together(
        tmp_path, N_WRITERS, mode="rounds", template=template, rounds=rounds, check_own=True, world_size=N_WRITERS
    )
    events = finish(procs)
    saves = [e for e in events if e["event"] == "save"]
    loads = [e for e in events if e["event"] == "load"]
    assert len(saves) == N_WRITERS * rounds
    assert all(e["saved"] and e["error"] == "" for e in saves), [e for e in saves if not e["saved"]]
    assert len(loads) == N_WRITERS * (rounds - 1)
    assert all(e["source"] == "own" and e["same"] for e in loads), [e for e in loads if not e["same"]]
    directory = os.path.dirname(rank(0).resolve(template))
    files = sorted(glob.glob(os.path.join(directory, "rank*.bin")))
    assert len(files) == N_WRITERS
    for r in range(N_WRITERS):
        data = read(rank(r).resolve(template))
        assert cache.check_bytes(data) is None
        assert data == make_payload(real_cache_bytes, r, rounds - 1)
    assert leftovers(directory) == []


@pytest.mark.timeout(180)
def test_concurrent_saves_to_one_path_always_leave_one_complete_file(tmp_path, real_cache_bytes):
    path = str(tmp_path / "shared" / "kernels.bin")
    rounds = 10
    payloads = {
        hashlib.sha256(make_payload(real_cache_bytes, r, i)).hexdigest(): (r, i)
        for r in range(N_WRITERS)
        for i in range(rounds)
    }
    assert len(payloads) == N_WRITERS * rounds
    procs = start_together(tmp_path, N_WRITERS, mode="rounds", template=path, rounds=rounds)
    observed = set()
    reads = 0
    while any(p.poll() is None for p in procs):
        try:
            data = read(path)
        except FileNotFoundError:
            continue
        reads += 1
        assert cache.check_bytes(data) is None, f"read {reads}: {cache.check_bytes(data)}"
        digest = hashlib.sha256(data).hexdigest()
        assert digest in payloads, f"read {reads} saw {len(data)} bytes that no writer wrote"
        observed.add(payloads[digest])
    events = finish(procs)
    assert all(e["saved"] for e in events if e["event"] == "save")
    final = read(path)
    _, round_ = payloads[hashlib.sha256(final).hexdigest()]
    assert round_ == rounds - 1  # the last rename was some writer's last save
    assert len(observed) >= 2  # the reader really ran while the writers replaced the file
    data, stats = cache.load(path, cache.Placement())
    assert data == final and stats.source == "own"
    assert leftovers(os.path.dirname(path)) == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_killed_mid_save_leaves_previous_file(tmp_path, real_cache_bytes, monkeypatch, recorded, stage):
    path = str(tmp_path / "key" / "rank0.bin")
    old = make_payload(real_cache_bytes, 0, 0)
    assert cache.save(path, old).saved
    proc = start_writer(mode="hang", template=path, rank=0, round=1, stage=stage)
    try:
        event = next_event(proc)
        assert event == {"event": "hang", "stage": stage, "pid": proc.pid}
        # the worker holds the lock and has written (but not renamed) its .tmp
        assert os.path.exists(path + ".tmp") and os.path.exists(path + ".lock")
        assert read(path) == old
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert read(path) == old
    data, stats = cache.load(path, cache.Placement())
    assert data == old and stats.source == "own"
    assert os.path.exists(path + ".tmp")  # the dead writer's leftover...
    monkeypatch.setattr(cache, "LOCK_TIMEOUT_S", 5.0)
    new = make_payload(real_cache_bytes, 0, 2)
    start = time.monotonic()
    stats = cache.save(path, new)  # ...neither its lock nor its .tmp blocks the next save
    assert stats.saved, stats.save_error
    assert time.monotonic() - start < 5.0
    assert read(path) == new
    assert not os.path.exists(path + ".tmp")
    assert not recorded


@pytest.mark.timeout(180)
def test_live_lock_holder_times_out_without_harm(tmp_path, real_cache_bytes, monkeypatch, recorded):
    path = str(tmp_path / "rank0.bin")
    old = make_payload(real_cache_bytes, 0, 0)
    assert cache.save(path, old).saved
    proc = start_writer(mode="hang", template=path, rank=0, round=1, stage="replace")
    try:
        assert next_event(proc)["event"] == "hang"
        monkeypatch.setattr(cache, "LOCK_TIMEOUT_S", 0.3)
        stats = cache.save(path, make_payload(real_cache_bytes, 0, 2))
        assert not stats.saved and "Timeout" in stats.save_error
        assert len(recorded) == 1
        assert read(path) == old
        assert os.path.exists(path + ".tmp")  # the holder's .tmp is left alone while it holds the lock
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_a_backend_failure_of_any_kind_is_a_warning_not_a_crash(tmp_path, real_cache_bytes, monkeypatch):
    """fsspec backends raise their own exceptions (botocore's NoCredentialsError is no OSError)."""
    import fsspec

    class NoCredentials(Exception):
        pass

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/any/rank0.bin", real_cache_bytes)

    def refuse(*args, **kwargs):
        raise NoCredentials("Unable to locate credentials")

    monkeypatch.setattr(type(fs), "pipe_file", refuse)
    monkeypatch.setattr(type(fs), "isfile", refuse)
    with pytest.warns(UserWarning, match="Unable to locate credentials"):
        stats = cache.save("memory://any/rank0.bin", real_cache_bytes)
    assert not stats.saved and "NoCredentials" in stats.save_error
    with pytest.warns(UserWarning, match="could not be read"):
        data, loaded = cache.load("memory://any/rank{rank}.bin", cache.Placement())
    assert data is None and loaded.source == "cold"


def test_save_stats_describe_the_latest_save_only(tmp_path, real_cache_bytes, monkeypatch):
    path = str(tmp_path / "c.bin")
    stats = cache.save(path, real_cache_bytes)
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and not stats.save_error
    monkeypatch.setattr(cache.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.warns(UserWarning, match="No space left"):
        cache.save(path, real_cache_bytes, stats)
    assert not stats.saved and stats.save_bytes == 0 and "No space left" in stats.save_error


@pytest.mark.parametrize(
    ("template", "per_rank"),
    [
        ("c/rank{rank}.bin", True),
        ("c/node{node_rank}/gpu{local_rank}.bin", True),
        ("c/{host}-{local_rank}.bin", True),
        ("c/gpu{local_rank}.bin", False),
        ("c/{host}.bin", False),
        ("c/shared.bin", False),
    ],
)
def test_templates_that_give_every_rank_its_own_file(template, per_rank):
    assert cache.is_per_rank(template) is per_rank
