"""Faults with real processes, real files and real filesystems: concurrency, SIGKILL, disk errors, bad files.

Figures are printed (run with ``-s``): processes x rounds, updates lost, corrupt files, kill points
tried and survived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_trt_rtx import TRTRuntimeSettings, cache
from lightning_trt_rtx.session import ServingSession
from tests.conftest import FAKE_GPU, OTHER_GPU
from tests.procs.lightning_models import make_trainer as shared_trainer
from tests.reliability.workers import CRASH_POINTS, REPO, digest, engine_model_class, make_payload, round_payload

PROCESSES, ROUNDS = 8, 5
KILLS: dict[str, bool] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_kills():
    yield
    if KILLS:
        survived = sum(KILLS.values())
        print(f"\nkill points tried: {len(KILLS)}, survived: {survived} ({', '.join(sorted(KILLS))})")


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_workers():
    """Whatever a failing test leaves running (a worker blocked at its crash point) is killed, by pid."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def worker(mode: str, args: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.workers", mode, json.dumps(args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _STARTED.append(proc)
    return proc


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} before {path.name}:\n{proc.stdout.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker never reached {path.name}")
        time.sleep(0.01)


def cache_warnings(messages, path) -> list[str]:
    """The package's warnings about the kernel cache at ``path`` (``messages``: the conftest fixture)."""
    return [m for m in messages.warnings if "ernel cache" in m and str(path) in m]


# A process on FAKE_GPU (the GPU identity faked at the package's boundary, ``Placement(gpu=...)``):
# its saves record that GPU, so its loads can tell a warm file from another GPU's or an unknown one.
ON_GPU = cache.Placement(gpu=FAKE_GPU)


def make_trainer(tmp_path, *callbacks, **kwargs) -> Trainer:
    return shared_trainer(tmp_path, callbacks, **kwargs)


def loader(batches: int = 4) -> DataLoader:
    return DataLoader(torch.randn(batches * 2, 4), batch_size=2)


# --- concurrency ------------------------------------------------------------------------------------


def run_rounds(tmp_path: Path, template: str) -> list[list[dict]]:
    """Every worker's log; a worker's own stdout/stderr must hold no message of the package (the workers
    load cache.py without the package ``__init__``, so a message there reaches stderr through logging's
    last-resort handler, not the ``warnings`` module their logs record)."""
    barrier_dir = tmp_path / "barrier"
    barrier_dir.mkdir()
    procs = [
        worker(
            "rounds",
            dict(template=template, rank=rank, world_size=PROCESSES, rounds=ROUNDS, barrier_dir=str(barrier_dir),
                 out=str(tmp_path / f"out{rank}.json")),
        )
        for rank in range(PROCESSES)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()
        assert "ernel cache" not in out.decode(), out.decode()
    return [json.loads((tmp_path / f"out{rank}.json").read_text()) for rank in range(PROCESSES)]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith((".tmp", ".corrupt")))


def test_concurrent_per_rank_saves_lose_nothing(tmp_path, real_cache_bytes):
    """8 processes x 5 rounds on the default per-rank template: each reads back exactly its previous save."""
    # ranks that share a GPU (these CPU workers all have none): {sm}-trtrtx{trt}-cuda{cuda}/gpu-{gpu}-rank{rank}.bin
    template = cache.default_template(shared_gpu=True)
    assert cache.is_per_rank(template)
    logs = run_rounds(tmp_path, template)
    payloads = {(rank, r): round_payload(real_cache_bytes, rank, r) for rank in range(PROCESSES) for r in range(ROUNDS)}
    lost, corrupt_reads = 0, 0
    for rank, log in enumerate(logs):
        for entry in log:
            r = entry["round"]
            assert entry["saved"], entry
            assert not entry["warnings"], entry
            corrupt_reads += (not entry["loaded_valid"]) + (entry["source"] == "corrupt")
            if r == 0:
                # nothing of its own yet: cold (seeding needs this GPU's identity, which these workers lack)
                assert entry["source"] == "cold" and entry["loaded"] is None, entry
            elif entry["source"] != "unverified" or entry["loaded"] != digest(payloads[(rank, r - 1)]):
                # its own file, loaded; no GPU identity here, so no record can vouch for it: "unverified"
                lost += 1
    placement = cache.Placement(world_size=PROCESSES, host="h")
    corrupt_files = 0
    for rank in range(PROCESSES):
        path = Path(cache.Placement(rank=rank, local_rank=rank % 4, node_rank=rank // 4, world_size=PROCESSES,
                                    host="h").resolve(template))
        data = path.read_bytes()
        corrupt_files += cache.check_bytes(data) is not None
        lost += data != payloads[(rank, ROUNDS - 1)]
    key_dir = Path(placement.resolve(template)).parent
    print(
        f"\nconcurrency, per-rank files: {PROCESSES} processes x {ROUNDS} rounds, {PROCESSES * ROUNDS} saves,"
        f" updates lost {lost}, corrupt files {corrupt_files}, corrupt reads {corrupt_reads}"
    )
    assert (lost, corrupt_files, corrupt_reads) == (0, 0, 0)
    assert leftovers(key_dir) == []
    assert sorted(p.name for p in key_dir.glob("*.bin")) == sorted(f"gpu-cpu-rank{r}.bin" for r in range(PROCESSES))


def test_concurrent_saves_to_one_shared_file_stay_whole(tmp_path, real_cache_bytes):
    """8 processes x 5 rounds on one path: every read and the final file are one complete payload."""
    shared = tmp_path / "shared" / "{sm}" / "cache.bin"
    logs = run_rounds(tmp_path, str(shared))
    by_round = [{digest(round_payload(real_cache_bytes, rank, r)) for rank in range(PROCESSES)} for r in range(ROUNDS)]
    corrupt_reads = 0
    for log in logs:
        for entry in log:
            r = entry["round"]
            assert entry["saved"] and not entry["warnings"], entry
            corrupt_reads += (not entry["loaded_valid"]) + (entry["source"] == "corrupt")
            if entry["source"] == "unverified":  # a file another round of saves left whole (no GPU: unverified)
                assert entry["loaded"] in by_round[r] | (by_round[r - 1] if r else set()), entry
            else:
                assert r == 0 and entry["source"] == "cold", entry
    final = Path(str(shared).format(sm="cpu")).read_bytes()
    corrupt_files = int(cache.check_bytes(final) is not None)
    print(
        f"\nconcurrency, one shared file: {PROCESSES} processes x {ROUNDS} rounds, corrupt files {corrupt_files},"
        f" corrupt reads {corrupt_reads}, final file is one of the last round's payloads:"
        f" {digest(final) in by_round[-1]}"
    )
    assert corrupt_files == 0 and corrupt_reads == 0
    assert digest(final) in by_round[-1]
    assert leftovers(tmp_path / "shared") == []


class _FakeTrainer:
    """Only what ServingSession reads from a Trainer: its ranks, and its strategy's devices (4 per node)."""

    def __init__(self, world_size: int, rank: int = 0):
        self.global_rank, self.local_rank, self.node_rank, self.world_size = rank, rank % 4, rank // 4, world_size

        class Strategy:
            parallel_devices = [torch.device("cuda", i) for i in range(min(world_size, 4))]

        self.strategy = Strategy()


@pytest.mark.parametrize(
    ("template", "world_size", "warns"),
    [
        ("shared/cache.bin", 8, True),
        ("shared/{sm}/local{local_rank}.bin", 8, True),  # ranks of two nodes would share a file
        ("shared/{sm}/rank{rank}.bin", 8, False),
        ("shared/{sm}/gpu-{gpu}.bin", 8, False),  # one file per physical GPU
        ("shared/cache.bin", 1, False),
    ],
)
def test_shared_template_across_ranks_warns(tmp_path, trt, messages, template, world_size, warns):
    """A template that gives several ranks one file warns once, on rank zero (every rank would say the same)."""
    from lightning_trt_rtx.settings import TRTSettings

    settings = TRTSettings(runtime_cache=str(tmp_path / template))
    for rank in sorted({0, world_size - 1}, reverse=True):  # the last rank first: it stays silent
        session = ServingSession.for_trainer(_FakeTrainer(world_size, rank), settings)
        with session.engines_created():  # opens this run's cache as serving does
            pass
        session.close()
        placement = cache.Placement.current(rank=rank, local_rank=rank % 4, node_rank=rank // 4, world_size=world_size)
        assert isinstance(session.cache, cache.RunCache)
        assert session.cache.path == placement.resolve(str(tmp_path / template))
        assert session.cache.placement == placement
    shared = messages.matching("share the kernel cache file")
    assert len(shared) == int(warns), shared
    if warns:
        assert str(tmp_path / template) in shared[0] and "{rank}" in shared[0] and "{gpu}" in shared[0]


# --- SIGKILL mid-save -------------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [True, False], ids=["over-old-file", "first-save"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_during_save(tmp_path, real_cache_bytes, messages, point, previous):
    """SIGKILL at each point of a save: the file is the old or the new payload, whole; the next save works."""
    key = tmp_path / "cpu-key"
    template = str(key / "rank{rank}.bin")
    path = key / "rank0.bin"
    old = make_payload(real_cache_bytes, "old", size=120_000)
    new = make_payload(real_cache_bytes, "new", size=150_000)
    if previous:
        assert cache.save(str(path), old, placement=ON_GPU).saved  # recorded as filled on FAKE_GPU
    ready = tmp_path / "ready"
    proc = worker("crash", dict(path=str(path), point=point, ready=str(ready), tag="new", size=150_000))
    wait_for(ready, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    renamed = point in ("before-dir-fsync", "after-save")
    tmp_file = Path(str(path) + ".tmp")
    # the kill landed where intended: mid-save points leave the temp file, with half the bytes mid-write
    assert tmp_file.exists() == (not renamed)
    if point == "mid-write":
        assert tmp_file.stat().st_size == len(new) // 2
    expected = new if renamed else (old if previous else None)
    on_disk = path.read_bytes() if path.exists() else None
    assert on_disk == expected
    if on_disk is not None:
        assert cache.check_bytes(on_disk) is None

    # the record never vouches for bytes it does not describe: the old one stays with the old bytes; a kill
    # between the data rename and the record rename leaves a stale record, which vouches for nothing
    record = cache.read_record(str(path))
    if previous and not renamed:
        assert record is not None and record.gpu_uuid == FAKE_GPU.uuid
    elif point == "after-save":
        assert record is not None and record.sha256 == hashlib.sha256(new).hexdigest()
    else:
        assert record is None

    # the next process loads what is there (never the temp file, never "corrupt")...
    data, stats = cache.load(template, cache.Placement(rank=0, world_size=2))  # as the writer: no GPU identity
    other, other_stats = cache.load(template, cache.Placement(rank=1, world_size=2))
    assert not messages.warnings, messages.warnings
    assert data == expected and stats.source == ("unverified" if expected else "cold")
    assert other is None and other_stats.source == "cold"  # seeding needs this GPU's identity and record
    if previous and not renamed:  # on the GPU that filled it: warm, and its sibling is seeded from it
        data, stats = cache.load(template, cache.Placement(rank=0, world_size=2, gpu=FAKE_GPU))
        other, other_stats = cache.load(template, cache.Placement(rank=1, world_size=2, gpu=FAKE_GPU))
        assert (data, stats.source) == (old, "warm")
        assert (other, other_stats.source, other_stats.loaded_from) == (old, "seeded", str(path))
        assert not messages.warnings, messages.warnings
    # ...and saves within seconds: the dead process's lock and temp file are in nobody's way
    newer = make_payload(real_cache_bytes, "newer", size=90_000)
    start = time.monotonic()
    stats = cache.save(str(path), newer)
    elapsed = time.monotonic() - start
    assert stats.saved and elapsed < 5.0, (stats, elapsed)
    assert path.read_bytes() == newer
    assert not tmp_file.exists()
    KILLS[f"{point}/{'old' if previous else 'none'}"] = True


def test_sigkill_lock_holder_releases_a_waiting_writer(tmp_path, real_cache_bytes):
    """A writer waiting on the lock of a process stuck before its rename proceeds once that one is killed."""
    path = tmp_path / "k" / "rank0.bin"
    old = make_payload(real_cache_bytes, "old", size=100_000)
    assert cache.save(str(path), old).saved
    ready, started, out = tmp_path / "ready", tmp_path / "started", tmp_path / "waiter.json"
    holder = worker("crash", dict(path=str(path), point="before-rename", ready=str(ready), tag="holder", size=110_000))
    wait_for(ready, holder)
    waiter = worker("save_once", dict(path=str(path), tag="waiter", size=130_000, started=str(started), out=str(out)))
    wait_for(started, waiter)
    time.sleep(1.5)
    assert waiter.poll() is None and not out.exists(), "the waiter did not wait for the lock"
    assert path.read_bytes() == old
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    waiter.communicate(timeout=10)
    result = json.loads(out.read_text())
    assert result["saved"], result
    assert path.read_bytes() == make_payload(real_cache_bytes, "waiter", size=130_000)
    KILLS["before-rename/with-waiter"] = True


# --- disks that refuse ------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k"):
    """A real, small tmpfs (needs root with CAP_SYS_ADMIN; skips otherwise)."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount binary")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> int:
    """Fill the filesystem holding ``directory``; returns the bytes written."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    written = 0
    try:
        while True:
            try:
                written += os.write(fd, b"\xff" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
        while True:  # the last partial page
            try:
                if not os.write(fd, b"\xff"):
                    break
                written += 1
            except OSError:
                break
    finally:
        os.close(fd)
    return written


def save_with_warnings(messages, path, data):
    """Save ``data`` (as a process on FAKE_GPU); returns the stats and the warnings this save gave about ``path``."""
    before = len(cache_warnings(messages, path))
    stats = cache.save(str(path), data, placement=ON_GPU)
    return stats, cache_warnings(messages, path)[before:]


def assert_refused_once(stats, said, path, old, err_fragment):
    assert not stats.saved and err_fragment in stats.save_error, stats
    assert len(said) == 1, said
    assert err_fragment in said[0] and "untouched" in said[0]
    if old is not None:
        assert Path(path).read_bytes() == old
        assert cache.read_record(str(path), old) is not None  # and the old record still vouches for it
    assert not Path(str(path) + ".tmp").exists()


def test_full_disk_real_tmpfs(tmp_path, real_cache_bytes, messages):
    with tmpfs(tmp_path / "small") as mnt:
        path = mnt / "rank0.bin"
        old = make_payload(real_cache_bytes, "old", size=20_000)
        assert cache.save(str(path), old, placement=ON_GPU).saved
        assert fill(mnt) > 0
        stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=20_000))
        assert_refused_once(stats, said, path, old, "No space left on device")
        data, load_stats = cache.load(str(mnt / "rank{rank}.bin"), ON_GPU)
        assert data == old and load_stats.source == "warm"
        (mnt / "filler").unlink()  # space again: the next save goes through
        assert cache.save(str(path), make_payload(real_cache_bytes, "new", size=20_000)).saved


def test_full_disk_simulated(tmp_path, real_cache_bytes, monkeypatch, messages):
    """ENOSPC half-way through the temp file (for hosts where a tmpfs cannot be mounted)."""
    path = tmp_path / "k" / "rank0.bin"
    old = make_payload(real_cache_bytes, "old", size=50_000)
    assert cache.save(str(path), old, placement=ON_GPU).saved

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:4096])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(
        cache, "open", lambda file, mode="r", *a, **k: FullDisk(open(file, mode, *a, **k)), raising=False
    )
    stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=60_000))
    assert_refused_once(stats, said, path, old, "No space left on device")


def test_read_only_directory_real_mount(tmp_path, real_cache_bytes, messages):
    with tmpfs(tmp_path / "ro", size="256k") as mnt:
        path = mnt / "k" / "rank0.bin"
        old = make_payload(real_cache_bytes, "old", size=30_000)
        assert cache.save(str(path), old, placement=ON_GPU).saved
        (mnt / "k" / "rank1.bin").write_bytes(b"garbage")  # a bad file that cannot be moved aside
        result = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot remount read-only: {result.stderr.decode().strip()}")
        stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=30_000))
        assert_refused_once(stats, said, path, old, "Read-only file system")
        stats, said = save_with_warnings(messages, mnt / "new" / "rank0.bin", old)  # cannot even create the directory
        assert_refused_once(stats, said, mnt / "new" / "rank0.bin", None, "Read-only file system")
        data, load_stats = cache.load(str(mnt / "k" / "rank{rank}.bin"), ON_GPU)
        assert data == old and load_stats.source == "warm"
        data, load_stats = cache.load(str(mnt / "k" / "rank{rank}.bin"), cache.Placement(rank=1, gpu=FAKE_GPU))
        assert data is None and load_stats.source == "corrupt"  # and not seeded from rank 0's good file
        assert len(messages.matching("could not move it aside")) == 1
        assert (mnt / "k" / "rank1.bin").read_bytes() == b"garbage"


def test_read_only_directory_chmod(tmp_path, real_cache_bytes, messages):
    directory = tmp_path / "k"
    path = directory / "rank0.bin"
    old = make_payload(real_cache_bytes, "old", size=30_000)
    assert cache.save(str(path), old, placement=ON_GPU).saved
    directory.chmod(0o555)
    try:
        probe = directory / "probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("this user writes into a 0o555 directory anyway (root)")
        stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=30_000))
        assert_refused_once(stats, said, path, old, "Permission denied")
    finally:
        directory.chmod(0o755)


def test_read_only_directory_simulated(tmp_path, real_cache_bytes, monkeypatch, messages):
    """EROFS from every write into the directory (tests run as root; chmod does not stop root)."""
    directory = tmp_path / "k"
    path = directory / "rank0.bin"
    old = make_payload(real_cache_bytes, "old", size=30_000)
    assert cache.save(str(path), old, placement=ON_GPU).saved
    real_os_open, real_open = os.open, open

    def refuse(file):
        if str(file).startswith(str(directory)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))

    def os_open(file, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(file)
        return real_os_open(file, flags, *a, **k)

    def builtin_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(cache, "open", builtin_open, raising=False)
    stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=30_000))
    assert_refused_once(stats, said, path, old, "Read-only file system")


def test_parent_is_a_file(tmp_path, real_cache_bytes, messages):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"user data")
    path = blocker / "rank0.bin"
    stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=30_000))
    assert not stats.saved and len(said) == 1, said
    assert blocker.read_bytes() == b"user data"
    assert {p.name for p in tmp_path.iterdir()} <= {"default-cache", "not-a-dir"}
    data, load_stats = cache.load(str(blocker / "rank{rank}.bin"), cache.Placement())
    assert data is None and load_stats.source == "cold"


def test_path_is_a_directory(tmp_path, real_cache_bytes, messages):
    path = tmp_path / "k" / "rank0.bin"
    (path / "inside").mkdir(parents=True)
    stats, said = save_with_warnings(messages, path, make_payload(real_cache_bytes, "new", size=30_000))
    assert not stats.saved and len(said) == 1, said
    assert (path / "inside").is_dir()
    data, load_stats = cache.load(str(tmp_path / "k" / "rank{rank}.bin"), cache.Placement())
    assert data is None and load_stats.source == "cold"


@pytest.mark.parametrize("disk", ["real-tmpfs", "simulated"])
def test_full_disk_through_trainer_predict(tmp_path, real_cache_bytes, monkeypatch, fake_gpu, messages, disk):
    """Trainer.predict with TRTRuntimeSettings on a full disk: predictions come back, one warning, old file kept."""
    model = engine_model_class()()
    old = make_payload(real_cache_bytes, "old", size=20_000)
    with contextlib.ExitStack() as stack:
        if disk == "real-tmpfs":
            directory = stack.enter_context(tmpfs(tmp_path / "small"))
        else:
            directory = tmp_path / "k"
        path = directory / "rank0.bin"
        assert cache.save(str(path), old, placement=ON_GPU).saved  # filled earlier on this (fake) GPU
        if disk == "real-tmpfs":
            fill(directory)
        else:
            real_open = open

            def full(file, mode="r", *a, **k):
                if "w" in mode:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
                return real_open(file, mode, *a, **k)

            monkeypatch.setattr(cache, "open", full, raising=False)
        callback = TRTRuntimeSettings(runtime_cache=str(directory / "rank{rank}.bin"), print_table=False)
        predictions = make_trainer(tmp_path, callback).predict(model, loader(4))
        assert len(predictions) == 4 and all(p.shape == (2, 2) for p in predictions)
        said = cache_warnings(messages, path)
        assert len(said) == 1 and "No space left on device" in said[0], said
        assert path.read_bytes() == old
        (row,) = callback.figures
        assert (row.cache_source, row.cache_bytes, row.saved_bytes, row.engines) == ("warm", len(old), 0, 2)


# --- bad files ----------------------------------------------------------------------------------------

BAD_FILES = {
    "empty": lambda real: b"",
    "shorter-than-header": lambda real: real[:10],
    "truncated": lambda real: real[: len(real) // 3],
    "padded": lambda real: real + b"\0" * 7,
    "random-bytes": lambda real: bytes((i * 7919 + 13) % 251 for i in range(5000)),
    "wrong-magic": lambda real: b"xtrt" + real[4:],
}


def record_as_filled_on(path: Path, data: bytes, gpu: cache.Gpu = FAKE_GPU) -> None:
    """A record beside ``path`` describing ``data`` as filled on ``gpu`` (also for bytes no save would write)."""
    record = cache.Record(
        gpu_uuid=gpu.uuid, gpu_name=gpu.name, sm=gpu.sm, trt="1.6.1", cuda="13.0", host="h", pid=os.getpid(),
        saved_unix=time.time(), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )
    Path(str(path) + cache.RECORD_SUFFIX).write_text(json.dumps(dataclasses.asdict(record)))


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_own_file_is_moved_aside(tmp_path, real_cache_bytes, trt, messages, kind):
    """As cache.py documents: detected before TensorRT sees it, moved to .corrupt, one warning, cold start."""
    bad = BAD_FILES[kind](real_cache_bytes)
    path = tmp_path / "k" / "rank0.bin"
    path.parent.mkdir()
    path.write_bytes(bad)
    record_as_filled_on(path, bad)  # even a record of this GPU does not make bad bytes loadable
    placement = cache.Placement(world_size=2, gpu=FAKE_GPU)
    run = cache.RunCache(str(tmp_path / "k" / "rank{rank}.bin"), placement)
    said = cache_warnings(messages, path)
    assert len(said) == 1 and "moved aside" in said[0], said
    assert run.stats.source == "corrupt" and run.stats.load_bytes == 0
    assert not path.exists() and Path(str(path) + ".corrupt").read_bytes() == bad
    # nothing was loaded, so nothing is saved over it; a real save later replaces it
    assert run.save().save_error.startswith("nothing to save")
    good = make_payload(real_cache_bytes, "good", size=40_000)
    assert cache.save(str(path), good, placement=placement).saved
    data, stats = cache.load(str(tmp_path / "k" / "rank{rank}.bin"), placement)
    assert (data, stats.source) == (good, "warm")
    assert len(messages.warnings) == 1


def test_bad_own_file_through_trainer_predict(tmp_path, real_cache_bytes, messages):
    model = engine_model_class()()
    path = tmp_path / "k" / "rank0.bin"
    path.parent.mkdir()
    path.write_bytes(real_cache_bytes[:5000])
    callback = TRTRuntimeSettings(runtime_cache=str(tmp_path / "k" / "rank{rank}.bin"), print_table=False)
    predictions = make_trainer(tmp_path, callback).predict(model, loader(3))
    assert len(predictions) == 3
    assert len(cache_warnings(messages, path)) == 1
    assert callback.figures[0].cache_source == "corrupt"
    assert Path(str(path) + ".corrupt").read_bytes() == real_cache_bytes[:5000]


def test_cache_from_another_gpu_or_version_is_never_offered(tmp_path, real_cache_bytes, trt, fake_gpu, messages):
    """Files this very GPU filled, under other keys (GPU architecture, TensorRT-RTX, CUDA), are never read on
    this host (key sm90 here, the faked GPU's); under the same key, this GPU's file seeds."""
    template = cache.default_template()
    here = cache.Placement.current(rank=0, world_size=4)
    assert here.gpu == FAKE_GPU and here.sm == "sm90"
    key = Path(here.resolve(template)).parent
    assert key.name == f"sm90-trtrtx{here.trt}-cuda{here.cuda}"
    foreign = [
        key.parent / f"sm89-trtrtx{here.trt}-cuda{here.cuda}",  # another GPU architecture
        key.parent / f"{here.sm}-trtrtx1.0.0-cuda{here.cuda}",  # another TensorRT-RTX version
        key.parent / f"{here.sm}-trtrtx{here.trt}-cuda11.8",  # another CUDA
    ]
    names = [f"gpu-{FAKE_GPU.id}.bin"] + [f"gpu-{FAKE_GPU.id}-rank{r}.bin" for r in range(3)]
    for directory in foreign:
        for name in names:  # recorded as filled on this very GPU: only the key keeps them out
            assert cache.save(str(directory / name), real_cache_bytes, placement=here).saved
    data, stats = cache.load(template, here)
    assert (data, stats.source, stats.loaded_from) == (None, "cold", "")
    assert not messages.warnings
    for directory in foreign:  # left alone: they are good caches for someone else
        assert all((directory / name).read_bytes() == real_cache_bytes for name in names)
    sibling = make_payload(real_cache_bytes, "same-key", size=50_000)
    assert cache.save(str(key / f"gpu-{FAKE_GPU.id}-rank3.bin"), sibling, placement=here).saved
    data, stats = cache.load(template, here)
    assert (data, stats.source) == (sibling, "seeded")
    assert Path(stats.loaded_from).parent == key


def test_seeding_skips_bad_siblings(tmp_path, real_cache_bytes, messages):
    """Corrupt, dangling, directory, temp and other-GPU siblings are skipped (and left alone); the valid one
    this GPU filled seeds."""
    key = tmp_path / "k"
    key.mkdir()
    (key / "rank1.bin").write_bytes(real_cache_bytes + b"junk")  # largest, invalid: tried first, skipped
    record_as_filled_on(key / "rank1.bin", real_cache_bytes + b"junk")
    os.symlink(tmp_path / "gone.bin", key / "rank2.bin")  # dangling
    (key / "rank3.bin").mkdir()
    for leftover in ("rank4.bin.tmp", "rank5.bin.corrupt"):  # a dead writer's temp file, a quarantined file
        (key / leftover).write_bytes(real_cache_bytes)
        record_as_filled_on(key / leftover, real_cache_bytes)
    assert cache.save(str(key / "rank7.bin"), real_cache_bytes, placement=cache.Placement(gpu=OTHER_GPU)).saved
    good = make_payload(real_cache_bytes, "good", size=30_000)
    assert cache.save(str(key / "rank6.bin"), good, placement=ON_GPU).saved
    placement = cache.Placement(rank=0, world_size=8, gpu=FAKE_GPU)
    data, stats = cache.load(str(key / "rank{rank}.bin"), placement)
    assert (data, stats.source, stats.loaded_from) == (good, "seeded", str(key / "rank6.bin"))
    assert not messages.warnings
    assert (key / "rank1.bin").read_bytes() == real_cache_bytes + b"junk"
    assert (key / "rank7.bin").read_bytes() == real_cache_bytes
    os.unlink(key / "rank6.bin")
    data, stats = cache.load(str(key / "rank{rank}.bin"), placement)
    assert (data, stats.source) == (None, "cold")


def test_bad_file_on_an_fsspec_url(real_cache_bytes, messages):
    """The same checks for fsspec URLs (memory://): moved aside, then a save replaces it."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/reliability/k/rank0.bin", real_cache_bytes[:100])
    try:
        data, stats = cache.load("memory://reliability/k/rank{rank}.bin", ON_GPU)
        assert (data, stats.source) == (None, "corrupt")
        assert len(messages.warnings) == 1
        assert fs.cat_file("/reliability/k/rank0.bin.corrupt") == real_cache_bytes[:100]
        good = make_payload(real_cache_bytes, "good", size=30_000)
        assert cache.save("memory://reliability/k/rank0.bin", good, placement=ON_GPU).saved
        data, stats = cache.load("memory://reliability/k/rank{rank}.bin", ON_GPU)
        assert (data, stats.source) == (good, "warm")
    finally:
        fs.rm("/reliability", recursive=True)


def _protocol_without_backend() -> str:
    import fsspec

    for protocol in ("s3", "gcs", "abfs", "oci", "dropbox"):
        try:
            fsspec.core.url_to_fs(f"{protocol}://bucket/key")
        except ImportError:
            return protocol
        except Exception:  # installed, but e.g. no credentials: not the case under test
            continue
    pytest.skip("every probed fsspec backend is installed")


def test_url_whose_fsspec_backend_is_missing(tmp_path, real_cache_bytes, trt, messages):
    """A known protocol without its package (s3 without s3fs): warnings, a cold run, predictions returned."""
    protocol = _protocol_without_backend()
    template = f"{protocol}://bucket/caches/rank{{rank}}.bin"
    data, stats = cache.load(template, cache.Placement(world_size=2))
    saved = cache.save(f"{protocol}://bucket/caches/rank0.bin", make_payload(real_cache_bytes, "x", size=1000))
    assert (data, stats.source) == (None, "cold")
    assert not saved.saved and "ImportError" in saved.save_error
    assert len(messages.matching("could not be read")) == 1
    assert len(messages.matching("Could not save")) == 1
    callback = TRTRuntimeSettings(runtime_cache=template, print_table=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        predictions = make_trainer(tmp_path, callback).predict(engine_model_class()(), loader(2))
    assert len(predictions) == 2 and callback.figures[0].cache_source == "cold"
