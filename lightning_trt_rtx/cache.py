"""Where kernel caches live and how they are read and written.

A cache path is a template, resolved per process::

    ~/.cache/lightning-trt-rtx/{sm}-trtrtx{trt}-cuda{cuda}/gpu-{gpu}.bin   (the default)

A TensorRT-RTX runtime cache is bound to the physical GPU that filled it and to the device number
the process saw it as (measured on 2 x H100 and 2 x H200: a file from the other GPU of the same
model, or from the same GPU under another ``cuda:N``, gives a cold start), so the default keys the
file by both (``{gpu}``: the UUID's first 8 hex digits, ``-N`` added for ``cuda:N`` with N > 0), not
by rank: a rank that lands on another GPU next time, or two jobs on two GPUs of one host, each find
their own GPU's kernels. The directory key (GPU architecture,
TensorRT-RTX and CUDA versions) means a cache is never offered to a library it cannot serve.

Files are TensorRT-RTX ``IRuntimeCache`` bytes. Beside each, ``<file>.json`` records which GPU
(and device number) filled it (with the file's size and SHA-256, so a stale record never vouches for other bytes).
Files are checked before TensorRT sees them. Local files are written under a lock to a temporary
file that is atomically moved into place; on object stores (s3, gs, az, ..., where a move is a copy
plus a delete and no lock spans hosts) the final object is written whole in one request, which the
store makes visible complete or not at all. A save that fails (crash, full disk, read-only
directory, lost connection) leaves the last good file untouched and never raises; a save over a
file another writer saved since this run loaded it still goes through and names that writer.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import io
import json
import logging
import math
import os
import socket
import stat
import string
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
from filelock import FileLock

from lightning_trt_rtx._messages import warn

log = logging.getLogger(__name__)

PLACEHOLDERS = ("gpu", "rank", "local_rank", "node_rank", "world_size", "sm", "trt", "cuda", "host")
# Placeholders that differ between the processes of one job; the others form the cache key.
PROCESS_PLACEHOLDERS = ("gpu", "rank", "local_rank", "node_rank", "world_size", "host")
CACHE_DIR_ENV = "LIGHTNING_TRT_RTX_CACHE_DIR"
LOCK_TIMEOUT_S = 60.0
RECORD_SUFFIX = ".json"
RECORD_FORMAT = "lightning-trt-rtx/cache-record/1"
SIDE_SUFFIXES = (".corrupt", ".tmp", ".lock", RECORD_SUFFIX)  # files beside a cache that are not caches
# fsspec protocols of object stores: an object is written whole (visible complete or not at all), a
# move is a copy and a delete (twice the bytes, not atomic), and no lock spans the hosts that write.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "tos", "tosfs"})

# TensorRT-RTX runtime-cache archive header, learned from cache bytes produced on an H200 with
# TensorRT-RTX 1.6.1: a magic tag, then the little-endian uint64 size of what follows the 20-byte
# header. TensorRT's own check rejects a wrong tag ("Magic tag does not match") or size ("Size
# specified in header does not match archive size"); it does not checksum the body.
MAGIC = b"ptrt"
HEADER_LEN = 20

# What a run loaded, and whether its kernels apply to this GPU:
#   warm       its own file, recorded as filled on this GPU
#   seeded     another file under the same key, recorded as filled on this GPU
#   other-gpu  its own file, filled on another GPU: loaded, but expect a cold start
#   unverified its own file with no valid record of its GPU (older version, copied without its record)
#   cold       nothing to load;  corrupt: the file was unusable and moved aside
Source = Literal["warm", "seeded", "other-gpu", "unverified", "cold", "corrupt"]
APPLIES = {"warm": "yes", "seeded": "yes", "other-gpu": "no", "unverified": "unknown", "cold": "-", "corrupt": "-"}


def default_cache_dir() -> str:
    """``$LIGHTNING_TRT_RTX_CACHE_DIR``, else ``$XDG_CACHE_HOME/lightning-trt-rtx``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightning-trt-rtx")


def default_template(shared_gpu: bool = False) -> str:
    """One file per physical GPU; ``shared_gpu``: several ranks of one job on one GPU, one file each."""
    template = os.path.join(default_cache_dir(), "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}.bin")
    return one_per_rank(template) if shared_gpu else template


def one_per_rank(template: str) -> str:
    """``.../gpu-{gpu}.bin`` -> ``.../gpu-{gpu}-rank{rank}.bin``: for ranks of one job that share a GPU."""
    head, sep, name = template.rpartition("/")
    stem, ext = os.path.splitext(name)
    return f"{head}{sep}{stem}-rank{{rank}}{ext}"


# --- the GPU this process runs on -----------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """A physical GPU, and the device number (``cuda:N``) this process sees it as.

    Measured on 2 x H200 (TensorRT-RTX 1.6.1): a runtime cache applies only on the GPU that filled it
    *and* under the same device number. The same GPU filled as ``cuda:1`` and used as ``cuda:0``
    (``CUDA_VISIBLE_DEVICES=1``) ran a conv net's first execute in 293 ms, as cold (276 ms), against
    19 ms at the same number. So both are the cache's identity.
    """

    uuid: str = ""  # e.g. "3b6d1a2c-5e2f-...", empty on a host without CUDA
    name: str = ""
    sm: str = "cpu"
    ordinal: int = 0

    @property
    def id(self) -> str:
        """The ``{gpu}`` placeholder: the UUID's first 8 hex digits (as ``nvidia-smi -L`` starts it),
        with ``-N`` added when the process sees the GPU as ``cuda:N`` for an N above 0."""
        if not self.uuid:
            return "cpu"
        short = self.uuid.replace("-", "")[:8]
        return f"{short}-{self.ordinal}" if self.ordinal else short

    def same(self, uuid: str, ordinal: int) -> bool:
        """Whether kernels filled on GPU ``uuid`` as ``cuda:ordinal`` apply here."""
        return bool(self.uuid) and uuid == self.uuid and ordinal == self.ordinal


def current_device() -> int | None:
    """This process's current CUDA device number (``torch.cuda.current_device()``), None without CUDA."""
    import torch

    return torch.cuda.current_device() if torch.cuda.is_available() else None


def gpu_at(ordinal: int) -> Gpu:
    """The physical GPU this process sees as ``cuda:ordinal``."""
    import torch

    props = torch.cuda.get_device_properties(ordinal)
    uuid = str(getattr(props, "uuid", "") or "").lower()
    uuid = uuid[4:] if uuid.startswith("gpu-") else uuid
    return Gpu(uuid=uuid, name=props.name, sm=f"sm{props.major}{props.minor}", ordinal=ordinal)


def current_gpu() -> Gpu:
    """The physical GPU of this process's current CUDA device (``Gpu()`` where there is none)."""
    device = current_device()
    return Gpu() if device is None else gpu_at(device)


def visible_gpus() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- templates ------------------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    """The placeholders a template uses; ValueError for unknown ones or malformed braces."""
    if not isinstance(template, str):
        raise TypeError(f"A cache path template must be a str, got {type(template).__name__}.")
    if not template.strip():
        raise ValueError("A cache path template must not be empty; pass None to run without a cache.")
    if "\x00" in template:  # no filesystem accepts it; os calls would raise ValueError at save time
        raise ValueError(f"A cache path template must not contain a NUL character: {template!r}.")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"Malformed cache path template {template!r} ({err}); write literal braces as '{{{{' and '}}}}'."
            f" Valid placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}."
        ) from None
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS or spec or conversion:
            raise ValueError(
                f"Unknown placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                f" in cache path template {template!r}."
                f" Valid placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}."
            )
        fields.append(name)
    protocol = fsspec.core.split_protocol(template)[0]
    if protocol is not None and any(p not in fsspec.available_protocols() for p in protocol.split("::")):
        # else every load and save of the job would fail on it, far from where it was configured
        raise ValueError(
            f"Unknown filesystem protocol {protocol!r} in cache path template {template!r}."
            f" Valid protocols (fsspec): {', '.join(sorted(fsspec.available_protocols()))}."
        )
    # a directory: the run would load nothing and fail to save at its end
    local_dir = (
        protocol in (None, "file")
        and not fields
        and os.path.isdir(os.path.expanduser(fsspec.core.split_protocol(template.format())[1]))
    )
    if template.endswith(("/", os.sep)) or local_dir:
        raise ValueError(
            f"Cache path template {template!r} names a directory: it must name a file, e.g."
            f" {os.path.join(template.rstrip('/' + os.sep) or '.', 'gpu-{gpu}.bin')!r}."
        )
    return fields


def is_per_rank(template: str) -> bool:
    """Whether every rank of a job gets its own file: the template names ``{rank}``, or names
    ``{local_rank}`` together with ``{node_rank}`` or ``{host}``."""
    fields = set(template_fields(template))
    return "rank" in fields or ("local_rank" in fields and bool(fields & {"node_rank", "host"}))


def is_per_process(template: str) -> bool:
    """Whether processes on different GPUs or ranks get different files (so there are siblings to seed from)."""
    return bool(set(template_fields(template)) & set(PROCESS_PLACEHOLDERS))


@dataclass(frozen=True)
class Placement:
    """The values a template is resolved with: who this process is and what it runs on."""

    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    sm: str = "cpu"
    trt: str = "none"
    cuda: str = "none"
    host: str = field(default_factory=socket.gethostname)
    gpu: Gpu = field(default_factory=Gpu)

    @classmethod
    def current(
        cls, rank: int = 0, local_rank: int = 0, node_rank: int = 0, world_size: int = 1, gpu: Gpu | None = None
    ) -> Placement:
        """This process on ``gpu`` (default: its current CUDA device; ``sm`` and ``gpu`` are ``cpu`` without one)."""
        import torch

        from lightning_trt_rtx import _backend

        gpu = gpu if gpu is not None else current_gpu()
        return cls(
            rank=rank,
            local_rank=local_rank,
            node_rank=node_rank,
            world_size=world_size,
            sm=gpu.sm,
            trt=_backend.trt_version() or "none",
            cuda=torch.version.cuda or "none",
            gpu=gpu,
        )

    def values(self) -> dict[str, Any]:
        """Placeholder name -> value."""
        values = {name: getattr(self, name) for name in PLACEHOLDERS if name != "gpu"}
        values["gpu"] = self.gpu.id
        return values

    def resolve(self, template: str) -> str:
        template_fields(template)
        return os.path.expanduser(template.format(**self.values()))

    def siblings_pattern(self, template: str) -> str:
        """A glob matching every process's file under this placement's key (process placeholders -> ``*``)."""
        template_fields(template)
        values = self.values()
        pattern = ""
        for literal, name, _, _ in string.Formatter().parse(template):
            if not pattern and literal.startswith("~") and ("/" in literal or name is None):
                literal = os.path.expanduser(literal)  # "~/" or "~user/" as resolve() expands it
            # the template's own text is escaped too: a directory named "run[1]" is not a glob class
            pattern += glob.escape(literal)
            if name is not None:
                if name not in PROCESS_PLACEHOLDERS:
                    pattern += glob.escape(str(values[name]))
                elif not pattern.endswith("*"):  # "{rank}{local_rank}": one "*" ("**" means directories)
                    pattern += "*"
        return pattern


# --- file checks ----------------------------------------------------------------------------------


def check_bytes(data: bytes) -> str | None:
    """Why these bytes are not a loadable TensorRT-RTX runtime cache, or None if they are."""
    if not data:
        return "empty file"
    if len(data) < HEADER_LEN:
        return f"truncated: {len(data)} bytes is shorter than the {HEADER_LEN}-byte header"
    if data[: len(MAGIC)] != MAGIC:
        return "not a TensorRT-RTX runtime cache (magic tag does not match)"
    (size,) = struct.unpack_from("<Q", data, 8)
    if size != len(data) - HEADER_LEN:
        return f"truncated or padded: header says {size + HEADER_LEN} bytes, file has {len(data)}"
    return None


# --- which GPU filled a file ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """``<file>.json``: who filled a cache file, valid only for the bytes it describes."""

    gpu_uuid: str
    gpu_name: str
    sm: str
    trt: str
    cuda: str
    host: str
    pid: int
    saved_unix: float
    bytes: int
    sha256: str
    format: str = RECORD_FORMAT
    ordinal: int = 0  # the device number the filling process saw the GPU as
    rank: int = 0  # the writer's global rank

    @property
    def gpu_id(self) -> str:
        return Gpu(uuid=self.gpu_uuid, ordinal=self.ordinal).id

    def describe(self) -> str:
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.saved_unix))
        except (OverflowError, OSError, ValueError):  # a time the platform cannot show (e.g. 1e20)
            when = "an unknown time"
        where = f"GPU {self.gpu_id} ({self.gpu_name or 'unknown model'}, as cuda:{self.ordinal})"
        return f"{where} on {self.host}, rank {self.rank}, pid {self.pid}, at {when}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_record(path: str, data: bytes | None = None) -> Record | None:
    """The record beside ``path`` if it describes exactly ``data`` (read from ``path`` if not given)."""
    try:
        fs, inner, _ = _fs(path)
        fs.invalidate_cache(inner + RECORD_SUFFIX)  # a listing cached by this process predates other writers
        if not fs.isfile(inner + RECORD_SUFFIX):
            return None
        values = json.loads(fs.cat_file(inner + RECORD_SUFFIX))
        known = {f.name for f in dataclasses.fields(Record)}  # a later version may add fields
        record = Record(**{k: v for k, v in values.items() if k in known})
        if record.format != RECORD_FORMAT or not _well_typed(record):
            return None
        if data is None:
            data = fs.cat_file(inner)
    except Exception:  # missing, unreadable, not JSON, other keys: no record
        return None
    if record.bytes != len(data) or record.sha256 != _digest(data):
        return None  # a stale record (the file was replaced without it): it vouches for nothing
    return record


def _well_typed(record: Record) -> bool:
    """Whether every field holds the type it is declared with (another tool or version may write others)."""
    numbers = (record.pid, record.bytes, record.ordinal, record.rank)
    texts = (record.gpu_uuid, record.gpu_name, record.sm, record.trt, record.cuda, record.host, record.sha256)
    return (
        all(type(n) is int for n in numbers)
        and all(isinstance(t, str) for t in texts)
        and type(record.saved_unix) in (int, float)
        and math.isfinite(record.saved_unix)
    )


def _new_record(data: bytes, placement: Placement) -> Record:
    return Record(
        gpu_uuid=placement.gpu.uuid,
        gpu_name=placement.gpu.name,
        sm=placement.sm,
        trt=placement.trt,
        cuda=placement.cuda,
        host=placement.host,
        pid=os.getpid(),
        saved_unix=time.time(),
        bytes=len(data),
        sha256=_digest(data),
        ordinal=placement.gpu.ordinal,
        rank=placement.rank,
    )


# --- load and save --------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What happened to one cache file in one run."""

    path: str = ""
    source: Source = "cold"
    loaded_from: str = ""
    filled_on: str = ""  # the GPU that filled what was loaded, from its record ("" if unknown)
    load_bytes: int = 0
    load_ms: float = 0.0
    save_bytes: int = 0
    save_ms: float = 0.0
    saved: bool = False
    save_error: str = ""
    disk_state: tuple = ()  # the own file's _disk_state() when loaded: () absent, for "changed since"
    unreadable: str = ""  # why the own file could not be read when loaded ("" if it was read, or absent)

    def __post_init__(self) -> None:
        self.disk_state = tuple(self.disk_state)  # a list after a JSON round trip (figures gathered as dicts)

    @property
    def applies(self) -> str:
        """Whether the loaded kernels apply to this GPU: ``yes``, ``no``, ``unknown`` or ``-`` (none loaded)."""
        return APPLIES[self.source]


def _fs(path: str) -> tuple[Any, str, bool]:
    """(filesystem, path within it, is_local) for a local path or an fsspec URL."""
    fs, inner = fsspec.core.url_to_fs(path)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return fs, inner, local


def _is_object_store(fs: Any) -> bool:
    """Whether ``fs`` is an object store (see ``OBJECT_STORES``): saves there write the final object whole."""
    return bool(OBJECT_STORES.intersection(fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)))


def _read(path: str) -> bytes | None:
    """The file's bytes; None where nothing is there. Any other failure raises: the file may be there."""
    fs, inner, local = _fs(path)
    try:
        if local:  # os.stat, not isfile(): an I/O error (EIO, ESTALE) is not an absent file
            mode = os.stat(inner).st_mode
            if stat.S_ISDIR(mode):  # a template whose placeholders resolved to a directory: no save either
                raise IsADirectoryError(errno.EISDIR, "a directory, not a file: name a file in the template", inner)
            return fs.cat_file(inner) if stat.S_ISREG(mode) else None
        fs.invalidate_cache(inner)  # a listing cached by this process predates other writers' saves
        if not fs.isfile(inner):  # False also for a store it cannot reach: info() raises why
            fs.info(inner)  # FileNotFoundError where there is no such object
            return None
        return fs.cat_file(inner)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _absent(path: str) -> bool:
    """Whether nothing is at ``path``; False where asking failed otherwise (something may be there)."""
    try:
        fs, inner, local = _fs(path)
        if local:
            os.stat(inner)
        else:
            fs.invalidate_cache(inner)
            fs.info(inner)
        return False
    except (FileNotFoundError, NotADirectoryError):
        return True
    except Exception:
        return False


# what identifies one stored version of an object, in the order fsspec backends give it
_VERSION_KEYS = ("ETag", "etag", "generation", "VersionId", "version_id", "LastModified", "mtime", "updated", "created")


def _disk_state(path: str) -> tuple:
    """What "changed since this run loaded it" compares: (size, mtime_ns) of a local file; (size,
    version) of an object at a URL, the version being its ETag (or the backend's generation or
    modification time; else the SHA-256 of its bytes). () if absent or unreadable."""
    try:
        fs, inner, local = _fs(path)
        if local:
            st = os.stat(inner)
            return (st.st_size, st.st_mtime_ns)
        fs.invalidate_cache(inner)  # ask the store, not this process's cached listing
        info = fs.info(inner)
        if info.get("type") != "file":
            return ()
        version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k)), "")
        return (int(info.get("size") or 0), version or _digest(fs.cat_file(inner)))
    except Exception:  # absent, an unreadable path, a missing fsspec backend: nothing to compare
        return ()


def _locked(path: str) -> Any:
    """The lock every writer and the quarantine take for ``path`` (a no-op for fsspec URLs)."""
    import contextlib

    fs, inner, local = _fs(path)
    if not local:
        return contextlib.nullcontext()
    os.makedirs(os.path.dirname(inner) or ".", exist_ok=True)
    return FileLock(inner + ".lock", timeout=LOCK_TIMEOUT_S)


def quarantine(path: str, reason: str, rank: int = 0) -> bool:
    """Move a bad file aside to ``<path>.corrupt`` so the run continues cold.

    Under the file's lock the file is read and checked again first: a good file another process
    saved since this run read the bad one is never moved. Returns False only in that case. On an
    object store, where no lock spans the writers and a move is a copy plus a delete, the bad object
    is copied aside and left in place (the delete could remove a good object another host just
    wrote); this run's save replaces it.
    """
    try:
        with _locked(path):
            data = _read(path)
            if data is None or check_bytes(data) is None:
                log.debug("Kernel cache %s was replaced by a valid file before quarantine: kept", path)
                return False
            fs, inner, _ = _fs(path)
            if _is_object_store(fs):
                fs.pipe_file(inner + ".corrupt", data)
                moved = f"copied to {path}.corrupt and left in place (this run's save replaces it)"
            else:
                fs.mv(inner, inner + ".corrupt")
                moved = f"moved aside to {path}.corrupt"
    except Exception as err:
        moved = f"could not move it aside ({err}); it will be replaced at the next save"
    warn(f"Kernel cache {path} is unusable ({reason}); {moved}. Running with a cold cache.", rank=rank)
    return True


def load(template: str, placement: Placement) -> tuple[bytes | None, CacheStats]:
    """Read this process's cache: its own file if this GPU filled it, else a file under the same key
    that this GPU filled, else its own file from another or an unknown GPU, else cold."""
    start = time.perf_counter()
    path = placement.resolve(template)
    stats = CacheStats(path=path, disk_state=_disk_state(path))
    own = _read_checked(path, stats, placement.rank)
    gpu = placement.gpu.uuid
    data: bytes | None = None
    if own is not None:
        record = read_record(path, own)
        stats.filled_on = record.describe() if record else ""
        if record is not None and placement.gpu.same(record.gpu_uuid, record.ordinal):
            data, stats.source = own, "warm"
        else:
            stats.source = "other-gpu" if record is not None and record.gpu_uuid and gpu else "unverified"
    if data is None and gpu and stats.source != "corrupt" and is_per_process(template):
        data = _seed(template, placement, path, stats)
    if data is None and own is not None:
        data = own  # its kernels may not apply, but loading it costs little and never hurts (measured)
    if data is not None:
        stats.load_bytes = len(data)
        stats.loaded_from = stats.loaded_from or path
    stats.load_ms = (time.perf_counter() - start) * 1e3
    if stats.source == "other-gpu":
        warn(
            f"Kernel cache {path} was filled on another GPU ({stats.filled_on}); this process runs on GPU"
            f" {placement.gpu.id} ({placement.gpu.name}, as cuda:{placement.gpu.ordinal}). Kernels apply only on"
            " the GPU that compiled them, under the same device number, so this run starts cold, and its save"
            " replaces that GPU's kernels. Name {gpu} in the template (the default does) to keep one file per"
            " GPU and device number.",
            rank=placement.rank,
        )
    return data, stats


def _read_checked(path: str, stats: CacheStats, rank: int) -> bytes | None:
    try:
        data = _read(path)
    except Exception as err:  # any backend's failure (OSError, a missing fsspec backend, ...) reads as no file
        stats.unreadable = f"{type(err).__name__}: {err}"
        warn(f"Kernel cache {path} could not be read ({err}); running with a cold cache.", rank=rank)
        return None
    if data is None:
        return None
    problem = check_bytes(data)
    if problem:
        if quarantine(path, problem, rank):
            stats.source = "corrupt"
            return None
        stats.disk_state = _disk_state(path)  # what this run loads now, for "changed since"
        data = _read(path)  # another process saved a good file since: use it
        return data if data is not None and check_bytes(data) is None else None
    return data


def _size_or_zero(fs: Any, path: str) -> int:
    try:  # a dangling symlink or a file removed since the glob must not stop seeding from the others
        return fs.size(path) or 0
    except Exception:
        return 0


def _seed(template: str, placement: Placement, own: str, stats: CacheStats) -> bytes | None:
    """The largest valid file under the same key that this GPU filled (per its record)."""
    pattern = placement.siblings_pattern(template)
    try:
        fs, inner, local = _fs(pattern)
        own_inner = _fs(own)[1]
        if local:  # fsspec's glob matches nothing through "a//b" or "a/x/../b": compare normalized paths
            inner, own_inner = os.path.normpath(inner), os.path.normpath(own_inner)
        candidates = [c for c in fs.glob(inner) if c != own_inner and not c.endswith(SIDE_SUFFIXES)]
        candidates.sort(key=lambda c: _size_or_zero(fs, c), reverse=True)
    except Exception:  # a pattern or a filesystem that cannot be listed: nothing to seed from
        return None
    for candidate in candidates:
        try:
            data = fs.cat_file(candidate)
        except Exception:
            continue
        if check_bytes(data) is not None:
            continue
        url = fs.unstrip_protocol(candidate)
        url = candidate if url.startswith("file://") else url
        record = read_record(url, data)
        if record is not None and placement.gpu.same(record.gpu_uuid, record.ordinal):
            stats.source, stats.loaded_from, stats.filled_on = "seeded", url, record.describe()
            return data
    return None


def save(path: str, data: bytes, stats: CacheStats | None = None, placement: Placement | None = None) -> CacheStats:
    """Atomically replace ``path`` with ``data`` and its record; never raises, never destroys the last good file.

    Empty or invalid bytes are not written (an empty cache never overwrites a non-empty one). Local
    files are written under ``<path>.lock`` to ``<path>.tmp``, flushed to disk, then renamed over
    ``path``; on object stores (``OBJECT_STORES``) the final object is written whole in one request
    (the store shows the old or the new object, never a mix); other fsspec URLs are written to
    ``<path>.tmp`` and moved. If the file changed since ``stats`` loaded it (another process saved
    meanwhile), this save still replaces it (caches cannot be merged) and names the other writer
    from its record. A file the run could not read when it loaded (``stats.unreadable``) is not replaced
    while it is still there: its kernels may be better than a cold run's. Failures warn once and are
    recorded in the returned stats; an interrupt (Ctrl-C) warns what it left on disk and goes on up.
    """
    loaded = stats is not None  # only a run that loaded the file can say whether it changed since
    stats = stats if stats is not None else CacheStats(path=path)
    placement = placement if placement is not None else Placement()
    stats.saved, stats.save_bytes, stats.save_error = False, 0, ""  # this save's outcome only
    start = time.perf_counter()
    problem = check_bytes(data)
    if problem:
        stats.save_error = f"nothing to save ({problem})"
        log.debug("Not saving kernel cache %s: %s", path, problem)
        return stats
    record = json.dumps(asdict(_new_record(data, placement)), indent=1).encode()
    try:
        fs, inner, local = _fs(path)
        with _locked(path):
            if loaded and stats.unreadable and not _absent(path):
                stats.save_error = f"not replacing a file this run could not read ({stats.unreadable})"
                warn(
                    f"Not saving the kernel cache over {path}: it could not be read when this run started"
                    f" ({stats.unreadable}), so the run went cold and its kernels may be fewer than the file's."
                    " Make the file readable (or remove it) and the next run loads or replaces it.",
                    rank=placement.rank,
                )
                return stats
            if loaded:
                _warn_if_changed(path, stats, placement.rank)
            _write(fs, inner, local, data)
            stats.saved, stats.save_bytes = True, len(data)
            _write(fs, inner + RECORD_SUFFIX, local, record)
    except Exception as err:  # any backend's failure (OSError, a lock Timeout, botocore, ...) is a failed save
        stats.save_error = f"{type(err).__name__}: {err}"
        if stats.saved:  # the kernels are on disk; only the record of their GPU is missing
            warn(
                f"Saved the kernel cache to {path}, but not its record {path}{RECORD_SUFFIX} ({stats.save_error}):"
                " the next run loads it as unverified.",
                rank=placement.rank,
            )
        else:
            warn(
                f"Could not save the kernel cache to {path} ({stats.save_error}). The run goes on;"
                " the previous cache file, if any, is untouched.",
                rank=placement.rank,
            )
    except BaseException as err:  # Ctrl-C or SystemExit mid-save: say what is on disk, then let it go on up
        stats.save_error = f"interrupted ({type(err).__name__})"
        left = (
            "the new kernels are saved, without their record (the next run loads them as unverified)"
            if stats.saved
            else "the previous cache file, if any, is untouched"
        )
        warn(f"Saving the kernel cache to {path} was interrupted ({type(err).__name__}): {left}.", rank=placement.rank)
        raise
    if stats.saved:
        stats.disk_state = _disk_state(path)
    stats.save_ms = (time.perf_counter() - start) * 1e3
    return stats


def _write(fs: Any, inner: str, local: bool, data: bytes) -> None:
    """Replace one file atomically: a local temp file fsynced and renamed, an object written whole, or
    an fsspec temp file moved."""
    if local:
        _write_local(inner, data)
    elif _is_object_store(fs):  # one PUT: no directories to make, no copy, no temp object to leave behind
        fs.pipe_file(inner, data)
    else:
        fs.makedirs(fs._parent(inner), exist_ok=True)
        fs.pipe_file(inner + ".tmp", data)
        fs.mv(inner + ".tmp", inner)


def _warn_if_changed(path: str, stats: CacheStats, rank: int) -> None:
    # Local files: checked under the lock the writer holds. Object stores: no lock, so a save landing
    # between this check and this save's own write goes unseen (the write itself stays whole).
    now = _disk_state(path)
    if now and now != stats.disk_state:
        record = read_record(path)
        by = record.describe() if record else "a writer that left no record"
        where = "on disk" if _fs(path)[2] else "in its store"
        warn(
            f"Kernel cache {path} changed {where} since this run loaded it (saved by {by}). Saving this"
            " run's kernels over it: caches cannot be merged, so the other writer's new kernels are lost."
            " Give each concurrent job on one GPU its own file (e.g. a template with {host} or a job name).",
            rank=rank,
        )


def _write_local(path: str, data: bytes) -> None:
    """Write ``<path>.tmp``, fsync, rename over ``path`` (caller holds the lock)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a failed write (ENOSPC, EROFS, Ctrl-C) must not leave a half file for the next run to trip on
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --- one run's handle -----------------------------------------------------------------------------


class RunCache:
    """One ``RuntimeCache`` handle for one run, shared by every engine the run serves.

    Upstream gives each engine its own implicit handle on one file, so engines overwrite each
    other's kernels at save; one handle pools them. Each run opens its own, so it reads what is on
    disk now (another process may have saved since the last run) and its figures are its own.
    """

    def __init__(self, template: str, placement: Placement) -> None:
        from lightning_trt_rtx import _backend

        self.template = template
        self.placement = placement
        self.path = placement.resolve(template)
        self.handle = _backend.new_cache_handle()
        data, self.stats = load(template, placement)
        if data:
            self.handle.load_from_stream(io.BytesIO(data))

    def serialize(self) -> bytes:
        buffer = io.BytesIO()
        self.handle.save_to_stream(buffer)
        return buffer.getvalue()

    def save(self) -> CacheStats:
        """Write the handle's kernels to this process's file (see :func:`save`); never raises."""
        try:
            data = self.serialize()
        except Exception as err:  # a broken handle must not take the user's run down
            self.stats.save_error = f"could not serialize the cache: {err}"
            warn(f"Kernel cache {self.path} not saved: {self.stats.save_error}", rank=self.placement.rank)
            return self.stats
        return save(self.path, data, self.stats, self.placement)
