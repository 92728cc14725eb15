"""Where kernel caches live and how they are read and written.

A cache path is a template, resolved per process::

    ~/.cache/lightning-trt-rtx/{sm}-trtrtx{trt}-cuda{cuda}/rank{rank}.bin   (the default)

One file per global rank means ranks never race; the directory key (GPU architecture, TensorRT-RTX
and CUDA versions) means a cache is never offered to a GPU or library it cannot serve.

Files are TensorRT-RTX ``IRuntimeCache`` bytes. They are checked before TensorRT sees them,
written under a lock to a temporary file that is atomically moved into place, and a save that fails
(crash, full disk, read-only directory) leaves the last good file untouched and never raises.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import string
import struct
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import fsspec
from filelock import FileLock

log = logging.getLogger(__name__)

PLACEHOLDERS = ("rank", "local_rank", "node_rank", "world_size", "sm", "trt", "cuda", "host")
# Placeholders that differ between the ranks of one job; the others form the cache key.
RANK_PLACEHOLDERS = ("rank", "local_rank", "node_rank", "world_size", "host")
CACHE_DIR_ENV = "LIGHTNING_TRT_RTX_CACHE_DIR"
LOCK_TIMEOUT_S = 60.0

# TensorRT-RTX runtime-cache archive header, learned from cache bytes produced on an H200 with
# TensorRT-RTX 1.6.1: a magic tag, then the little-endian uint64 size of what follows the 20-byte
# header. TensorRT's own check rejects a wrong tag ("Magic tag does not match") or size ("Size
# specified in header does not match archive size"); it does not checksum the body.
MAGIC = b"ptrt"
HEADER_LEN = 20

Source = Literal["own", "seeded", "cold", "corrupt"]


def default_cache_dir() -> str:
    """``$LIGHTNING_TRT_RTX_CACHE_DIR``, else ``$XDG_CACHE_HOME/lightning-trt-rtx``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightning-trt-rtx")


def default_template() -> str:
    return os.path.join(default_cache_dir(), "{sm}-trtrtx{trt}-cuda{cuda}", "rank{rank}.bin")


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
    return fields


def is_per_rank(template: str) -> bool:
    """Whether every rank of a job gets its own file: the template names ``{rank}``, or names
    ``{local_rank}`` together with ``{node_rank}`` or ``{host}``."""
    fields = set(template_fields(template))
    return "rank" in fields or ("local_rank" in fields and bool(fields & {"node_rank", "host"}))


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

    @classmethod
    def current(cls, rank: int = 0, local_rank: int = 0, node_rank: int = 0, world_size: int = 1) -> "Placement":
        """This process on its current CUDA device (``sm`` is ``cpu`` where there is none)."""
        import torch

        from lightning_trt_rtx import _backend

        sm = "cpu"
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            sm = f"sm{major}{minor}"
        return cls(
            rank=rank,
            local_rank=local_rank,
            node_rank=node_rank,
            world_size=world_size,
            sm=sm,
            trt=_backend.trt_version() or "none",
            cuda=torch.version.cuda or "none",
        )

    def resolve(self, template: str) -> str:
        template_fields(template)
        return os.path.expanduser(template.format(**asdict(self)))

    def siblings_pattern(self, template: str) -> str:
        """A glob matching every rank's file under this placement's key (rank placeholders -> ``*``)."""
        template_fields(template)
        values = asdict(self)
        pattern = ""
        for literal, name, _, _ in string.Formatter().parse(template):
            if not pattern and literal.startswith("~") and ("/" in literal or name is None):
                literal = os.path.expanduser(literal)  # "~/" or "~user/" as resolve() expands it
            # the template's own text is escaped too: a directory named "run[1]" is not a glob class
            pattern += glob.escape(literal)
            if name is not None:
                if name not in RANK_PLACEHOLDERS:
                    pattern += glob.escape(str(values[name]))
                elif not pattern.endswith("*"):  # "{rank}{local_rank}": one "*" ("**" means directories)
                    pattern += "*"
        return pattern


# --- file checks ----------------------------------------------------------------------------------


def check_bytes(data: bytes) -> Optional[str]:
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


# --- load and save --------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What happened to one cache file in one process."""

    path: str = ""
    source: Source = "cold"
    loaded_from: str = ""
    load_bytes: int = 0
    load_ms: float = 0.0
    save_bytes: int = 0
    save_ms: float = 0.0
    saved: bool = False
    save_error: str = ""


def _fs(path: str) -> tuple[Any, str, bool]:
    """(filesystem, path within it, is_local) for a local path or an fsspec URL."""
    fs, inner = fsspec.core.url_to_fs(path)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return fs, inner, local


def _read(path: str) -> Optional[bytes]:
    fs, inner, _ = _fs(path)
    try:
        if not fs.isfile(inner):
            return None
        return fs.cat_file(inner)
    except FileNotFoundError:
        return None


def quarantine(path: str, reason: str) -> str:
    """Move a bad file aside to ``<path>.corrupt`` (one warning) so the run continues cold."""
    aside = path + ".corrupt"
    try:
        fs, inner, _ = _fs(path)
        fs.mv(inner, inner + ".corrupt")
        moved = f"moved aside to {aside}"
    except Exception as err:
        moved = f"could not move it aside ({err}); it will be replaced at the next save"
    warnings.warn(f"Kernel cache {path} is unusable ({reason}); {moved}. Running with a cold cache.", stacklevel=2)
    return aside


def load(template: str, placement: Placement) -> tuple[Optional[bytes], CacheStats]:
    """Read this rank's cache: its own file, else a sibling rank's under the same key, else cold."""
    start = time.perf_counter()
    path = placement.resolve(template)
    stats = CacheStats(path=path)
    data = _read_checked(path, stats)
    if data is None and stats.source == "cold" and is_per_rank(template):
        data = _seed(template, placement, path, stats)
    stats.load_ms = (time.perf_counter() - start) * 1e3
    return data, stats


def _read_checked(path: str, stats: CacheStats) -> Optional[bytes]:
    try:
        data = _read(path)
    except Exception as err:  # any backend's failure (OSError, a missing fsspec backend, ...) reads as no file
        warnings.warn(f"Kernel cache {path} could not be read ({err}); running with a cold cache.", stacklevel=3)
        return None
    if data is None:
        return None
    problem = check_bytes(data)
    if problem:
        quarantine(path, problem)
        stats.source = "corrupt"
        return None
    stats.source, stats.loaded_from, stats.load_bytes = "own", path, len(data)
    return data


def _size_or_zero(fs: Any, path: str) -> int:
    try:  # a dangling symlink or a file removed since the glob must not stop seeding from the others
        return fs.size(path) or 0
    except Exception:
        return 0


def _seed(template: str, placement: Placement, own: str, stats: CacheStats) -> Optional[bytes]:
    """The largest valid sibling file: a job that grows from 4 to 8 ranks starts warm everywhere."""
    pattern = placement.siblings_pattern(template)
    try:
        fs, inner, local = _fs(pattern)
        own_inner = _fs(own)[1]
        if local:  # fsspec's glob matches nothing through "a//b" or "a/x/../b": compare normalized paths
            inner, own_inner = os.path.normpath(inner), os.path.normpath(own_inner)
        candidates = [c for c in fs.glob(inner) if c != own_inner and not c.endswith((".corrupt", ".tmp", ".lock"))]
        candidates.sort(key=lambda c: _size_or_zero(fs, c), reverse=True)
    except Exception:  # a pattern or a filesystem that cannot be listed: nothing to seed from
        return None
    for candidate in candidates:
        try:
            data = fs.cat_file(candidate)
        except Exception:
            continue
        if check_bytes(data) is None:
            stats.source, stats.loaded_from, stats.load_bytes = "seeded", fs.unstrip_protocol(candidate), len(data)
            if stats.loaded_from.startswith("file://"):
                stats.loaded_from = candidate
            return data
    return None


def save(path: str, data: bytes, stats: Optional[CacheStats] = None) -> CacheStats:
    """Atomically replace ``path`` with ``data``; never raises, never destroys the last good file.

    Empty or invalid bytes are not written (an empty cache never overwrites a non-empty one). Local
    files are written under ``<path>.lock`` to ``<path>.tmp``, flushed to disk, then renamed over
    ``path``; fsspec URLs are written to ``<path>.tmp`` and moved. Failures warn once and are
    recorded in the returned stats.
    """
    stats = stats if stats is not None else CacheStats(path=path)
    stats.saved, stats.save_bytes, stats.save_error = False, 0, ""  # this save's outcome only
    start = time.perf_counter()
    problem = check_bytes(data)
    if problem:
        stats.save_error = f"nothing to save ({problem})"
        log.debug("Not saving kernel cache %s: %s", path, problem)
        return stats
    try:
        fs, inner, local = _fs(path)
        if local:
            _save_local(inner, data)
        else:
            fs.makedirs(fs._parent(inner), exist_ok=True)
            fs.pipe_file(inner + ".tmp", data)
            fs.mv(inner + ".tmp", inner)
    except Exception as err:  # any backend's failure (OSError, a lock Timeout, botocore, ...) is a failed save
        stats.save_error = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"Could not save the kernel cache to {path} ({stats.save_error}). The run goes on;"
            " the previous cache file, if any, is untouched.",
            stacklevel=2,
        )
    else:
        stats.saved, stats.save_bytes = True, len(data)
    stats.save_ms = (time.perf_counter() - start) * 1e3
    return stats


def _save_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with FileLock(path + ".lock", timeout=LOCK_TIMEOUT_S):
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


# --- the shared in-process handle -----------------------------------------------------------------


class SharedCache:
    """One ``RuntimeCache`` handle per cache file per process, shared by every engine that uses it.

    Upstream gives each engine its own implicit handle on one file, so engines overwrite each
    other's kernels at save; one handle pools them. Use :func:`open_shared`.
    """

    def __init__(self, template: str, placement: Placement) -> None:
        from lightning_trt_rtx import _backend

        self.template = template
        self.path = placement.resolve(template)
        self.handle = _backend.new_cache_handle()
        data, self.stats = load(template, placement)
        if data:
            import io

            self.handle.load_from_stream(io.BytesIO(data))

    def serialize(self) -> bytes:
        import io

        buffer = io.BytesIO()
        self.handle.save_to_stream(buffer)
        return buffer.getvalue()

    def save(self) -> CacheStats:
        """Write the handle's kernels to this process's file (see :func:`save`); never raises."""
        try:
            data = self.serialize()
        except Exception as err:  # a broken handle must not take the user's run down
            self.stats.save_error = f"could not serialize the cache: {err}"
            warnings.warn(f"Kernel cache {self.path} not saved: {self.stats.save_error}", stacklevel=2)
            return self.stats
        return save(self.path, data, self.stats)


_shared: dict[str, SharedCache] = {}


def open_shared(template: str, placement: Placement) -> SharedCache:
    """The process's one handle for the file ``template`` resolves to, loading it on first use."""
    path = placement.resolve(template)
    # one file, one handle, however it is spelled ("a/cache.bin", "./a/cache.bin", a symlinked dir)
    key = path if "://" in path else os.path.realpath(path)
    if key not in _shared:
        _shared[key] = SharedCache(template, placement)
    return _shared[key]


def forget_shared() -> None:
    """Drop every in-process handle (the next :func:`open_shared` reloads from disk)."""
    _shared.clear()

