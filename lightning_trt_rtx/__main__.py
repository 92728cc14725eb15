"""``python -m lightning_trt_rtx cache|prewarm ...`` (also ``lightning-trt-rtx ...``): kernel caches from the shell.

    lightning-trt-rtx cache list [ROOT] [--json]             every cache file under ROOT: key, GPU, size, age, validity
    lightning-trt-rtx cache verify FILE...                   exit 0 if every FILE is a loadable cache
    lightning-trt-rtx cache clear [ROOT] [--gpu ID] [--dry-run]
                                                             remove our cache files (only GPU ID's, with --gpu)
    lightning-trt-rtx prewarm PROGRAM --shape 8x128 [--shape 8x128,8x128 ...] [--dtype D] [--cache TEMPLATE]
                      [--device N]                           fill this GPU's cache for a saved program's shapes
    lightning-trt-rtx --version                              versions of this package, torch, torch-tensorrt, Lightning

ROOT defaults to the package's cache directory; while no run has saved there yet, it holds no caches.
A file under ROOT is listed if it is named ``*.bin``, has a record (``<file>.json``) beside it, or
starts with the TensorRT-RTX cache tag; files moved aside by a run (``<file>.corrupt``) are listed
as quarantined. ``clear`` removes only files with a record, the tag or a quarantine (a ``*.bin``
name alone could be a model's weights). Anything else (a README, notes) is never listed or removed. ``clear`` also
removes a cache's record, lock and temporary files: run it while no job uses the caches.

``prewarm`` loads a program saved with ``torch_tensorrt.save`` onto ``cuda:N``, runs it once per
``--shape`` with its kernels compiled eagerly (see :mod:`lightning_trt_rtx.prewarm`) and saves this
GPU's kernel cache file (``--cache``: a template, default the per-GPU default one). Run it once per GPU
of a node, in a deploy step, on the GPU whose cache it fills. ``--dtype`` defaults to the dtypes the
program records for its inputs, else float16.

Exit codes: 0 ok (quarantined files do not count as failures), 1 an invalid file was found (or a
file could not be removed, e.g. on a read-only mount, or prewarm could not save the cache), 2 bad usage
or a missing path (for prewarm also: no GPU, a device number below 0, a program built for another GPU,
a shape the program does not accept).

The ``cache`` commands import neither torch nor Lightning: they start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from lightning_trt_rtx import cache

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
QUARANTINED = ".corrupt"
# a full UUID (any device number it was seen as), or the gpu column: 8 hex digits, -N for cuda:N above 0
_GPU_ID = re.compile(r"(?:gpu-)?([0-9a-f]{8})(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}|([0-9a-f]{8}(?:-[1-9][0-9]{0,3})?)")


# --- which files are ours ---------------------------------------------------------------------------


def _base(name: str) -> str:
    """The cache file a name belongs to: ``rank0.bin.json.tmp`` -> ``rank0.bin``."""
    while name.endswith(cache.SIDE_SUFFIXES):
        name = name[: name.rindex(".")]
    return name


def _starts_with_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(cache.MAGIC)) == cache.MAGIC
    except OSError:
        return False


def _is_record(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(1 << 16)).get("format") == cache.RECORD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _groups(root: str, by_name: bool = True) -> list[tuple[str, str, list[str]]]:
    """(directory, base name, file names) for every cache of ours under ``root``, with its side files.

    ``by_name=False`` (what ``clear`` removes): a ``*.bin`` name alone is not proof enough, since a
    model's ``pytorch_model.bin`` has it too; a record, a quarantine or the cache tag is.
    """
    found = []
    for directory, _, names in os.walk(root):
        by_base: dict[str, list[str]] = {}
        for name in names:
            by_base.setdefault(_base(name), []).append(name)
        for base, members in by_base.items():
            path = os.path.join(directory, base)
            if (
                (by_name and base.endswith(".bin"))
                or base + QUARANTINED in members
                or (base + cache.RECORD_SUFFIX in members and _is_record(path + cache.RECORD_SUFFIX))
                or (base in members and _starts_with_magic(path))
                or (base + ".tmp" in members and _starts_with_magic(path + ".tmp"))
            ):
                found.append((directory, base, sorted(members)))
    return found


def _root_or_error(root: str | None) -> tuple[str | None, int]:
    """(the root to read, EXIT_OK) or (None, an exit code): a default root not made yet holds nothing."""
    if root is None:
        default = cache.default_cache_dir()
        if not os.path.exists(default):
            return None, EXIT_OK
        root = default
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        print(
            f"error: cache root {root!r} {what}; give an existing directory"
            f" (the default root is {cache.default_cache_dir()!r})",
            file=sys.stderr,
        )
        return None, EXIT_USAGE
    return root, EXIT_OK


# --- list -------------------------------------------------------------------------------------------


def _entry(root: str, path: str, now: float) -> dict:
    # a dangling symlink, a FIFO or a file removed since the walk is listed as invalid, not a traceback
    data, mtime, problem = b"", now, None
    try:
        if not os.path.isfile(path):
            raise OSError("not a regular file")
        with open(path, "rb") as f:
            data = f.read()
        mtime = os.path.getmtime(path)
    except OSError as err:
        problem = f"unreadable ({err})"
    quarantined = path.endswith(QUARANTINED)
    if problem is None:
        problem = cache.check_bytes(data)
    if quarantined:
        problem = "quarantined by a run" + (f": {problem}" if problem else "")
    record = cache.read_record(path, data) if problem is None else None
    return {
        "key": os.path.dirname(os.path.relpath(path, root)) or ".",
        "file": os.path.basename(path),
        "path": path,
        "gpu": record.gpu_id if record else "",
        "gpu_name": record.gpu_name if record else "",
        "gpu_uuid": record.gpu_uuid if record else "",
        "bytes": len(data),
        "age_s": round(now - mtime, 1),
        "valid": problem is None,
        "quarantined": quarantined,
        "problem": problem or "",
    }


def _entries(root: str) -> list[dict]:
    """The listed files under ``root`` (caches of ours and quarantined ones), by key, then by rank."""
    now, entries = time.time(), []
    for directory, base, members in _groups(root):
        for name in (base, base + QUARANTINED):
            if name in members:
                entries.append(_entry(root, os.path.join(directory, name), now))
    return sorted(entries, key=lambda e: (e["key"], _natural(e["file"])))


def _list(root: str | None, as_json: bool) -> int:
    shown = root or cache.default_cache_dir()
    root, status = _root_or_error(root)
    if status != EXIT_OK:
        return status
    entries = _entries(root) if root else []
    if as_json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(f"no cache files under {shown}" + ("" if root else " (no run has saved there yet)"))
    else:
        columns = ("key", "file", "bytes", "age_s", "valid", "gpu")
        widths = {k: max(len(k), *(len(_cell(e, k)) for e in entries)) for k in columns}
        print("  ".join(k.ljust(w) for k, w in widths.items()) + "  problem")
        for e in entries:
            print(("  ".join(_cell(e, k).ljust(w) for k, w in widths.items()) + f"  {e['problem']}").rstrip())
    return EXIT_OK if all(e["valid"] or e["quarantined"] for e in entries) else EXIT_INVALID


def _natural(name: str) -> list:
    """Sort key that puts rank2.bin before rank10.bin."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _cell(entry: dict, key: str) -> str:
    if key == "valid":
        return "quarantined" if entry["quarantined"] else "yes" if entry["valid"] else "NO"
    if key == "gpu":
        if not entry["gpu"]:
            return "-"
        return f"{entry['gpu']} ({entry['gpu_name']})" if entry["gpu_name"] else entry["gpu"]
    return str(entry[key])


# --- verify -----------------------------------------------------------------------------------------


def _verify(paths: Sequence[str]) -> int:
    status = EXIT_OK
    for path in paths:
        if not os.path.isfile(path):
            what = "not a regular file" if os.path.exists(path) else "missing"
            print(f"{path}: {what}", file=sys.stderr)
            status = max(status, EXIT_USAGE)
            continue
        try:
            with open(path, "rb") as f:
                problem = cache.check_bytes(f.read())
        except OSError as err:
            problem = f"unreadable: {err.strerror or err}"
        if problem:
            print(f"{path}: INVALID ({problem})")
            status = max(status, EXIT_INVALID)
        else:
            print(f"{path}: ok ({os.path.getsize(path)} bytes)")
    return status


# --- clear ------------------------------------------------------------------------------------------


def _clear(root: str | None, gpu: str | None, dry_run: bool) -> int:
    shown = root or cache.default_cache_dir()
    root, status = _root_or_error(root)
    if root is None:
        if status == EXIT_OK:
            print(f"nothing to clear under {shown} (no run has saved there yet)")
        return status
    status, removed, failed, size, seen = EXIT_OK, 0, 0, 0, set()
    for directory, base, members in sorted(_groups(root, by_name=False)):
        if gpu is not None:
            record = cache.read_record(os.path.join(directory, base))
            seen.add(record.gpu_id if record else "")
            if record is None or not _same_gpu(record, gpu):
                continue
        for name in members:
            path = os.path.join(directory, name)
            nbytes = os.path.getsize(path) if os.path.isfile(path) else 0
            if not dry_run:
                try:
                    os.remove(path)
                except OSError as err:
                    print(f"could not remove {path}: {err.strerror or err}", file=sys.stderr)
                    status, failed = EXIT_INVALID, failed + 1
                    continue
            print(f"{'would remove' if dry_run else 'removed'} {path}")
            removed, size = removed + 1, size + nbytes
        if not dry_run and directory != root:
            _remove_if_empty(directory, root)
    which = f" of GPU {gpu}" if gpu else ""
    if removed:
        print(f"{'would remove' if dry_run else 'removed'} {removed} files ({size} bytes){which} under {root}")
    if failed:  # e.g. a read-only mount: the files are still there
        print(f"error: could not remove {failed} file(s){which} under {root} (see above); they are still there",
              file=sys.stderr)
    elif not removed:
        others = sorted(g for g in seen if g)
        hint = f" (GPUs with recorded files there: {', '.join(others)})" if gpu and others else ""
        print(f"no cache files{which} under {root}{hint}")
    return status


def _remove_if_empty(directory: str, root: str) -> None:
    """Remove a key directory the clear emptied, and its empty parents below ``root``."""
    while os.path.normpath(directory) != os.path.normpath(root):
        try:
            os.rmdir(directory)
        except OSError:  # not empty (another key, a user's file) or already gone
            return
        directory = os.path.dirname(directory)


def _gpu_id(text: str) -> str:
    """``--gpu``: the gpu column of ``cache list`` (8 hex digits, ``-N`` where the GPU was ``cuda:N``), or
    a full UUID (``nvidia-smi -L``'s too)."""
    match = _GPU_ID.fullmatch(text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a GPU id: give the gpu column of 'cache list' (8 hex digits, e.g. 3b6d1a2c, with -N"
            " for the files filled as cuda:N, e.g. 3b6d1a2c-1) or the GPU's UUID"
            " (e.g. GPU-3b6d1a2c-5e2f-4a1b-9c3d-0123456789ab)"
        )
    return match.group(1) or match.group(2)


def _same_gpu(record: cache.Record, gpu: str) -> bool:
    """Whether ``record``'s GPU is ``--gpu``'s: ``3b6d1a2c-1`` that GPU as cuda:1 only, ``3b6d1a2c`` (or its
    UUID) that GPU as any device number."""
    short, _, number = gpu.partition("-")
    return record.gpu_id.split("-")[0] == short and (not number or record.ordinal == int(number))


# --- prewarm ---------------------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _prewarm(args: argparse.Namespace) -> int:
    """Load PROGRAM on ``cuda:N``, prewarm every shape, save this GPU's cache. torch is imported only here."""
    if not os.path.isfile(args.program):
        what = "is not a file" if os.path.exists(args.program) else "does not exist"
        return _error(f"no such program {args.program!r} ({what}): give a file saved with torch_tensorrt.save")
    from lightning_trt_rtx import _backend, prewarm
    from lightning_trt_rtx.session import ServingSession
    from lightning_trt_rtx.settings import TRTSettings

    try:
        shapes = [prewarm.parse_shape(text) for text in args.shape]
        dtype = prewarm.parse_dtype(args.dtype) if args.dtype is not None else None
        settings = TRTSettings(runtime_cache=args.cache)
    except (TypeError, ValueError) as err:
        return _error(str(err))
    try:
        device = _backend.cuda_device(args.device)
    except IndexError as err:
        return _error(f"--device: {err}")
    if device is None:
        return _error("no CUDA GPU: prewarm compiles this GPU's kernels: run it on the GPU whose cache it fills")
    gpu = cache.current_gpu()
    try:
        program = _backend.load_program(args.program)
    except Exception as err:  # not a program, a version it cannot read: say which file, no traceback
        return _error(f"could not load the program {args.program!r}: {type(err).__name__}: {err}")
    program.to(device)  # weights of PyTorch ops between engines; the engines were made on this device
    problem = prewarm.check_program_gpu(program, gpu)
    if problem:
        return _error(problem)
    dtypes: list[Any] = [dtype or prewarm.DTYPES["float16"]]
    accepted = prewarm.program_inputs(program)
    takes = "the inputs its engines check (their error is in this message)"
    if accepted is not None:
        inputs, ranges = accepted
        takes = prewarm.describe_inputs(inputs, ranges)
        for shape in shapes:
            why = prewarm.check_shape(shape, inputs, ranges)
            if why:
                text = prewarm.format_shape(shape)
                return _error(f"the program does not accept --shape {text} ({why}); it takes {takes}")
        if dtype is not None and any(i.dtype not in (None, dtype) for i in inputs):
            return _error(f"--dtype {args.dtype}: the program takes {takes}; leave --dtype out for its own dtypes")
        if dtype is None and inputs and all(i.dtype is not None for i in inputs):
            dtypes = [i.dtype for i in inputs]
    examples = prewarm.example_inputs(shapes, dtypes if len(dtypes) > 1 else dtypes[0], device)
    session = ServingSession(program, settings, rank=0, local_rank=0, node_rank=0, world_size=1)
    try:
        with session:
            records = session.prewarm(examples)
    except prewarm.PrewarmError as err:
        return _error(f"{err}. The program takes {takes}")
    for record in records:
        print(f"{record.text}: first call {record.first_call_ms:.1f} ms (kernels compiled eagerly)")
    stats = session.figures.cache
    if stats is None or not stats.saved:
        reason = "no cache" if stats is None else stats.save_error or "nothing new"
        print(f"error: kernel cache {args.cache} not saved: {reason}", file=sys.stderr)
        return EXIT_INVALID
    print(f"saved {stats.save_bytes} bytes of GPU {gpu.id}'s kernels ({gpu.name}) to {stats.path}")
    return EXIT_OK


# --- command line -----------------------------------------------------------------------------------


def _version() -> str:
    """This package's version and the installed torch, torch-tensorrt and Lightning (read without importing them)."""
    from importlib import metadata

    from lightning_trt_rtx import __version__

    def installed(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    trt = next((f"{d} {v}" for d in ("torch-tensorrt-rtx", "torch-tensorrt") if (v := installed(d))), None)
    parts = [
        f"torch {installed('torch') or 'not installed'}",
        trt or "torch-tensorrt not installed",
        f"lightning {installed('lightning') or installed('pytorch-lightning') or 'not installed'}",
    ]
    return f"lightning-trt-rtx {__version__} ({', '.join(parts)})"


class _VersionAction(argparse.Action):
    """``--version``: the versions are looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(nargs=0, help="print the versions of this package, torch, torch-tensorrt and Lightning")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())
        parser.exit()


def _device_number(text: str) -> int:
    """``--device``: a CUDA device number, 0 or more."""
    try:
        number = int(text)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CUDA device number: give 0 or more (cuda:N)")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-trt-rtx", description="Inspect, clear and fill TensorRT-RTX kernel caches."
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{cache,prewarm}")
    cache_cmd = commands.add_parser("cache", help="list, verify or clear kernel cache files")
    actions = cache_cmd.add_subparsers(dest="action", required=True, metavar="{list,verify,clear}")
    raw = argparse.RawTextHelpFormatter  # a long default root stays on one line, unbroken at its hyphens
    root_help = f"cache root (default: {cache.default_cache_dir()})"
    listing = actions.add_parser("list", formatter_class=raw, help="list cache files with GPU, size, age, validity")
    listing.add_argument("root", nargs="?", help=root_help)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify = actions.add_parser("verify", help="check that files are loadable caches")
    verify.add_argument("files", nargs="+")
    clear = actions.add_parser("clear", formatter_class=raw, help="remove cache files and their records, locks")
    clear.add_argument("root", nargs="?", help=root_help)
    clear.add_argument(
        "--gpu",
        type=_gpu_id,
        metavar="ID",
        help="only files a record says GPU ID filled: the gpu column of 'cache list' (3b6d1a2c-1: as cuda:1 only),"
        " or its 8 hex digits or UUID (as any device number)",
    )
    clear.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    for action in (listing, verify, clear):
        action.set_defaults(parser=action)
    warm = commands.add_parser(
        "prewarm", formatter_class=raw, help="fill this GPU's kernel cache for a saved program's input shapes"
    )
    warm.add_argument("program", help="a program saved with torch_tensorrt.save")
    warm.add_argument(
        "--shape", action="append", required=True, metavar="SHAPE",
        help="input shape(s) of one call: 8x128 (one input) or 8x128,8x128 (two); repeat for more shapes",
    )
    warm.add_argument(
        "--dtype", help="float16, half, bfloat16, float32, int64 or int32\n(default: the program's own input dtypes)"
    )
    warm.add_argument(
        "--cache", default=cache.default_template(), metavar="TEMPLATE",
        help=f"kernel cache path template (default: {cache.default_template()})",
    )
    warm.add_argument(
        "--device", type=_device_number, default=0, metavar="N", help="the CUDA device to prewarm (default: 0)"
    )
    warm.set_defaults(parser=warm, action="prewarm")
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; an unknown argument is reported by its command, whose usage lists the valid ones."""
    args, unknown = _parser().parse_known_args(argv)
    if unknown:
        options = [o for a in args.parser._actions for o in a.option_strings]
        close = difflib.get_close_matches(unknown[0], options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exit_:  # argparse prints the usage error itself
        return EXIT_USAGE if exit_.code else EXIT_OK
    try:
        if args.action == "prewarm":
            return _prewarm(args)
        if args.action == "list":
            return _list(args.root, args.json)
        if args.action == "clear":
            return _clear(args.root, args.gpu, args.dry_run)
        return _verify(args.files)
    except BrokenPipeError:  # "cache list | head": the reader has what it wanted, no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit fails quietly
        except (OSError, ValueError):
            pass
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
