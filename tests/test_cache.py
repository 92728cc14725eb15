"""The kernel-cache store: templates and the ``{gpu}`` key, checks, load (warm / seeded / other-gpu /
unverified / cold / corrupt), records of the GPU that filled a file, quarantine under the lock, atomic
saves that never lose a good file, fsspec URLs, one handle per run, and real concurrent, racing and
killed writer processes.

The GPU identity is faked only at the package's own boundary: ``Placement(gpu=...)`` and
``cache.current_gpu`` (the ``fake_gpu`` fixture); writer processes are given theirs in their config."""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import fsspec
import pytest
import torch

from lightning_trt_rtx import _backend, cache
from tests.conftest import FAKE_GPU, OTHER_GPU
from tests.procs.cache_writer import make_payload

WRITER = os.path.join(os.path.dirname(__file__), "procs", "cache_writer.py")
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "rtx-1.6.1-sm90.bin")
PLACEMENT = cache.Placement(
    rank=3, local_rank=1, node_rank=2, world_size=8, sm="sm90", trt="1.6.1", cuda="13.0", host="nodeA", gpu=FAKE_GPU
)
KEY = "sm90-trtrtx1.6.1-cuda13.0"  # the default template's directory for PLACEMENT-like placements


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


def gpu_dict(gpu: cache.Gpu) -> dict:
    return dataclasses.asdict(gpu)


def write_record(path: str, data: bytes, gpu: cache.Gpu = FAKE_GPU) -> None:
    """A record beside ``path`` that describes ``data`` as filled on ``gpu`` (also for bytes save() refuses)."""
    record = cache.Record(
        gpu_uuid=gpu.uuid,
        gpu_name=gpu.name,
        sm=gpu.sm,
        trt="1.6.1",
        cuda="13.0",
        host="nodeA",
        pid=os.getpid(),
        saved_unix=time.time(),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    write(path + cache.RECORD_SUFFIX, json.dumps(dataclasses.asdict(record)).encode())


# --- templates and placement -----------------------------------------------------------------------


def test_template_fields():
    assert cache.template_fields(
        "/c/{sm}-{trt}/{cuda}/{host}/g{gpu}/n{node_rank}l{local_rank}r{rank}of{world_size}"
    ) == ["sm", "trt", "cuda", "host", "gpu", "node_rank", "local_rank", "rank", "world_size"]
    assert cache.template_fields("/c/plain.bin") == []
    assert cache.template_fields("/c/{{literal}}.bin") == []
    assert cache.is_per_rank("/c/rank{rank}.bin")
    assert not cache.is_per_rank("/c/{local_rank}.bin")  # local ranks repeat across nodes
    assert not cache.is_per_rank("/c/gpu-{gpu}.bin")  # one file per physical GPU, not per rank
    assert cache.is_per_process("/c/gpu-{gpu}.bin") and cache.is_per_process("/c/rank{rank}.bin")
    assert not cache.is_per_process("/c/{sm}-trtrtx{trt}-cuda{cuda}/all.bin")
    for bad in ("/c/{gpu_id}.bin", "/c/{GPU}.bin", "/c/{gpu:8}.bin", "/c/{rank:02d}.bin", "/c/{rank!s}.bin",
                "/c/{rank", "/c/rank}", "/c/{}.bin"):
        with pytest.raises(ValueError, match="Valid placeholders"):
            cache.template_fields(bad)
    with pytest.raises(ValueError):
        cache.template_fields("")
    with pytest.raises(TypeError):
        cache.template_fields(None)


@pytest.mark.parametrize(
    ("placeholder", "value"),
    [
        ("gpu", "3b6d1a2c"),
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
    assert set(cache.PLACEHOLDERS) == {
        "gpu", "rank", "local_rank", "node_rank", "world_size", "sm", "trt", "cuda", "host"
    }
    assert set(cache.PROCESS_PLACEHOLDERS) == {"gpu", "rank", "local_rank", "node_rank", "world_size", "host"}
    assert PLACEMENT.resolve(f"{tmp_path}/x-{{{placeholder}}}.bin") == f"{tmp_path}/x-{value}.bin"


def test_resolve_expands_user_and_literal_braces(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert PLACEMENT.resolve("~/k{{v}}/{sm}/rank{rank}.bin") == f"{tmp_path}/k{{v}}/sm90/rank3.bin"
    with pytest.raises(ValueError):
        PLACEMENT.resolve("~/{nope}.bin")


def test_placement_defaults_and_current():
    p = cache.Placement()
    assert (p.rank, p.local_rank, p.node_rank, p.world_size, p.sm, p.host) == (0, 0, 0, 1, "cpu", socket.gethostname())
    assert p.gpu == cache.Gpu() and p.gpu.uuid == "" and p.gpu.id == "cpu"
    cur = cache.Placement.current(rank=5, local_rank=1, node_rank=2, world_size=6)
    assert (cur.rank, cur.local_rank, cur.node_rank, cur.world_size) == (5, 1, 2, 6)
    assert cur.gpu == cache.current_gpu()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert cur.sm == f"sm{major}{minor}" == cur.gpu.sm
        assert re.fullmatch("[0-9a-f]{8}", cur.gpu.id)
    else:
        assert cur.sm == "cpu"
        assert cur.gpu == cache.Gpu()  # no CUDA: no GPU identity, "{gpu}" reads "cpu"
    assert cur.trt == (_backend.trt_version() or "none")
    assert cur.cuda == (torch.version.cuda or "none")


def test_placement_current_on_a_faked_gpu(fake_gpu):
    cur = cache.Placement.current(rank=1, local_rank=1, world_size=2)
    assert cur.gpu == FAKE_GPU and cur.sm == "sm90"
    expected = os.path.join(
        os.environ[cache.CACHE_DIR_ENV], f"sm90-trtrtx{cur.trt}-cuda{cur.cuda}", "gpu-3b6d1a2c.bin"
    )
    assert cur.resolve(cache.default_template()) == expected


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


def test_siblings_pattern_of_the_default_template_matches_every_gpus_file(tmp_path):
    template = cache.default_template()
    pattern = PLACEMENT.siblings_pattern(template)
    assert pattern == os.path.join(glob.escape(os.environ[cache.CACHE_DIR_ENV]), KEY, "gpu-*.bin")
    shared = PLACEMENT.siblings_pattern(cache.default_template(shared_gpu=True))
    assert shared == os.path.join(glob.escape(os.environ[cache.CACHE_DIR_ENV]), KEY, "gpu-*-rank*.bin")
    # a one-file-per-GPU run sees the files of ranks that shared a GPU, and the other way round
    names = [f"gpu-{FAKE_GPU.id}.bin", f"gpu-{FAKE_GPU.id}-rank1.bin", f"gpu-{OTHER_GPU.id}.bin"]
    paths = [write(os.path.join(os.environ[cache.CACHE_DIR_ENV], KEY, n), b"x") for n in names]
    write(os.path.join(os.environ[cache.CACHE_DIR_ENV], "sm89-trtrtx1.6.1-cuda13.0", names[0]), b"x")  # other key
    assert sorted(glob.glob(pattern)) == sorted(paths)
    assert glob.glob(shared) == [paths[1]]


def test_siblings_pattern_escapes_glob_characters(tmp_path):
    odd = cache.Placement(sm="sm[90]", trt="1.6*", cuda="13.0?")
    template = str(tmp_path / "{sm}-{trt}-{cuda}" / "rank{rank}.bin")
    target = write(cache.Placement(rank=1, sm="sm[90]", trt="1.6*", cuda="13.0?").resolve(template), b"x")
    write(str(tmp_path / "s9-1.6.1-13.01" / "rank1.bin"), b"x")  # would match the unescaped pattern
    assert glob.glob(odd.siblings_pattern(template)) == [target]


# --- the {gpu} key -----------------------------------------------------------------------------------


def on(gpu: cache.Gpu, rank_: int = 0, world_size: int = 1, **kwargs) -> cache.Placement:
    """A process of rank ``rank_`` on the physical GPU ``gpu`` (sm90, TensorRT-RTX 1.6.1, CUDA 13.0)."""
    return cache.Placement(rank=rank_, world_size=world_size, sm="sm90", trt="1.6.1", cuda="13.0", gpu=gpu, **kwargs)


def test_gpu_placeholder_is_the_first_8_hex_digits_of_the_uuid(tmp_path):
    assert FAKE_GPU.id == "3b6d1a2c" and OTHER_GPU.id == "9f8e7d6c"
    for gpu in (FAKE_GPU, OTHER_GPU):
        assert re.fullmatch("[0-9a-f]{8}", gpu.id) and gpu.uuid.replace("-", "").startswith(gpu.id)
    assert cache.Gpu(uuid="0a1b2c3d-0000-4000-8000-000000000000").id == "0a1b2c3d"
    assert cache.Gpu().id == "cpu"  # no CUDA
    template = str(tmp_path / "{sm}" / "gpu-{gpu}.bin")
    assert on(FAKE_GPU).resolve(template) == str(tmp_path / "sm90" / "gpu-3b6d1a2c.bin")
    assert on(OTHER_GPU).resolve(template) == str(tmp_path / "sm90" / "gpu-9f8e7d6c.bin")
    assert cache.Placement().resolve(template) == str(tmp_path / "cpu" / "gpu-cpu.bin")
    if not torch.cuda.is_available():
        assert cache.current_gpu() == cache.Gpu()


def test_default_template_gives_one_file_per_physical_gpu_whatever_the_rank(trt, real_cache_bytes, messages):
    template = cache.default_template()
    root = os.environ[cache.CACHE_DIR_ENV]
    assert template == os.path.join(root, "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}.bin")
    first_run = on(FAKE_GPU, 0, world_size=1)  # rank 0 of a 1-process job on GPU A
    second_run = on(FAKE_GPU, 1, world_size=2, local_rank=1, node_rank=0)  # rank 1 of a 2-process job, GPU A
    other_gpu = on(OTHER_GPU, 0, world_size=2)  # rank 0 of that job, on GPU B
    path_a = os.path.join(root, KEY, "gpu-3b6d1a2c.bin")
    assert first_run.resolve(template) == second_run.resolve(template) == path_a
    assert other_gpu.resolve(template) == os.path.join(root, KEY, "gpu-9f8e7d6c.bin")

    payload = make_payload(real_cache_bytes, 0, 1)
    run1 = cache.RunCache(template, first_run)
    assert run1.stats.source == "cold" and run1.path == path_a
    run1.handle.load_from_stream(io.BytesIO(payload))  # the kernels this run compiled
    assert run1.save().saved
    run2 = cache.RunCache(template, second_run)  # another run, another rank, the same GPU: the same file
    assert (run2.path, run2.stats.source, run2.stats.applies) == (path_a, "warm", "yes")
    assert run2.serialize() == payload
    run3 = cache.RunCache(template, other_gpu)  # GPU B: its own file, nothing of GPU A's
    assert (run3.stats.source, run3.serialize()) == ("cold", b"")
    assert sorted(os.listdir(os.path.join(root, KEY))) == ["gpu-3b6d1a2c.bin", "gpu-3b6d1a2c.bin.json",
                                                            "gpu-3b6d1a2c.bin.lock"]
    assert not messages.warnings


def test_shared_gpu_template_gives_each_rank_its_own_file(real_cache_bytes, messages):
    template = cache.default_template(shared_gpu=True)
    root = os.environ[cache.CACHE_DIR_ENV]
    assert template == os.path.join(root, "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}-rank{rank}.bin")
    assert cache.is_per_rank(template) and not cache.is_per_rank(cache.default_template())
    paths = [on(FAKE_GPU, r, world_size=4).resolve(template) for r in range(4)]
    assert paths == [os.path.join(root, KEY, f"gpu-3b6d1a2c-rank{r}.bin") for r in range(4)]
    payloads = {r: make_payload(real_cache_bytes, r, 0) for r in range(4)}
    for r in range(4):
        assert cache.save(paths[r], payloads[r], placement=on(FAKE_GPU, r, world_size=4)).saved
    for r in range(4):  # each rank reads back its own file, not a neighbour's
        data, stats = cache.load(template, on(FAKE_GPU, r, world_size=4))
        assert (data, stats.source, stats.path) == (payloads[r], "warm", paths[r])
    # a later one-process run on the same GPU (default template) is seeded from this GPU's rank files
    data, stats = cache.load(cache.default_template(), on(FAKE_GPU))
    assert stats.source == "seeded" and data in payloads.values()
    assert stats.loaded_from in paths and data == payloads[paths.index(stats.loaded_from)]
    assert data == max(payloads.values(), key=len)  # the largest of them
    assert not messages.warnings


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


def rank(r: int, gpu: cache.Gpu = FAKE_GPU, **kwargs) -> cache.Placement:
    """Rank ``r`` of an 8-process job, on ``gpu`` (FAKE_GPU unless told)."""
    return cache.Placement(rank=r, world_size=8, sm="sm90", trt="1.6.1", cuda="13.0", gpu=gpu, **kwargs)


def saved(path: str, data: bytes, gpu: cache.Gpu = FAKE_GPU) -> str:
    """``data`` saved at ``path`` by a process on ``gpu`` (so its record names that GPU)."""
    stats = cache.save(path, data, placement=on(gpu))
    assert stats.saved, stats.save_error
    return path


def test_load_own(template, real_cache_bytes, messages):
    path = saved(rank(0).resolve(template), real_cache_bytes)
    saved(rank(1).resolve(template), make_payload(real_cache_bytes, 1, 0))
    data, stats = cache.load(template, rank(0))
    assert data == real_cache_bytes
    assert (stats.source, stats.path, stats.loaded_from, stats.load_bytes) == (
        "warm", path, path, len(real_cache_bytes)
    )
    assert stats.load_ms > 0
    assert not messages.warnings


def test_load_seeds_from_a_valid_sibling(template, real_cache_bytes, messages):
    sibling = saved(rank(1).resolve(template), real_cache_bytes)
    data, stats = cache.load(template, rank(5))
    assert data == real_cache_bytes
    assert (stats.source, stats.loaded_from, stats.load_bytes) == ("seeded", sibling, len(real_cache_bytes))
    assert stats.applies == "yes" and "GPU 3b6d1a2c" in stats.filled_on
    assert stats.path == rank(5).resolve(template)
    assert not os.path.exists(stats.path)  # loading never writes
    assert not messages.warnings


def test_seeding_skips_corrupt_siblings_and_prefers_the_largest_valid(template, real_cache_bytes, messages):
    small, large = sorted((make_payload(real_cache_bytes, 2, 1), make_payload(real_cache_bytes, 3, 0)), key=len)
    assert len(small) < len(large) < len(real_cache_bytes)
    padded = real_cache_bytes + b"padding" * 100
    write(rank(1).resolve(template), padded)  # largest, recorded on this GPU, but invalid
    write_record(rank(1).resolve(template), padded)
    saved(rank(2).resolve(template), small)
    good = saved(rank(3).resolve(template), large)
    write(rank(4).resolve(template), real_cache_bytes[:1000])  # truncated
    write(rank(6).resolve(template), b"")
    data, stats = cache.load(template, rank(0))
    assert data == large
    assert (stats.source, stats.loaded_from) == ("seeded", good)
    assert read(rank(1).resolve(template)) == padded  # another rank's file is not ours to move
    assert not messages.warnings


def test_seeding_ignores_tmp_lock_corrupt_json_and_other_keys(tmp_path, real_cache_bytes):
    template = str(tmp_path / "{sm}" / "cache-{rank}")
    own = rank(0).resolve(template)
    for suffix in (".tmp", ".lock", ".corrupt", ".json"):  # each with a record saying "this GPU"
        for path in (own + suffix, rank(1).resolve(template) + suffix):
            write(path, real_cache_bytes)
            write_record(path, real_cache_bytes)
    saved(cache.Placement(rank=1, sm="sm89").resolve(template), real_cache_bytes)  # another key
    data, stats = cache.load(template, rank(0))
    assert data is None and stats.source == "cold" and stats.load_bytes == 0


def test_load_cold(template):
    data, stats = cache.load(template, rank(0))
    assert data is None
    assert (stats.source, stats.loaded_from, stats.load_bytes, stats.applies) == ("cold", "", 0, "-")
    assert not os.path.exists(os.path.dirname(stats.path))


def test_no_seeding_without_rank_placeholder(tmp_path, real_cache_bytes):
    template = str(tmp_path / "{sm}" / "node{node_rank}.bin")
    write(cache.Placement(node_rank=1, sm="sm90").resolve(template), real_cache_bytes)
    data, stats = cache.load(template, cache.Placement(node_rank=0, sm="sm90"))
    assert data is None and stats.source == "cold"


def test_no_siblings_without_a_process_placeholder(tmp_path, real_cache_bytes):
    """One file for every process: nothing else under the key is ever a sibling, whatever its record."""
    template = str(tmp_path / "{sm}" / "all.bin")
    assert not cache.is_per_process(template)
    saved(str(tmp_path / "sm90" / "other.bin"), real_cache_bytes)
    data, stats = cache.load(template, on(FAKE_GPU))
    assert data is None and stats.source == "cold"


@pytest.mark.parametrize("bad", [b"", b"garbage" * 10, "truncated"])
def test_corrupt_own_is_quarantined_with_one_warning(template, real_cache_bytes, messages, bad):
    bad = real_cache_bytes[:5000] if bad == "truncated" else bad
    path = write(rank(0).resolve(template), bad)
    saved(rank(1).resolve(template), real_cache_bytes)  # a good sibling of this GPU: a corrupt file seeds nothing
    data, stats = cache.load(template, rank(0))
    assert data is None
    assert stats.source == "corrupt" and stats.load_bytes == 0 and stats.applies == "-"
    assert len(messages.warnings) == 1
    message = messages.warnings[0]
    assert path in message and ".corrupt" in message and "cold" in message
    assert not os.path.exists(path)
    assert read(path + ".corrupt") == bad
    # the next run starts (seeded or cold), quietly, and its save puts a good file back
    data, stats = cache.load(template, rank(0))
    assert stats.source == "seeded" and len(messages.warnings) == 1
    assert cache.save(path, real_cache_bytes, placement=rank(0)).saved
    assert cache.load(template, rank(0))[0] == real_cache_bytes


# --- which GPU filled a file: no false warm starts -----------------------------------------------------


def test_own_file_recorded_on_this_gpu_is_warm(template, real_cache_bytes, messages):
    path = saved(rank(0).resolve(template), real_cache_bytes)
    record = cache.read_record(path)
    assert record is not None and (record.gpu_uuid, record.gpu_name, record.pid) == (
        FAKE_GPU.uuid, FAKE_GPU.name, os.getpid()
    )
    assert (record.bytes, record.sha256) == (len(real_cache_bytes), hashlib.sha256(real_cache_bytes).hexdigest())
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source, stats.applies) == (real_cache_bytes, "warm", "yes")
    assert "GPU 3b6d1a2c" in stats.filled_on and FAKE_GPU.name in stats.filled_on
    assert f"pid {os.getpid()}" in stats.filled_on
    assert not messages.warnings


def test_own_file_recorded_on_another_gpu_is_loaded_with_one_warning(template, real_cache_bytes, messages):
    path = saved(rank(0).resolve(template), real_cache_bytes, gpu=OTHER_GPU)
    data, stats = cache.load(template, rank(0))  # this process runs on FAKE_GPU
    assert data == real_cache_bytes and stats.load_bytes == len(real_cache_bytes)  # still loaded
    assert (stats.source, stats.applies, stats.loaded_from) == ("other-gpu", "no", path)
    assert "GPU 9f8e7d6c" in stats.filled_on
    assert len(messages.warnings) == 1
    message = messages.warnings[0]
    assert path in message and "9f8e7d6c" in message and "3b6d1a2c" in message and "another GPU" in message


def test_this_gpus_sibling_is_preferred_over_an_own_file_from_another_gpu(template, real_cache_bytes, messages):
    saved(rank(0).resolve(template), real_cache_bytes, gpu=OTHER_GPU)
    mine = make_payload(real_cache_bytes, 4, 0)
    sibling = saved(rank(4).resolve(template), mine, gpu=FAKE_GPU)
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source, stats.loaded_from, stats.applies) == (mine, "seeded", sibling, "yes")
    assert not messages.warnings  # what was loaded applies: nothing to warn about


def test_own_file_without_a_record_is_unverified(template, real_cache_bytes, messages):
    path = write(rank(0).resolve(template), real_cache_bytes)  # e.g. written by an older version
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source, stats.applies, stats.filled_on) == (real_cache_bytes, "unverified", "unknown", "")
    assert stats.loaded_from == path
    for junk in (b"{not json", b"[]", json.dumps({"gpu_uuid": FAKE_GPU.uuid}).encode()):  # unreadable records
        write(path + cache.RECORD_SUFFIX, junk)
        assert cache.read_record(path) is None
        assert cache.load(template, rank(0))[1].source == "unverified"
    assert not messages.warnings


@pytest.mark.parametrize("recorded_on", [FAKE_GPU, OTHER_GPU], ids=["this-gpu", "other-gpu"])
def test_a_stale_record_vouches_for_nothing(template, real_cache_bytes, messages, recorded_on):
    path = saved(rank(0).resolve(template), real_cache_bytes, gpu=recorded_on)
    replaced = make_payload(real_cache_bytes, 0, 9)
    write(path, replaced)  # the bytes replaced, the record left as it was
    assert cache.read_record(path) is None
    assert cache.read_record(path, real_cache_bytes) is not None  # it describes the old bytes only
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source, stats.filled_on) == (replaced, "unverified", "")
    # nor does a sibling's stale record make it a seed
    sibling = saved(rank(1).resolve(template), real_cache_bytes)
    write(sibling, make_payload(real_cache_bytes, 1, 9))
    os.remove(path)
    os.remove(path + cache.RECORD_SUFFIX)
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source) == (None, "cold")
    assert not messages.warnings


def test_seeding_only_from_files_recorded_on_this_gpu(template, real_cache_bytes, messages):
    small = make_payload(real_cache_bytes, 3, 1)
    assert len(small) < len(real_cache_bytes)
    saved(rank(1).resolve(template), real_cache_bytes, gpu=OTHER_GPU)  # larger, another GPU's kernels
    write(rank(2).resolve(template), real_cache_bytes)  # as large, no record: unknown GPU
    mine = saved(rank(3).resolve(template), small, gpu=FAKE_GPU)
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source, stats.loaded_from) == (small, "seeded", mine)
    os.remove(mine)
    data, stats = cache.load(template, rank(0))
    assert (data, stats.source, stats.loaded_from) == (None, "cold", "")  # never from B's or an unknown file
    # a process without a GPU identity seeds from nothing, not even a file recorded without one
    saved(rank(4).resolve(template), small, gpu=cache.Gpu())
    data, stats = cache.load(template, rank(0, gpu=cache.Gpu()))
    assert (data, stats.source) == (None, "cold")
    assert not messages.warnings


def test_default_template_never_seeds_from_another_gpus_file(real_cache_bytes, messages):
    template = cache.default_template()
    b_file = saved(on(OTHER_GPU).resolve(template), real_cache_bytes, gpu=OTHER_GPU)
    data, stats = cache.load(template, on(FAKE_GPU))
    assert (data, stats.source, stats.path) == (None, "cold", on(FAKE_GPU).resolve(template))
    assert read(b_file) == real_cache_bytes
    assert not messages.warnings


def test_a_copied_cache_and_record_are_reported_other_gpu(real_cache_bytes, messages):
    """GPU B's file and its record copied to GPU A's path (e.g. a cache dir synced between hosts)."""
    template = cache.default_template()
    b_file = saved(on(OTHER_GPU).resolve(template), real_cache_bytes, gpu=OTHER_GPU)
    a_file = on(FAKE_GPU).resolve(template)
    shutil.copy(b_file, a_file)
    shutil.copy(b_file + cache.RECORD_SUFFIX, a_file + cache.RECORD_SUFFIX)
    data, stats = cache.load(template, on(FAKE_GPU))
    assert (data, stats.source, stats.applies, stats.loaded_from) == (real_cache_bytes, "other-gpu", "no", a_file)
    assert len(messages.warnings) == 1
    message = messages.warnings[0]
    assert a_file in message and "9f8e7d6c" in message and "3b6d1a2c" in message


# --- quarantine under the lock ---------------------------------------------------------------------------


def test_quarantine_moves_only_a_bad_file(tmp_path, real_cache_bytes, messages):
    good = saved(str(tmp_path / "k" / "good.bin"), real_cache_bytes)
    assert cache.quarantine(good, "a stale verdict") is False
    assert read(good) == real_cache_bytes and not os.path.exists(good + ".corrupt")
    assert cache.quarantine(str(tmp_path / "k" / "missing.bin"), "gone") is False
    assert not messages.warnings
    bad = write(tmp_path / "k" / "bad.bin", b"garbage")
    assert cache.quarantine(bad, "not a cache", rank=3) is True
    assert read(bad + ".corrupt") == b"garbage" and not os.path.exists(bad)
    assert len(messages.warnings) == 1 and bad in messages.warnings[0] and "not a cache" in messages.warnings[0]


# --- save ------------------------------------------------------------------------------------------


def leftovers(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def test_save_creates_directories_and_replaces_atomically(tmp_path, real_cache_bytes, messages):
    path = str(tmp_path / "a" / "b" / "rank0.bin")
    stats = cache.save(path, real_cache_bytes, placement=on(FAKE_GPU))
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and stats.save_ms > 0 and stats.save_error == ""
    assert read(path) == real_cache_bytes
    assert cache.read_record(path).gpu_uuid == FAKE_GPU.uuid  # the record beside it
    newer = make_payload(real_cache_bytes, 0, 1)
    with open(path, "rb") as reader:  # a reader that opened the old file keeps reading all of it
        head = reader.read(100)
        inode = os.stat(path).st_ino
        loaded = cache.load(path, on(FAKE_GPU))[1]
        stats = cache.save(path, newer, loaded, on(FAKE_GPU))
        assert head + reader.read() == real_cache_bytes
    assert stats is loaded and stats.saved and stats.source == "warm"  # the given stats object is filled in
    assert read(path) == newer
    assert cache.read_record(path, newer) is not None  # the record follows the bytes
    assert os.stat(path).st_ino != inode  # replaced by rename, not rewritten in place
    assert leftovers(tmp_path / "a" / "b") == []
    assert not messages.warnings


@pytest.mark.parametrize("bad", [b"", b"garbage", "truncated"])
def test_empty_or_invalid_data_never_overwrites(tmp_path, real_cache_bytes, messages, bad):
    bad = real_cache_bytes[:-10] if bad == "truncated" else bad
    path = saved(str(tmp_path / "rank0.bin"), real_cache_bytes)
    record = read(path + cache.RECORD_SUFFIX)
    stats = cache.save(path, bad)
    assert not stats.saved and stats.save_bytes == 0
    assert "nothing to save" in stats.save_error
    assert read(path) == real_cache_bytes and read(path + cache.RECORD_SUFFIX) == record
    assert leftovers(tmp_path) == []
    assert not messages.warnings  # nothing to save is not a failure
    # nor is an invalid blob (or a record of it) written where there was nothing
    assert not cache.save(str(tmp_path / "new.bin"), bad).saved
    assert not os.path.exists(tmp_path / "new.bin") and not os.path.exists(tmp_path / "new.bin.json")


def test_a_template_resolving_to_a_directory_is_said_at_load_and_nothing_is_written_into_it(
    tmp_path, real_cache_bytes, messages
):
    """Placeholders that resolve to an existing directory (refused at construction only without them)."""
    (tmp_path / "kernels" / "sm90").mkdir(parents=True)
    template = str(tmp_path / "kernels" / "{sm}")
    data, stats = cache.load(template, PLACEMENT)
    assert data is None and "IsADirectoryError" in stats.unreadable
    assert messages.matching("a directory, not a file: name a file in the template")
    stats = cache.save(PLACEMENT.resolve(template), make_payload(real_cache_bytes, 0, 1), stats, PLACEMENT)
    assert not stats.saved and "not replacing a file this run could not read" in stats.save_error
    assert os.path.isdir(tmp_path / "kernels" / "sm90") and os.listdir(tmp_path / "kernels" / "sm90") == []


def test_read_only_directory(tmp_path, real_cache_bytes, messages):
    directory = tmp_path / "ro"
    path = write(directory / "rank0.bin", real_cache_bytes)
    os.chmod(directory, 0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as a user who can write a 0o555 directory (root); see the simulated EROFS test")
        stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
        assert not stats.saved and stats.save_error
        assert len(messages.warnings) == 1
        assert read(path) == real_cache_bytes
        assert leftovers(directory) == []
    finally:
        os.chmod(directory, 0o755)


def _assert_failed_save_kept_old(path, old, stats, messages, code):
    assert not stats.saved and stats.save_bytes == 0
    assert os.strerror(code) in stats.save_error
    assert len(messages.warnings) == 1
    message = messages.warnings[0]
    assert path in message and "untouched" in message
    assert read(path) == old
    assert cache.read_record(path, old) is not None  # the old record still vouches for the old bytes
    assert leftovers(os.path.dirname(path)) == []


def test_read_only_filesystem_simulated(tmp_path, real_cache_bytes, messages, monkeypatch):
    path = saved(str(tmp_path / "rank0.bin"), real_cache_bytes)

    def erofs(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dst)

    monkeypatch.setattr(cache.os, "replace", erofs)
    stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
    _assert_failed_save_kept_old(path, real_cache_bytes, stats, messages, errno.EROFS)


def test_disk_full_simulated(tmp_path, real_cache_bytes, messages, monkeypatch):
    """ENOSPC halfway through writing the .tmp: the half file is removed, the old file stays."""
    path = saved(str(tmp_path / "rank0.bin"), real_cache_bytes)
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
    _assert_failed_save_kept_old(path, real_cache_bytes, stats, messages, errno.ENOSPC)


def test_fsync_failure_simulated(tmp_path, real_cache_bytes, messages, monkeypatch):
    path = saved(str(tmp_path / "rank0.bin"), real_cache_bytes)

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(cache.os, "fsync", eio)
    stats = cache.save(path, make_payload(real_cache_bytes, 0, 1))
    _assert_failed_save_kept_old(path, real_cache_bytes, stats, messages, errno.EIO)


def test_parent_is_a_file(tmp_path, real_cache_bytes, messages):
    blocker = write(tmp_path / "blocker", b"not a directory")
    stats = cache.save(os.path.join(blocker, "sub", "rank0.bin"), real_cache_bytes)
    assert not stats.saved and stats.save_error
    assert len(messages.warnings) == 1
    assert read(blocker) == b"not a directory"


def test_keyboard_interrupt_during_write_removes_tmp_says_so_and_propagates(
    tmp_path, real_cache_bytes, monkeypatch, messages
):
    path = saved(str(tmp_path / "rank0.bin"), real_cache_bytes)

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path, make_payload(real_cache_bytes, 0, 1))
    assert read(path) == real_cache_bytes
    assert leftovers(tmp_path) == []
    assert messages.warnings == [
        f"Saving the kernel cache to {path} was interrupted (KeyboardInterrupt): the previous cache file, if any,"
        " is untouched."
    ]


def test_an_interrupt_between_the_kernels_and_their_record_says_the_kernels_are_saved(
    tmp_path, real_cache_bytes, monkeypatch, messages
):
    path = str(tmp_path / "rank0.bin")
    write = cache._write

    def record_interrupted(fs, inner, local, data):
        if inner.endswith(cache.RECORD_SUFFIX):
            raise KeyboardInterrupt
        write(fs, inner, local, data)

    monkeypatch.setattr(cache, "_write", record_interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.save(path, real_cache_bytes)
    assert read(path) == real_cache_bytes and not os.path.exists(path + cache.RECORD_SUFFIX)
    (told,) = messages.warnings
    assert "was interrupted (KeyboardInterrupt): the new kernels are saved, without their record" in told


def test_a_file_the_run_could_not_read_is_not_replaced_by_its_save(tmp_path, real_cache_bytes, monkeypatch, messages):
    """A read that fails (EIO, EACCES, a store's blip) starts the run cold; its few kernels must not replace
    a file that may hold many. Once the file is gone, the run's save goes ahead."""
    path = saved(str(tmp_path / "gpu.bin"), real_cache_bytes)
    read_file = cache._read

    def failing(p):
        raise OSError(errno.EIO, "Input/output error", p)

    monkeypatch.setattr(cache, "_read", failing)
    data, stats = cache.load(path, cache.Placement())
    monkeypatch.setattr(cache, "_read", read_file)
    assert data is None and stats.source == "cold" and stats.unreadable.startswith("OSError: [Errno 5]")
    cold = make_payload(real_cache_bytes, 7, 7)
    stats = cache.save(path, cold, stats)
    assert not stats.saved and stats.save_error.startswith("not replacing a file this run could not read")
    assert read(path) == real_cache_bytes and cache.read_record(path) is not None
    assert len(messages.matching(f"Not saving the kernel cache over {path}: it could not be read")) == 1
    os.remove(path)
    assert cache.save(path, cold, stats).saved and read(path) == cold


@pytest.mark.parametrize("stat_fails_at_save", [False, True])
def test_a_file_whose_stat_fails_at_load_is_unreadable_not_absent(
    tmp_path, real_cache_bytes, monkeypatch, messages, stat_fails_at_save
):
    """A flaky disk or NFS (EIO, ESTALE) failing the stat at load: the file may be there, so the cold run
    says so and does not replace it, also when the stat fails at the save again."""
    path = saved(str(tmp_path / "gpu.bin"), real_cache_bytes)
    real_stat = os.stat

    def flaky(p, *args, **kwargs):
        if os.fspath(p) == path:
            raise OSError(errno.ESTALE, "Stale file handle", p)
        return real_stat(p, *args, **kwargs)

    monkeypatch.setattr(os, "stat", flaky)
    data, stats = cache.load(path, cache.Placement())
    if not stat_fails_at_save:
        monkeypatch.setattr(os, "stat", real_stat)
    assert data is None and stats.unreadable.startswith("OSError: [Errno 116]"), stats
    assert messages.matching(f"Kernel cache {path} could not be read")
    stats = cache.save(path, make_payload(real_cache_bytes, 7, 7), stats)
    monkeypatch.setattr(os, "stat", real_stat)
    assert not stats.saved and stats.save_error.startswith("not replacing a file this run could not read")
    assert read(path) == real_cache_bytes


@pytest.mark.parametrize("saved_unix", ["2025-01-01T00:00:00", None, True, float("nan")])
def test_a_record_with_fields_of_other_types_is_no_record(tmp_path, real_cache_bytes, saved_unix, messages):
    path = saved(str(tmp_path / "gpu.bin"), real_cache_bytes)
    values = json.loads(read(path + cache.RECORD_SUFFIX))
    values["saved_unix"] = saved_unix
    with open(path + cache.RECORD_SUFFIX, "w") as f:
        f.write(json.dumps(values))
    assert cache.read_record(path) is None
    data, stats = cache.load(path, cache.Placement())
    assert data == real_cache_bytes and stats.source == "unverified" and stats.filled_on == ""
    assert cache.save(path, real_cache_bytes, stats).saved and cache.read_record(path) is not None


def test_a_record_whose_time_cannot_be_shown_still_describes_its_writer(tmp_path, real_cache_bytes, messages):
    path = saved(str(tmp_path / "gpu.bin"), real_cache_bytes)
    values = json.loads(read(path + cache.RECORD_SUFFIX))
    values["saved_unix"] = 1e20  # a number, but past what the platform's clock can show
    with open(path + cache.RECORD_SUFFIX, "w") as f:
        f.write(json.dumps(values))
    record = cache.read_record(path)
    assert record is not None and record.describe().endswith("at an unknown time")
    data, stats = cache.load(path, cache.Placement())
    assert data == real_cache_bytes and stats.filled_on.endswith("at an unknown time")


# --- fsspec URLs -----------------------------------------------------------------------------------


@pytest.fixture
def memory_root():
    root = f"memory://lttr-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_fsspec_save_load_roundtrip_and_seed(memory_root, real_cache_bytes, messages):
    fs = fsspec.filesystem("memory")
    template = memory_root + "/{sm}-trtrtx{trt}/rank{rank}.bin"
    path = rank(0).resolve(template)
    assert path == memory_root + "/sm90-trtrtx1.6.1/rank0.bin"
    stats = cache.save(path, real_cache_bytes, placement=rank(0))
    assert stats.saved and stats.save_bytes == len(real_cache_bytes)
    assert fs.cat_file(path) == real_cache_bytes
    assert not fs.exists(path + ".tmp")
    assert cache.read_record(path).gpu_uuid == FAKE_GPU.uuid

    data, stats = cache.load(template, rank(0))
    assert data == real_cache_bytes and stats.source == "warm"

    data, stats = cache.load(template, rank(4))
    assert data == real_cache_bytes
    assert stats.source == "seeded"
    assert stats.loaded_from.startswith("memory://") and stats.loaded_from.endswith("/sm90-trtrtx1.6.1/rank0.bin")

    data, stats = cache.load(template, rank(4, gpu=OTHER_GPU))  # another GPU is not seeded from it
    assert (data, stats.source) == (None, "cold")

    assert not cache.save(path, b"").saved  # never overwrites a good remote file with nothing
    assert fs.cat_file(path) == real_cache_bytes
    assert not messages.warnings


def test_fsspec_corrupt_is_quarantined(memory_root, real_cache_bytes, messages):
    fs = fsspec.filesystem("memory")
    template = memory_root + "/{sm}/rank{rank}.bin"
    path = rank(0).resolve(template)
    fs.pipe_file(path, real_cache_bytes[:100])
    data, stats = cache.load(template, rank(0))
    assert data is None and stats.source == "corrupt"
    assert len(messages.warnings) == 1
    assert not fs.exists(path) and fs.cat_file(path + ".corrupt") == real_cache_bytes[:100]


# --- one handle per run ------------------------------------------------------------------------------


def test_each_run_opens_its_own_handle(trt, tmp_path):
    per_rank = str(tmp_path / "{sm}" / "rank{rank}.bin")
    shared_file = str(tmp_path / "{sm}" / "all.bin")
    a = cache.RunCache(per_rank, rank(0))
    b = cache.RunCache(per_rank, rank(0))
    assert a is not b and a.handle is not b.handle and a.stats is not b.stats  # no process-wide registry
    assert a.path == b.path == rank(0).resolve(per_rank) and a.placement == rank(0) and a.template == per_rank
    assert cache.RunCache(per_rank, rank(1)).path != a.path
    assert cache.RunCache(shared_file, rank(0)).path == cache.RunCache(shared_file, rank(1)).path  # same file
    assert isinstance(a.handle, trt.runtime.RuntimeCache)
    assert a.handle.path == "" and a.handle.autosave_on_del is False
    for gone in ("open_shared", "forget_shared", "SharedCache"):
        assert not hasattr(cache, gone)


def test_run_cache_loads_real_bytes_and_saves_them_identically(trt, template, real_cache_bytes, messages):
    path = saved(rank(0).resolve(template), real_cache_bytes)
    run = cache.RunCache(template, rank(0))
    assert (run.stats.source, run.stats.load_bytes, run.path) == ("warm", len(real_cache_bytes), path)
    assert run.stats.load_ms > 0
    assert run.serialize() == real_cache_bytes  # the handle really holds the kernels
    os.remove(path)
    stats = run.save()
    assert stats is run.stats
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and stats.save_ms > 0
    assert read(path) == real_cache_bytes
    assert cache.read_record(path).gpu_uuid == FAKE_GPU.uuid
    assert set(dataclasses.asdict(stats)) >= {
        "path",
        "source",
        "loaded_from",
        "filled_on",
        "load_bytes",
        "load_ms",
        "save_bytes",
        "save_ms",
        "saved",
        "save_error",
    }
    assert json.loads(json.dumps(dataclasses.asdict(stats)))["source"] == "warm"
    assert not messages.warnings


def test_run_cache_seeded_rank_saves_its_own_file(trt, template, real_cache_bytes):
    saved(rank(0).resolve(template), real_cache_bytes)
    run = cache.RunCache(template, rank(2))
    assert run.stats.source == "seeded"
    assert run.save().saved
    assert read(rank(2).resolve(template)) == real_cache_bytes
    assert cache.RunCache(template, rank(2)).stats.source == "warm"  # the next run of rank 2


def test_cold_run_cache_never_overwrites_a_good_file(trt, template, real_cache_bytes, messages):
    run = cache.RunCache(template, rank(0))
    assert run.stats.source == "cold" and run.serialize() == b""
    write(run.path, real_cache_bytes)  # another run saved meanwhile
    stats = run.save()
    assert not stats.saved and "nothing to save" in stats.save_error
    assert read(run.path) == real_cache_bytes
    assert not messages.warnings


def test_corrupt_file_gives_an_empty_handle(trt, template, real_cache_bytes, messages):
    path = write(rank(0).resolve(template), real_cache_bytes[:-1])
    run = cache.RunCache(template, rank(0))
    assert run.stats.source == "corrupt" and run.serialize() == b""
    assert len(messages.warnings) == 1 and os.path.exists(path + ".corrupt")


def test_broken_handle_save_warns_and_does_not_raise(trt, template, real_cache_bytes, messages):
    path = saved(rank(0).resolve(template), real_cache_bytes)
    run = cache.RunCache(template, rank(0))
    run.handle = object()
    stats = run.save()
    assert not stats.saved and "could not serialize" in stats.save_error
    assert len(messages.warnings) == 1
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


def start_together(tmp_path, n, per_rank=lambda r: {}, **cfg) -> tuple[list[subprocess.Popen], list[str]]:
    """``n`` writers, released together; returns them and the path each resolved its template to."""
    go = str(tmp_path / f"go-{uuid.uuid4().hex}")
    procs = [start_writer(rank=r, go=go, **cfg, **per_rank(r)) for r in range(n)]
    paths = []
    for proc in procs:
        event = next_event(proc)
        assert event["event"] == "ready"
        paths.append(event["path"])
    open(go, "w").close()
    return procs, paths


def writer_gpu(r: int) -> dict:
    """A distinct fake physical GPU for writer ``r``."""
    return gpu_dict(cache.Gpu(uuid=f"{r + 1:08x}-0000-4000-8000-{r + 1:012x}", name="NVIDIA H100", sm="sm90"))


N_WRITERS = 8


@pytest.mark.timeout(180)
@pytest.mark.parametrize("layout", ["one-gpu-each", "ranks-share-a-gpu"])
def test_concurrent_per_process_saves_lose_nothing(tmp_path, real_cache_bytes, layout):
    """8 writers on the default template: each on its own GPU (one file per GPU), or all on one GPU
    (``shared_gpu=True``: one file per rank). Each reads back exactly its own last save, warm."""
    if layout == "one-gpu-each":
        template, per_rank = cache.default_template(), lambda r: {"gpu": writer_gpu(r)}
        names = sorted(f"gpu-{r + 1:08x}.bin" for r in range(N_WRITERS))
    else:
        template, per_rank = cache.default_template(shared_gpu=True), lambda r: {"gpu": gpu_dict(FAKE_GPU)}
        names = sorted(f"gpu-3b6d1a2c-rank{r}.bin" for r in range(N_WRITERS))
    assert template.startswith(str(tmp_path))  # under the conftest-isolated default dir
    rounds = 6
    procs, paths = start_together(
        tmp_path, N_WRITERS, per_rank, mode="rounds", template=template, rounds=rounds, check_own=True,
        world_size=N_WRITERS,
    )
    events = finish(procs)
    saves = [e for e in events if e["event"] == "save"]
    loads = [e for e in events if e["event"] == "load"]
    assert len(saves) == N_WRITERS * rounds
    assert all(e["saved"] and e["error"] == "" for e in saves), [e for e in saves if not e["saved"]]
    assert len(loads) == N_WRITERS * (rounds - 1)
    assert all(e["source"] == "warm" and e["same"] for e in loads), [e for e in loads if not e["same"]]
    directory = os.path.join(os.environ[cache.CACHE_DIR_ENV], KEY)
    assert sorted(os.path.basename(p) for p in paths) == names
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin"))) == names
    for r in range(N_WRITERS):
        data = read(paths[r])
        assert cache.check_bytes(data) is None
        assert data == make_payload(real_cache_bytes, r, rounds - 1)
        assert cache.read_record(paths[r], data) is not None
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
    procs, _ = start_together(tmp_path, N_WRITERS, mode="rounds", template=path, rounds=rounds, gpu=gpu_dict(FAKE_GPU))
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
    data, stats = cache.load(path, on(FAKE_GPU))
    assert data == final and stats.source == "warm"  # the last writer's record goes with its bytes
    assert leftovers(os.path.dirname(path)) == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_killed_mid_save_leaves_previous_file(tmp_path, real_cache_bytes, monkeypatch, messages, stage):
    path = str(tmp_path / "key" / "rank0.bin")
    old = make_payload(real_cache_bytes, 0, 0)
    assert cache.save(path, old, placement=on(FAKE_GPU)).saved
    proc = start_writer(mode="hang", template=path, rank=0, round=1, stage=stage, gpu=gpu_dict(FAKE_GPU))
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
    data, stats = cache.load(path, on(FAKE_GPU))
    assert data == old and stats.source == "warm"  # the old record still vouches for the old bytes
    assert os.path.exists(path + ".tmp")  # the dead writer's leftover...
    monkeypatch.setattr(cache, "LOCK_TIMEOUT_S", 5.0)
    new = make_payload(real_cache_bytes, 0, 2)
    start = time.monotonic()
    stats = cache.save(path, new, stats, on(FAKE_GPU))  # ...neither its lock nor its .tmp blocks the next save
    assert stats.saved, stats.save_error
    assert time.monotonic() - start < 5.0
    assert read(path) == new
    assert not os.path.exists(path + ".tmp")
    assert not messages.warnings


@pytest.mark.timeout(180)
def test_live_lock_holder_times_out_without_harm(tmp_path, real_cache_bytes, monkeypatch, messages):
    path = str(tmp_path / "rank0.bin")
    old = make_payload(real_cache_bytes, 0, 0)
    assert cache.save(path, old).saved
    proc = start_writer(mode="hang", template=path, rank=0, round=1, stage="replace")
    try:
        assert next_event(proc)["event"] == "hang"
        monkeypatch.setattr(cache, "LOCK_TIMEOUT_S", 0.3)
        stats = cache.save(path, make_payload(real_cache_bytes, 0, 2))
        assert not stats.saved and "Timeout" in stats.save_error
        assert len(messages.warnings) == 1
        assert read(path) == old
        assert os.path.exists(path + ".tmp")  # the holder's .tmp is left alone while it holds the lock
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


# --- every run reads what is on disk now --------------------------------------------------------------


@pytest.mark.timeout(120)
def test_each_run_reads_what_another_process_saved_since_the_last_run(trt, template, real_cache_bytes, messages):
    path = rank(0).resolve(template)
    old, new = make_payload(real_cache_bytes, 0, 0), make_payload(real_cache_bytes, 0, 1)
    saved(path, old)
    first = cache.RunCache(template, rank(0))
    assert (first.stats.source, first.stats.load_bytes, first.serialize()) == ("warm", len(old), old)
    # between the two runs another process (another job on this GPU) saves
    (event,) = finish([start_writer(mode="save_once", template=path, rank=0, round=1, gpu=gpu_dict(FAKE_GPU),
                                    host="writer-host")])
    assert event["saved"] and event["pid"] != os.getpid()
    assert read(path) == new
    second = cache.RunCache(template, rank(0))
    assert second is not first and second.handle is not first.handle and second.stats is not first.stats
    assert second.serialize() == new  # the new bytes, not what this process loaded before
    assert (second.stats.source, second.stats.load_bytes) == ("warm", len(new))
    assert f"pid {event['pid']}" in second.stats.filled_on and "writer-host" in second.stats.filled_on
    assert second.save().saved and second.stats.save_bytes == len(new)
    # each run's figures are its own: the first run's load and (absent) save are untouched
    assert (first.stats.load_bytes, first.stats.saved, first.stats.save_bytes) == (len(old), False, 0)
    assert f"pid {os.getpid()}" in first.stats.filled_on
    assert not messages.warnings


@pytest.mark.timeout(120)
def test_save_over_a_file_another_process_changed_still_saves_and_warns(trt, template, real_cache_bytes, messages):
    path = rank(0).resolve(template)
    saved(path, make_payload(real_cache_bytes, 0, 0))
    run = cache.RunCache(template, rank(0))
    assert run.stats.source == "warm"
    (event,) = finish([start_writer(mode="save_once", template=path, rank=0, round=1, gpu=gpu_dict(FAKE_GPU),
                                    host="writer-host")])
    assert event["saved"] and read(path) == make_payload(real_cache_bytes, 0, 1)
    mine = make_payload(real_cache_bytes, 0, 2)
    run.handle.load_from_stream(io.BytesIO(mine))  # what this run compiled
    stats = run.save()
    assert stats.saved and stats.save_bytes == len(mine)
    assert read(path) == mine and cache.read_record(path).pid == os.getpid()  # this run's save went through
    changed = messages.matching("changed on disk")
    assert len(changed) == 1 and len(messages.warnings) == 1
    assert path in changed[0] and f"pid {event['pid']}" in changed[0] and "writer-host" in changed[0]
    assert "GPU 3b6d1a2c" in changed[0]
    # nothing changed since this save: the next save of the same run says nothing
    assert cache.save(path, make_payload(real_cache_bytes, 0, 3), stats, rank(0)).saved
    assert len(messages.warnings) == 1


# --- quarantine only what is still bad: a real race -------------------------------------------------------


def load_while_another_process_holds_the_lock(template, bad: bytes, fix: bool, hold_s: float):
    """Put ``bad`` at rank 0's file; a real other process takes ``<path>.lock`` (filelock) and holds it for
    ``hold_s`` s, replacing the file with a good payload (rank 0, round 7) and its record if ``fix``; this
    process loads meanwhile. Returns (data, stats, the holder's events by name, load start, load end)."""
    path = write(rank(0).resolve(template), bad)
    holder = start_writer(mode="hold_lock", template=path, rank=0, round=7, hold_s=hold_s, fix=fix,
                          gpu=gpu_dict(FAKE_GPU))
    try:
        assert next_event(holder)["event"] == "locked"
        loading = time.time()
        data, stats = cache.load(template, rank(0))
        loaded = time.time()
    finally:
        events = {e["event"]: e for e in finish([holder])}
    return data, stats, events, loading, loaded


@pytest.mark.timeout(120)
def test_quarantine_never_moves_a_file_made_good_under_the_lock(template, real_cache_bytes, messages):
    """This run reads a bad file; another process, holding ``<path>.lock``, replaces it with a good one;
    the quarantine waits for the lock, reads again, and keeps (and loads) the good file."""
    path = rank(0).resolve(template)
    data, stats, events, loading, loaded = load_while_another_process_holds_the_lock(
        template, real_cache_bytes[:5000], fix=True, hold_s=2.0
    )
    # the file was still bad when this run read it, and the load waited for the holder's lock
    assert loading < events["replaced"]["at"] <= events["released"]["at"] <= loaded
    good = make_payload(real_cache_bytes, 0, 7)
    assert (data, stats.source, stats.load_bytes) == (good, "warm", len(good))
    assert read(path) == good and not os.path.exists(path + ".corrupt")
    assert not messages.warnings


@pytest.mark.timeout(120)
def test_quarantine_waits_for_the_lock_and_moves_a_file_still_bad(template, real_cache_bytes, messages):
    bad = real_cache_bytes[:5000]
    path = rank(0).resolve(template)
    data, stats, events, _, loaded = load_while_another_process_holds_the_lock(template, bad, fix=False, hold_s=1.0)
    assert events["released"]["at"] <= loaded
    assert (data, stats.source) == (None, "corrupt")
    assert read(path + ".corrupt") == bad and not os.path.exists(path)
    assert len(messages.warnings) == 1 and "moved aside" in messages.warnings[0]


@pytest.mark.timeout(120)
def test_a_run_that_loaded_the_file_made_good_under_the_lock_saves_without_a_change_warning(
    template, real_cache_bytes, messages
):
    """The run loaded exactly the bytes on disk (the other process's good file): nothing changed since."""
    path = rank(0).resolve(template)
    data, stats, events, _, _ = load_while_another_process_holds_the_lock(
        template, real_cache_bytes[:5000], fix=True, hold_s=1.0
    )
    assert data == read(path) and stats.source == "warm"
    mine = make_payload(real_cache_bytes, 0, 8)
    assert cache.save(path, mine, stats, rank(0)).saved
    assert not messages.matching("changed on disk"), messages.warnings


@pytest.mark.timeout(120)
def test_a_save_without_stats_that_waits_for_the_lock_claims_no_change(template, real_cache_bytes, messages):
    """``save(path, data)`` with no stats loaded nothing, so it cannot say the file "changed on disk since
    this run loaded it"; here it waits for another process's lock while that process replaces the file."""
    path = saved(rank(0).resolve(template), make_payload(real_cache_bytes, 0, 0))
    holder = start_writer(mode="hold_lock", template=path, rank=0, round=7, hold_s=1.0, fix=True,
                          gpu=gpu_dict(FAKE_GPU))
    try:
        assert next_event(holder)["event"] == "locked"
        stats = cache.save(path, make_payload(real_cache_bytes, 0, 8), placement=rank(0))
    finally:
        events = {e["event"]: e for e in finish([holder])}
    assert "replaced" in events and stats.saved
    assert read(path) == make_payload(real_cache_bytes, 0, 8)
    assert not messages.matching("changed on disk"), messages.warnings


def test_a_backend_failure_of_any_kind_is_a_warning_not_a_crash(tmp_path, real_cache_bytes, monkeypatch, messages):
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
    stats = cache.save("memory://any/rank0.bin", real_cache_bytes)
    assert len(messages.matching("Unable to locate credentials")) == 1
    assert not stats.saved and "NoCredentials" in stats.save_error
    data, loaded = cache.load("memory://any/rank{rank}.bin", cache.Placement())
    assert len(messages.matching("could not be read")) == 1
    assert data is None and loaded.source == "cold"
    assert len(messages.warnings) == 2


def test_save_stats_describe_the_latest_save_only(tmp_path, real_cache_bytes, monkeypatch, messages):
    path = str(tmp_path / "c.bin")
    stats = cache.save(path, real_cache_bytes)
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and not stats.save_error
    monkeypatch.setattr(cache.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    cache.save(path, real_cache_bytes, stats)
    assert len(messages.matching("No space left")) == 1
    assert not stats.saved and stats.save_bytes == 0 and "No space left" in stats.save_error


@pytest.mark.parametrize(
    ("template", "per_rank"),
    [
        ("c/rank{rank}.bin", True),
        ("c/node{node_rank}/gpu{local_rank}.bin", True),
        ("c/{host}-{local_rank}.bin", True),
        ("c/gpu-{gpu}-rank{rank}.bin", True),
        ("c/gpu{local_rank}.bin", False),
        ("c/gpu-{gpu}.bin", False),
        ("c/{host}.bin", False),
        ("c/shared.bin", False),
    ],
)
def test_templates_that_give_every_rank_its_own_file(template, per_rank):
    assert cache.is_per_rank(template) is per_rank


# --- the device number is part of the identity (measured: same GPU, other cuda:N -> cold) ----------


def test_gpu_id_adds_the_device_number_above_zero():
    assert FAKE_GPU.id == "3b6d1a2c"
    assert dataclasses.replace(FAKE_GPU, ordinal=1).id == "3b6d1a2c-1"
    assert cache.Gpu().id == "cpu"


def test_the_same_gpu_under_another_device_number_gets_its_own_file_and_is_never_called_warm(
    tmp_path, real_cache_bytes, messages
):
    template = str(tmp_path / "{sm}" / "gpu-{gpu}.bin")
    as_cuda1 = dataclasses.replace(PLACEMENT, gpu=dataclasses.replace(FAKE_GPU, ordinal=1))
    assert cache.save(as_cuda1.resolve(template), real_cache_bytes, placement=as_cuda1).saved
    assert cache.read_record(as_cuda1.resolve(template)).ordinal == 1
    # cuda:0 on the same GPU: another file (cold), and no seeding from the cuda:1 file
    data, stats = cache.load(template, PLACEMENT)
    assert (data, stats.source) == (None, "cold") and stats.path != as_cuda1.resolve(template)
    data, stats = cache.load(template, as_cuda1)
    assert (data, stats.source) == (real_cache_bytes, "warm")
    # one fixed file filled as cuda:1, used as cuda:0: loaded but reported as from another GPU
    fixed = str(tmp_path / "fixed.bin")
    cache.save(fixed, real_cache_bytes, placement=as_cuda1)
    data, stats = cache.load(fixed, PLACEMENT)
    assert data == real_cache_bytes and (stats.source, stats.applies) == ("other-gpu", "no")
    assert messages.matching("as cuda:1") and messages.matching("as cuda:0")
