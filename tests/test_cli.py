"""``python -m lightning_trt_rtx cache list|verify`` and ``main(argv)``: output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lightning_trt_rtx import cache
from lightning_trt_rtx.__main__ import EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from tests.procs.cache_writer import make_payload

KEY = "sm90-trtrtx1.6.1-cuda13.0"
OTHER_KEY = "sm89-trtrtx1.6.1-cuda12.9"


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


@pytest.fixture
def root(tmp_path, real_cache_bytes):
    """A cache root as runs leave it: valid, corrupt and quarantined files, locks and temp files."""
    r = tmp_path / "caches"
    write(r / KEY / "rank0.bin", real_cache_bytes)
    write(r / KEY / "rank1.bin", make_payload(real_cache_bytes, 1, 0))
    write(r / KEY / "rank2.bin", real_cache_bytes[:5000])  # truncated
    write(r / KEY / "rank3.bin.corrupt", b"garbage")  # moved aside by a run
    write(r / KEY / "rank0.bin.lock", b"")
    write(r / KEY / "rank1.bin.tmp", real_cache_bytes[:10])
    write(r / OTHER_KEY / "rank0.bin", make_payload(real_cache_bytes, 0, 3))
    return str(r)


@pytest.fixture
def good_root(tmp_path, real_cache_bytes):
    r = tmp_path / "good"
    write(r / KEY / "rank0.bin", real_cache_bytes)
    write(r / KEY / "rank1.bin", make_payload(real_cache_bytes, 1, 0))
    write(r / KEY / "rank1.bin.lock", b"")
    return str(r)


def test_list_table(root, capsys, real_cache_bytes):
    assert main(["cache", "list", root]) == EXIT_INVALID
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["key", "file", "bytes", "age_s", "valid", "problem"]
    rows = {tuple(line.split()[:2]): line for line in out[1:]}
    assert set(rows) == {
        (KEY, "rank0.bin"),
        (KEY, "rank1.bin"),
        (KEY, "rank2.bin"),
        (KEY, "rank3.bin.corrupt"),
        (OTHER_KEY, "rank0.bin"),
    }
    # sorted by key, then file (so by rank)
    assert [tuple(line.split()[:2]) for line in out[1:]] == sorted(rows)
    first = rows[(KEY, "rank0.bin")].split()
    assert len(first) == 5 and first[2] == str(len(real_cache_bytes)) and first[4] == "yes"
    assert 0 <= float(first[3]) < 600
    assert rows[(KEY, "rank2.bin")].split()[2] == "5000"
    assert " NO " in rows[(KEY, "rank2.bin")] and "header says" in rows[(KEY, "rank2.bin")]
    assert " NO " in rows[(KEY, "rank3.bin.corrupt")] and "quarantined" in rows[(KEY, "rank3.bin.corrupt")]
    assert rows[(OTHER_KEY, "rank0.bin")].rstrip().endswith("yes")
    assert not any(".lock" in line or ".tmp" in line for line in out)


def test_list_json(root, capsys, real_cache_bytes):
    assert main(["cache", "list", root, "--json"]) == EXIT_INVALID
    entries = json.loads(capsys.readouterr().out)
    assert [(e["key"], e["file"]) for e in entries] == [
        (OTHER_KEY, "rank0.bin"),
        (KEY, "rank0.bin"),
        (KEY, "rank1.bin"),
        (KEY, "rank2.bin"),
        (KEY, "rank3.bin.corrupt"),
    ]
    by_file = {(e["key"], e["file"]): e for e in entries}
    first = by_file[(KEY, "rank0.bin")]
    assert first["valid"] is True and first["problem"] == ""
    assert first["bytes"] == len(real_cache_bytes)
    assert first["path"] == os.path.join(root, KEY, "rank0.bin")
    assert 0 <= first["age_s"] < 600
    assert by_file[(KEY, "rank2.bin")]["valid"] is False and "truncated" in by_file[(KEY, "rank2.bin")]["problem"]
    assert by_file[(KEY, "rank3.bin.corrupt")]["valid"] is False
    assert by_file[(KEY, "rank3.bin.corrupt")]["problem"] == "quarantined by a run"
    assert by_file[(OTHER_KEY, "rank0.bin")]["valid"] is True


def test_list_all_valid_and_empty(good_root, tmp_path, capsys):
    assert main(["cache", "list", good_root, "--json"]) == EXIT_OK
    assert [e["file"] for e in json.loads(capsys.readouterr().out)] == ["rank0.bin", "rank1.bin"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["cache", "list", str(empty)]) == EXIT_OK
    assert f"no cache files under {empty}" in capsys.readouterr().out
    assert main(["cache", "list", str(empty), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []


def test_list_orders_ranks_numerically(tmp_path, capsys, real_cache_bytes):
    for r in (10, 2, 0, 1, 11):
        write(tmp_path / "many" / KEY / f"rank{r}.bin", make_payload(real_cache_bytes, r, 0))
    assert main(["cache", "list", str(tmp_path / "many"), "--json"]) == EXIT_OK
    assert [e["file"] for e in json.loads(capsys.readouterr().out)] == [f"rank{r}.bin" for r in (0, 1, 2, 10, 11)]


def test_list_files_at_the_root(tmp_path, capsys, real_cache_bytes):
    write(tmp_path / "flat" / "kernels.bin", real_cache_bytes)
    assert main(["cache", "list", str(tmp_path / "flat"), "--json"]) == EXIT_OK
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["key"], entry["file"], entry["valid"]) == (".", "kernels.bin", True)


def test_list_missing_root_is_usage_error(tmp_path, capsys):
    assert main(["cache", "list", str(tmp_path / "nope")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not a directory" in err and "nope" in err
    write(tmp_path / "file", b"x")
    assert main(["cache", "list", str(tmp_path / "file")]) == EXIT_USAGE


def test_list_default_root_is_the_cache_dir(real_cache_bytes, capsys):
    default = cache.default_cache_dir()  # conftest points it into this test's tmp_path
    assert main(["cache", "list"]) == EXIT_USAGE  # nothing saved yet
    capsys.readouterr()
    write(os.path.join(default, KEY, "rank0.bin"), real_cache_bytes)
    assert main(["cache", "list", "--json"]) == EXIT_OK
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["path"] == os.path.join(default, KEY, "rank0.bin")


def test_list_sees_what_a_save_leaves(tmp_path, real_cache_bytes, capsys):
    """End to end with the store: a run's save and a quarantine show up as a listing would show them."""
    template = str(tmp_path / "r" / "{sm}" / "rank{rank}.bin")
    placement = cache.Placement(sm="sm90")
    assert cache.save(placement.resolve(template), real_cache_bytes).saved
    write(cache.Placement(rank=1, sm="sm90").resolve(template), b"junk")
    with pytest.warns(UserWarning, match="unusable"):
        cache.load(template, cache.Placement(rank=1, sm="sm90"))
    assert main(["cache", "list", str(tmp_path / "r"), "--json"]) == EXIT_INVALID
    entries = json.loads(capsys.readouterr().out)
    assert [(e["file"], e["valid"]) for e in entries] == [("rank0.bin", True), ("rank1.bin.corrupt", False)]


def test_verify(root, capsys, real_cache_bytes):
    good = os.path.join(root, KEY, "rank0.bin")
    good2 = os.path.join(root, OTHER_KEY, "rank0.bin")
    bad = os.path.join(root, KEY, "rank2.bin")
    missing = os.path.join(root, KEY, "rank9.bin")

    assert main(["cache", "verify", good, good2]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{good}: ok ({len(real_cache_bytes)} bytes)"
    assert out[1].startswith(f"{good2}: ok (")

    assert main(["cache", "verify", good, bad]) == EXIT_INVALID
    captured = capsys.readouterr()
    assert f"{bad}: INVALID (" in captured.out and "header says" in captured.out
    assert f"{good}: ok" in captured.out

    assert main(["cache", "verify", missing]) == EXIT_USAGE
    assert f"{missing}: missing" in capsys.readouterr().err

    # the worst outcome decides, and every file is still reported
    assert main(["cache", "verify", bad, missing, good]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert f"{bad}: INVALID" in captured.out and f"{good}: ok" in captured.out and f"{missing}: missing" in captured.err

    assert main(["cache", "verify", os.path.join(root, KEY)]) == EXIT_USAGE  # a directory is not a file


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["cache"],
        ["cache", "frobnicate"],
        ["cache", "verify"],
        ["cache", "list", "--jsn"],
        ["purge"],
        ["cache", "list", "a", "b"],
    ],
)
def test_bad_usage(argv, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage: lightning-trt-rtx" in err
    assert "error:" in err


def test_help_exits_ok(capsys):
    assert main(["--help"]) == EXIT_OK
    assert "cache" in capsys.readouterr().out
    assert main(["cache", "list", "--help"]) == EXIT_OK
    assert "--json" in capsys.readouterr().out


def run_module(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lightning_trt_rtx", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_module_entry_point(root, real_cache_bytes):
    proc = run_module("cache", "list", root, "--json")
    assert proc.returncode == EXIT_INVALID, proc.stderr
    assert len(json.loads(proc.stdout)) == 5

    good = os.path.join(root, KEY, "rank0.bin")
    proc = run_module("cache", "verify", good)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout.strip() == f"{good}: ok ({len(real_cache_bytes)} bytes)"

    proc = run_module("cache")
    assert proc.returncode == EXIT_USAGE
    assert "usage:" in proc.stderr


def test_console_script(good_root):
    script = os.path.join(os.path.dirname(sys.executable), "lightning-trt-rtx")
    if not os.path.exists(script):
        pytest.skip("the lightning-trt-rtx console script is not installed in this environment")
    proc = subprocess.run(
        [script, "cache", "list", good_root], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "rank0.bin" in proc.stdout and "rank1.bin" in proc.stdout


def test_verify_a_directory_or_an_unreadable_file(tmp_path, capsys, monkeypatch):
    from lightning_trt_rtx.__main__ import main

    assert main(["cache", "verify", str(tmp_path)]) == 2
    assert "not a regular file" in capsys.readouterr().err
    locked = tmp_path / "rank0.bin"
    locked.write_bytes(b"x")
    real_open = open

    def refuse(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    assert main(["cache", "verify", str(locked)]) == 1
    assert "INVALID (unreadable: Permission denied)" in capsys.readouterr().out
