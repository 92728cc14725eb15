"""Kernel caches at ``s3://`` URLs, against a real S3-protocol server on localhost (moto's, started and
stopped here) through s3fs: a save is one whole-object write of the final key and its record (no
temporary key, no copy, no delete), a run that saves over another writer's save is told who that
was, racing writers leave one writer's whole bytes, an invalid cache never replaces a good object,
and a connection cut mid-upload or a server that cannot be reached keeps the previous object and
is reported.

Between this process and the server sits a small TCP proxy of the test's own: it records each
request line (so a test can assert which writes a save made) and can cut an upload of one key
half-way through its body, or refuse every connection. The GPU identity is faked only at the
package's own boundary (``Placement(gpu=...)``); writer processes are given theirs in their config."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import uuid

import fsspec
import pytest
import s3fs
from moto import server as moto_server

from lightning_trt_rtx import cache
from tests.conftest import FAKE_GPU, OTHER_GPU
from tests.procs.cache_writer import make_payload

WRITER = os.path.join(os.path.dirname(__file__), "procs", "cache_writer.py")
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "rtx-1.6.1-sm90.bin")
TEMPLATE = "/{sm}-trtrtx{trt}-cuda{cuda}/gpu-{gpu}.bin"  # under the bucket: the default template's layout
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def placement(rank: int = 0, gpu: cache.Gpu = FAKE_GPU, host: str = "nodeA") -> cache.Placement:
    return cache.Placement(rank=rank, world_size=8, sm="sm90", trt="1.6.1", cuda="13.0", host=host, gpu=gpu)


# --- the server, and a proxy in front of it ------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free localhost port for the whole session; (host, port)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()
        server._server.server_close()  # stop() leaves the listening socket open


class Proxy:
    """A TCP proxy to the server that records request lines, and on demand cuts the upload of one key
    half-way through its body (``cut``) or refuses every connection (``refuse``)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut: str | None = None  # a key (path after the bucket): its PUTs lose their connection mid-body
        self.refuse = False
        self.cuts = 0
        self.requests: list[str] = []  # "PUT /bucket/key", "PUT /bucket/key (copy)", "DELETE /bucket/key", ...
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def writes(self, bucket: str) -> list[str]:
        """Every request that changed something under ``bucket``, key relative to it."""
        prefix = f" /{bucket}/"
        return [r.replace(prefix, " /", 1) for r in self.requests if not r.startswith(("GET", "HEAD")) and prefix in r]

    def close(self) -> None:
        self.listener.close()
        for s in list(self._sockets):
            _close(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                _close(client)
                continue
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        left = None  # bytes still to forward before the connection is cut
        try:
            while data := src.recv(1 << 16):
                if requests and left is None:
                    for m in re.finditer(rb"(?m)^([A-Z]+) (/[^ ?]*)\S* HTTP/1\.1\r\n", data):
                        head = data[m.start() : data.find(b"\r\n\r\n", m.start())]
                        copy = " (copy)" if b"x-amz-copy-source" in head.lower() else ""
                        self.requests.append(f"{m.group(1).decode()} {m.group(2).decode()}{copy}")
                        if self.cut and m.group(1) == b"PUT" and m.group(2).decode().endswith("/" + self.cut):
                            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                            left = m.start() + len(head) + 4 + length // 2
                            break
                if left is not None:
                    dst.sendall(data[:left])
                    left -= min(left, len(data))
                    if left == 0:
                        self.cuts += 1
                        return
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@dataclasses.dataclass
class Store:
    root: str  # "s3://<bucket>"
    bucket: str
    proxy: Proxy
    fs: object  # s3fs straight to the server (not through the proxy), to check what is stored

    def template(self, tail: str = TEMPLATE) -> str:
        return self.root + tail

    def keys(self) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(k.split("/", 1)[1] for k in self.fs.find(self.bucket))

    def cat(self, path: str) -> bytes:
        self.fs.invalidate_cache()
        return self.fs.cat_file(path.removeprefix("s3://"))

    def put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path.removeprefix("s3://"), data)


@pytest.fixture
def store(s3_server, monkeypatch, tmp_path):
    """A fresh bucket on the session's server, reached through a proxy of this test's own: in this process
    through fsspec's storage options for ``s3``, in writer processes through ``AWS_ENDPOINT_URL``."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries; s3fs retries 5 times on its own
    proxy = Proxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    options = {"key": "testing", "secret": "testing", "config_kwargs": {"retries": {"total_max_attempts": 1}}}
    monkeypatch.setitem(fsspec.config.conf, "s3", {**options, "endpoint_url": proxy.url})
    direct = s3fs.S3FileSystem(endpoint_url="http://{}:{}".format(*s3_server), skip_instance_cache=True, **options)
    bucket = f"lttr-{uuid.uuid4().hex[:12]}"
    direct.mkdir(bucket)
    try:
        yield Store(root=f"s3://{bucket}", bucket=bucket, proxy=proxy, fs=direct)
    finally:
        proxy.close()
        direct.rm(bucket, recursive=True)


def run_writer(**cfg) -> dict:
    """One writer process (tests/procs/cache_writer.py), run to its end; its last event."""
    cfg.setdefault("base", FIXTURE)
    done = subprocess.run(
        [sys.executable, WRITER, json.dumps(cfg)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_save_writes_the_final_object_whole_then_its_record_and_loads_warm(store, trt, real_cache_bytes, messages):
    template = store.template()
    path = placement().resolve(template)
    key = path.removeprefix(store.root + "/")
    assert key == "sm90-trtrtx1.6.1-cuda13.0/gpu-3b6d1a2c.bin"

    data, stats = cache.load(template, placement())  # nothing stored yet
    assert (data, stats.source) == (None, "cold")

    stats = cache.save(path, real_cache_bytes, placement=placement(rank=3))
    assert stats.saved and stats.save_bytes == len(real_cache_bytes) and not stats.save_error
    # one whole-object write of the final key, then its record: no temporary key, no copy, no delete
    assert store.proxy.writes(store.bucket) == [f"PUT /{key}", f"PUT /{key}.json"]
    assert store.keys() == [key, key + ".json"]
    assert store.cat(path) == real_cache_bytes
    record = json.loads(store.cat(path + ".json"))
    assert record["gpu_uuid"] == FAKE_GPU.uuid and record["host"] == "nodeA"
    assert (record["rank"], record["pid"]) == (3, os.getpid())
    assert record["bytes"] == len(real_cache_bytes)
    assert record["sha256"] == hashlib.sha256(real_cache_bytes).hexdigest()

    # a new run's handle loads it warm, and saves what it holds as one object again
    run = cache.RunCache(template, placement())
    assert (run.stats.source, run.stats.load_bytes, run.stats.loaded_from) == ("warm", len(real_cache_bytes), path)
    assert "on nodeA, rank 3" in run.stats.filled_on
    assert run.serialize() == real_cache_bytes
    writes = len(store.proxy.writes(store.bucket))
    assert run.save().saved
    assert store.proxy.writes(store.bucket)[writes:] == [f"PUT /{key}", f"PUT /{key}.json"]
    assert store.cat(path) == real_cache_bytes and store.keys() == [key, key + ".json"]
    assert not messages.warnings


@pytest.mark.timeout(120)
def test_a_rank_template_seeds_from_this_gpus_object_only(store, real_cache_bytes, messages):
    template = store.template("/{sm}/rank{rank}.bin")
    cache.save(placement(0).resolve(template), real_cache_bytes, placement=placement(0))
    data, stats = cache.load(template, placement(4))
    assert (data, stats.source) == (real_cache_bytes, "seeded")
    assert stats.loaded_from == store.root + "/sm90/rank0.bin"
    data, stats = cache.load(template, placement(4, gpu=OTHER_GPU))
    assert (data, stats.source) == (None, "cold")
    assert not messages.warnings


@pytest.mark.timeout(120)
def test_each_load_sees_what_another_process_saved_since(store, real_cache_bytes, messages):
    """This process listed the prefix (seeding) and found nothing; a writer process then saves: the next
    load asks the store, not this process's cached listing, and is warm."""
    template = store.template()
    path = placement().resolve(template)
    assert cache.load(template, placement())[1].source == "cold"
    event = run_writer(mode="save_once", template=path, rank=0, round=1, gpu=dataclasses.asdict(FAKE_GPU))
    assert event["saved"], event
    data, stats = cache.load(template, placement())
    assert (data, stats.source) == (make_payload(real_cache_bytes, 0, 1), "warm")
    assert f"pid {event['pid']}" in stats.filled_on
    assert not messages.warnings


@pytest.mark.timeout(120)
def test_saving_over_another_writers_save_still_saves_and_names_that_writer(store, real_cache_bytes, messages):
    template = store.template()
    path = placement().resolve(template)
    cache.save(path, make_payload(real_cache_bytes, 0, 0), placement=placement())
    loaded, stats = cache.load(template, placement())
    assert stats.source == "warm" and loaded == make_payload(real_cache_bytes, 0, 0)

    other = run_writer(mode="save_once", template=path, rank=5, round=1, host="writer-host",
                       gpu=dataclasses.asdict(FAKE_GPU))  # another host's job on a GPU like this one
    assert other["saved"] and store.cat(path) == make_payload(real_cache_bytes, 5, 1)

    mine = make_payload(real_cache_bytes, 0, 2)
    stats = cache.save(path, mine, stats, placement())
    assert stats.saved and stats.save_bytes == len(mine)
    # the last writer wins, whole: this run's bytes and this run's record
    assert store.cat(path) == mine
    assert cache.read_record(path).pid == os.getpid()
    (told,) = messages.warnings
    assert f"Kernel cache {path} changed in its store since this run loaded it" in told
    assert "writer-host, rank 5" in told and f"pid {other['pid']}" in told and "GPU 3b6d1a2c" in told
    assert "caches cannot be merged" in told

    # nothing changed since this run's own save: its next save says nothing
    assert cache.save(path, make_payload(real_cache_bytes, 0, 3), stats, placement()).saved
    assert len(messages.warnings) == 1
    assert not [k for k in store.keys() if k.endswith(".tmp")]


@pytest.mark.timeout(180)
def test_racing_writers_leave_one_writers_whole_bytes(store, tmp_path, real_cache_bytes):
    """Three writer processes save 4 rounds each to one key, released together, while this process reads
    it: every read, and the object left, is exactly one of the payloads (never a mix), and valid."""
    path = store.template("/shared.bin")
    go = str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, WRITER, json.dumps({"mode": "rounds", "template": path, "rank": r, "rounds": 4, "go": go,
                                                 "base": FIXTURE, "gpu": dataclasses.asdict(FAKE_GPU)})],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(3)
    ]
    payloads = {make_payload(real_cache_bytes, r, n): (r, n) for r in range(3) for n in range(4)}
    for proc in procs:
        assert json.loads(proc.stdout.readline())["event"] == "ready"
    open(go, "w").close()
    seen = set()
    while any(p.poll() is None for p in procs):
        try:
            data = cache._read(path)
        except OSError as err:  # moto's server sometimes answers a GET racing a PUT of its key with HTTP 500
            assert "Internal Server Error" in str(err)
            continue
        if data is not None:
            assert data in payloads, f"a read of {len(data)} bytes is no writer's whole payload"
            seen.add(payloads[data])
    events = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        events += [json.loads(line) for line in out.splitlines() if '"save"' in line]
    # moto's server sometimes fails one of two PUTs racing to one key (HTTP 500): that save is reported
    assert len(events) == 12 and all(e["saved"] or e["error"] for e in events), events
    assert any(e["saved"] for e in events)
    final = store.cat(path)
    assert final in payloads and cache.check_bytes(final) is None
    assert not [k for k in store.keys() if k.endswith(".tmp")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bad", [b"", b"ptrt", "truncated", "not a cache"])
def test_an_invalid_cache_never_replaces_a_good_object(store, real_cache_bytes, messages, bad):
    bad = {"truncated": real_cache_bytes[:-100], "not a cache": b"x" * 4096}.get(bad, bad)
    path = placement().resolve(store.template())
    cache.save(path, real_cache_bytes, placement=placement())
    writes = len(store.proxy.writes(store.bucket))
    stats = cache.save(path, bad, placement=placement())
    assert not stats.saved and stats.save_error.startswith("nothing to save")
    assert len(store.proxy.writes(store.bucket)) == writes  # not a byte sent
    assert store.cat(path) == real_cache_bytes
    assert cache.read_record(path).bytes == len(real_cache_bytes)
    assert not messages.warnings


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["connection cut mid-upload", "server unreachable"])
def test_a_failed_save_keeps_the_previous_object_and_is_reported(store, real_cache_bytes, messages, fault):
    path = placement().resolve(store.template())
    key = path.removeprefix(store.root + "/")
    good = make_payload(real_cache_bytes, 0, 0)
    cache.save(path, good, placement=placement())
    _, stats = cache.load(store.template(), placement())
    if fault == "server unreachable":
        store.proxy.refuse = True
        store.proxy.close()  # every open connection too
    else:
        store.proxy.cut = key

    stats = cache.save(path, make_payload(real_cache_bytes, 0, 1), stats, placement())
    assert not stats.saved and stats.save_bytes == 0 and stats.save_error
    (told,) = messages.warnings
    assert told.startswith(f"Could not save the kernel cache to {path} (") and "The run goes on" in told
    if fault == "connection cut mid-upload":
        assert store.proxy.cuts >= 1  # the upload did start, and lost its connection half-way
    # the server kept the previous object and its record, whole; nothing else was left behind
    assert store.cat(path) == good
    assert json.loads(store.cat(path + ".json"))["sha256"] == hashlib.sha256(good).hexdigest()
    assert store.keys() == [key, key + ".json"]


@pytest.mark.timeout(120)
def test_a_failed_record_write_keeps_the_saved_object_and_says_it_loads_unverified(store, real_cache_bytes, messages):
    template = store.template()
    path = placement().resolve(template)
    store.proxy.cut = path.removeprefix(store.root + "/") + ".json"
    stats = cache.save(path, real_cache_bytes, placement=placement())
    assert stats.saved and store.cat(path) == real_cache_bytes
    (told,) = messages.warnings
    assert f"Saved the kernel cache to {path}, but not its record" in told
    store.proxy.cut = None
    assert cache.load(template, placement())[1].source == "unverified"


@pytest.mark.timeout(120)
def test_loading_while_the_server_is_unreachable_is_cold_with_a_message(store, real_cache_bytes, messages):
    template = store.template()
    cache.save(placement().resolve(template), real_cache_bytes, placement=placement())
    store.proxy.refuse = True
    store.proxy.close()
    data, stats = cache.load(template, placement())
    assert (data, stats.source) == (None, "cold")
    (told,) = messages.warnings
    assert "could not be read" in told and "running with a cold cache" in told


@pytest.mark.timeout(120)
def test_a_bad_object_is_copied_aside_left_in_place_and_replaced_by_the_next_save(store, real_cache_bytes, messages):
    """No lock spans the hosts writing to a store and a move there is a copy plus a delete, which could
    delete a good object another host just wrote: the bad object is copied aside, never deleted."""
    template = store.template()
    path = placement().resolve(template)
    key = path.removeprefix(store.root + "/")
    bad = real_cache_bytes[:5000]
    store.put(path, bad)
    data, stats = cache.load(template, placement())
    assert (data, stats.source) == (None, "corrupt")
    (told,) = messages.warnings
    assert f"Kernel cache {path} is unusable (truncated or padded" in told
    assert f"copied to {path}.corrupt and left in place" in told
    assert store.cat(path + ".corrupt") == bad and store.cat(path) == bad
    assert not [w for w in store.proxy.writes(store.bucket) if w.startswith("DELETE")]

    assert cache.save(path, real_cache_bytes, stats, placement()).saved
    assert store.cat(path) == real_cache_bytes
    assert len(messages.warnings) == 1  # the run replaced what it loaded: no "changed" message
    assert store.keys() == [key, key + ".corrupt", key + ".json"]
    assert cache.load(template, placement())[1].source == "warm"
