"""``python -m lightning_trt_rtx cache ...`` (also ``lightning-trt-rtx cache ...``): inspect kernel caches.

    lightning-trt-rtx cache list [ROOT] [--json]   every cache file under ROOT by key and rank
    lightning-trt-rtx cache verify FILE...         exit 0 if every FILE is a loadable cache

Exit codes: 0 all good, 1 a file is invalid (or ROOT holds invalid files), 2 bad usage or a
missing path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional, Sequence

from lightning_trt_rtx import cache

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
_SKIP_SUFFIXES = (".lock", ".tmp")


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
    if problem is None:
        problem = "quarantined by a run" if path.endswith(".corrupt") else cache.check_bytes(data)
    rel = os.path.relpath(path, root)
    key = os.path.dirname(rel) or "."
    return {
        "key": key,
        "file": os.path.basename(path),
        "path": path,
        "bytes": len(data),
        "age_s": round(now - mtime, 1),
        "valid": problem is None,
        "problem": problem or "",
    }


def _list(root: str, as_json: bool) -> int:
    if not os.path.isdir(root):
        print(f"error: cache root {root!r} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    now = time.time()
    entries = []
    for directory, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(_SKIP_SUFFIXES):
                entries.append(_entry(root, os.path.join(directory, name), now))
    entries.sort(key=lambda e: (e["key"], _natural(e["file"])))
    if as_json:
        print(json.dumps(entries, indent=2))
    elif not entries:
        print(f"no cache files under {root}")
    else:
        widths = {k: max(len(k), *(len(_cell(e, k)) for e in entries)) for k in ("key", "file", "bytes", "age_s", "valid")}
        print("  ".join(k.ljust(w) for k, w in widths.items()) + "  problem")
        for e in entries:
            print("  ".join(_cell(e, k).ljust(w) for k, w in widths.items()) + f"  {e['problem']}".rstrip())
    return EXIT_OK if all(e["valid"] for e in entries) else EXIT_INVALID


def _natural(name: str) -> list:
    """Sort key that puts rank2.bin before rank10.bin."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _cell(entry: dict, key: str) -> str:
    value = entry[key]
    if key == "valid":
        return "yes" if value else "NO"
    return str(value)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-trt-rtx", description="Inspect TensorRT-RTX kernel caches.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{cache}")
    cache_cmd = commands.add_parser("cache", help="list or verify kernel cache files")
    actions = cache_cmd.add_subparsers(dest="action", required=True, metavar="{list,verify}")
    listing = actions.add_parser("list", help="list a cache root by key and rank with sizes, ages and validity")
    listing.add_argument("root", nargs="?", default=cache.default_cache_dir(), help="cache root (default: %(default)s)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify = actions.add_parser("verify", help="check that files are loadable caches")
    verify.add_argument("files", nargs="+")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse prints the usage error itself
        return EXIT_USAGE if exit_.code else EXIT_OK
    if args.action == "list":
        return _list(args.root, args.json)
    return _verify(args.files)


if __name__ == "__main__":
    sys.exit(main())
