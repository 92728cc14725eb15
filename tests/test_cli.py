"""``python -m lightning_trt_rtx cache list|verify|clear`` and ``main(argv)``: output, exit codes, start time."""

from __future__ import annotations

import dataclasses
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
H100 = cache.Gpu(uuid="3b6d1a2c-0000-1111-2222-333344445555", name="NVIDIA H100 80GB HBM3", sm="sm90")
OTHER = cache.Gpu(uuid="9f8e7d6c-1a2b-4c3d-8e9f-ba9876543210", name="NVIDIA H100 80GB HBM3", sm="sm90")


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def save(path, data: bytes, gpu: cache.Gpu = H100) -> str:
    """A cache file with its record, as a run on ``gpu`` saves it."""
    assert cache.save(str(path), data, None, cache.Placement(gpu=gpu, sm=gpu.sm)).saved
    return str(path)


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}


def listing(root, capsys) -> tuple[int, dict]:
    code = main(["cache", "list", str(root), "--json"])
    return code, {(e["key"], e["file"]): e for e in json.loads(capsys.readouterr().out)}


def table(root, capsys) -> tuple[int, list[str], dict]:
    """Exit code, header cells, and the table's rows by (key, file)."""
    code = main(["cache", "list", str(root)])
    lines = capsys.readouterr().out.splitlines()
    return code, lines[0].split(), {tuple(line.split()[:2]): line for line in lines[1:]}


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


@pytest.fixture
def gpu_root(tmp_path, real_cache_bytes):
    """The default layout after runs on two GPUs, an older per-rank file, and what users leave beside them."""
    r = tmp_path / "gpus"
    save(r / KEY / "gpu-3b6d1a2c.bin", real_cache_bytes, H100)
    save(r / KEY / "gpu-9f8e7d6c.bin", make_payload(real_cache_bytes, 1, 0), OTHER)
    write(r / KEY / "rank0.bin", real_cache_bytes)  # from 0.1: no record
    write(r / KEY / "gpu-3b6d1a2c.bin.corrupt", b"junk")
    write(r / "README", b"kernel caches of the team's jobs\n")
    write(r / KEY / "notes.txt", b"H100 runs\n")
    return r


# --- list -------------------------------------------------------------------------------------------


def test_list_table(root, capsys, real_cache_bytes):
    code, header, rows = table(root, capsys)
    assert code == EXIT_INVALID  # rank2.bin is truncated
    assert header == ["key", "file", "bytes", "age_s", "valid", "gpu", "problem"]
    assert list(rows) == [(OTHER_KEY, "rank0.bin")] + [(KEY, f) for f in ("rank0.bin", "rank1.bin", "rank2.bin")] + [
        (KEY, "rank3.bin.corrupt")
    ]  # sorted by key, then by rank; no .lock or .tmp
    first = rows[(KEY, "rank0.bin")].split()
    assert first[2:] == [str(len(real_cache_bytes)), first[3], "yes", "-"]  # no record: GPU unknown
    assert 0 <= float(first[3]) < 600
    truncated = rows[(KEY, "rank2.bin")]
    assert truncated.split()[2] == "5000" and truncated.split()[4] == "NO" and "header says" in truncated
    quarantined = rows[(KEY, "rank3.bin.corrupt")]
    assert quarantined.split()[4] == "quarantined" and "quarantined by a run: truncated" in quarantined
    assert not any(line != line.rstrip() for line in rows.values())


def test_list_json(root, capsys, real_cache_bytes):
    code, by_file = listing(root, capsys)
    assert code == EXIT_INVALID
    assert list(by_file) == [
        (OTHER_KEY, "rank0.bin"),
        (KEY, "rank0.bin"),
        (KEY, "rank1.bin"),
        (KEY, "rank2.bin"),
        (KEY, "rank3.bin.corrupt"),
    ]
    first = by_file[(KEY, "rank0.bin")]
    assert first["valid"] is True and first["quarantined"] is False and first["problem"] == ""
    assert (first["gpu"], first["gpu_name"], first["gpu_uuid"]) == ("", "", "")
    assert first["bytes"] == len(real_cache_bytes)
    assert first["path"] == os.path.join(root, KEY, "rank0.bin")
    assert 0 <= first["age_s"] < 600
    assert by_file[(KEY, "rank2.bin")]["valid"] is False and "truncated" in by_file[(KEY, "rank2.bin")]["problem"]
    corrupt = by_file[(KEY, "rank3.bin.corrupt")]
    assert (corrupt["valid"], corrupt["quarantined"]) == (False, True)
    assert corrupt["problem"].startswith("quarantined by a run: truncated")
    assert by_file[(OTHER_KEY, "rank0.bin")]["valid"] is True


def test_list_shows_the_gpu_that_filled_each_file(gpu_root, capsys, real_cache_bytes):
    code, by_file = listing(gpu_root, capsys)
    assert code == EXIT_OK  # a quarantined file is not a failure
    assert list(by_file) == [
        (KEY, "gpu-3b6d1a2c.bin"),
        (KEY, "gpu-3b6d1a2c.bin.corrupt"),
        (KEY, "gpu-9f8e7d6c.bin"),
        (KEY, "rank0.bin"),
    ]  # no README, notes.txt or .json records
    h100 = by_file[(KEY, "gpu-3b6d1a2c.bin")]
    assert (h100["gpu"], h100["gpu_name"], h100["gpu_uuid"]) == ("3b6d1a2c", H100.name, H100.uuid)
    assert by_file[(KEY, "gpu-9f8e7d6c.bin")]["gpu_uuid"] == OTHER.uuid
    assert by_file[(KEY, "rank0.bin")]["gpu"] == by_file[(KEY, "gpu-3b6d1a2c.bin.corrupt")]["gpu"] == ""

    code, header, rows = table(gpu_root, capsys)
    assert code == EXIT_OK and header[5] == "gpu"
    assert "  3b6d1a2c (NVIDIA H100 80GB HBM3)  " in rows[(KEY, "gpu-3b6d1a2c.bin")] + "  "
    assert "  9f8e7d6c (NVIDIA H100 80GB HBM3)  " in rows[(KEY, "gpu-9f8e7d6c.bin")] + "  "
    assert rows[(KEY, "rank0.bin")].split()[5] == "-"
    assert rows[(KEY, "gpu-3b6d1a2c.bin.corrupt")].split()[4:6] == ["quarantined", "-"]

    # a file replaced without its record: the stale record vouches for nothing
    write(gpu_root / KEY / "gpu-9f8e7d6c.bin", real_cache_bytes)
    _, by_file = listing(gpu_root, capsys)
    assert by_file[(KEY, "gpu-9f8e7d6c.bin")]["valid"] is True and by_file[(KEY, "gpu-9f8e7d6c.bin")]["gpu"] == ""


def test_list_quarantined_files_alone_exit_ok(tmp_path, capsys, real_cache_bytes):
    write(tmp_path / "q" / KEY / "rank0.bin", real_cache_bytes)
    write(tmp_path / "q" / KEY / "rank1.bin.corrupt", real_cache_bytes[:100])
    code, by_file = listing(tmp_path / "q", capsys)
    assert code == EXIT_OK
    assert [e["quarantined"] for e in by_file.values()] == [False, True]
    assert main(["cache", "list", str(tmp_path / "q")]) == EXIT_OK
    assert "quarantined by a run: truncated or padded" in capsys.readouterr().out


def test_list_skips_files_that_are_not_caches(tmp_path, capsys, real_cache_bytes):
    r = tmp_path / "mixed"
    write(r / "README", b"# caches\n")
    write(r / "notes.txt", b"ptr")  # shorter than the tag
    write(r / KEY / "config.json", b'{"format": "something else"}')
    write(r / KEY / "data", b"\x00" * 64)
    write(r / KEY / "notes.txt.lock", b"")
    write(r / KEY / "x.lock", b"")
    write(r / KEY / "x.tmp", b"half")
    save(r / KEY / "custom", real_cache_bytes)  # a template without .bin: its record says it is ours
    write(r / KEY / "kernels", real_cache_bytes)  # no .bin, no record: the cache tag says it is ours
    write(r / KEY / "rank0.bin", real_cache_bytes[:7])  # named like a cache: listed, as invalid
    code, by_file = listing(r, capsys)
    assert code == EXIT_INVALID
    assert list(by_file) == [(KEY, "custom"), (KEY, "kernels"), (KEY, "rank0.bin")]
    assert by_file[(KEY, "custom")]["gpu"] == H100.id and by_file[(KEY, "kernels")]["valid"] is True
    assert "truncated" in by_file[(KEY, "rank0.bin")]["problem"]


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
    assert "does not exist" in err and "nope" in err and cache.default_cache_dir() in err
    write(tmp_path / "file", b"x")
    assert main(["cache", "list", str(tmp_path / "file")]) == EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err


def test_list_default_root_is_the_cache_dir(real_cache_bytes, capsys):
    default = cache.default_cache_dir()  # conftest points it into this test's tmp_path
    assert not os.path.exists(default)
    assert main(["cache", "list"]) == EXIT_OK  # no run has saved yet: no caches, not an error
    assert f"no cache files under {default}" in capsys.readouterr().out
    assert main(["cache", "list", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []
    assert main(["cache", "list", default]) == EXIT_USAGE  # named explicitly, it must exist
    capsys.readouterr()
    save(os.path.join(default, KEY, "gpu-3b6d1a2c.bin"), real_cache_bytes)
    assert main(["cache", "list", "--json"]) == EXIT_OK
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["path"], entry["gpu"]) == (os.path.join(default, KEY, "gpu-3b6d1a2c.bin"), "3b6d1a2c")


def test_list_default_root_that_is_a_file(real_cache_bytes, capsys):
    write(cache.default_cache_dir(), b"x")
    assert main(["cache", "list"]) == EXIT_USAGE
    assert "is not a directory" in capsys.readouterr().err


def test_list_sees_what_a_run_leaves(tmp_path, real_cache_bytes, capsys, messages):
    """End to end with the store: a run's save and a quarantine show up as a listing would show them."""
    template = str(tmp_path / "r" / "{sm}" / "gpu-{gpu}.bin")
    assert cache.save(
        cache.Placement(sm="sm90", gpu=H100).resolve(template),
        real_cache_bytes,
        None,
        cache.Placement(sm="sm90", gpu=H100),
    ).saved
    other = cache.Placement(sm="sm90", gpu=OTHER)
    write(other.resolve(template), b"junk")
    cache.load(template, other)
    assert messages.matching("unusable")
    code, by_file = listing(tmp_path / "r", capsys)
    assert code == EXIT_OK
    assert [(e["file"], e["valid"], e["quarantined"], e["gpu"]) for e in by_file.values()] == [
        ("gpu-3b6d1a2c.bin", True, False, "3b6d1a2c"),
        ("gpu-9f8e7d6c.bin.corrupt", False, True, ""),
    ]


# --- clear ------------------------------------------------------------------------------------------


def test_clear_removes_ours_and_keeps_the_rest(gpu_root, capsys):
    before = files_under(gpu_root)
    ours = {f for f in before if f.startswith(KEY) and not f.endswith("notes.txt")}
    assert {f"{KEY}/gpu-3b6d1a2c.bin.json", f"{KEY}/gpu-3b6d1a2c.bin.lock"} <= ours  # records and locks too
    assert main(["cache", "clear", str(gpu_root)]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:-1]) == sorted(f"removed {gpu_root / f}" for f in ours)
    assert out[-1].startswith(f"removed {len(ours)} files (") and out[-1].endswith(f"under {gpu_root}")
    assert files_under(gpu_root) == {"README", f"{KEY}/notes.txt"}
    code, by_file = listing(gpu_root, capsys)
    assert (code, by_file) == (EXIT_OK, {})


def test_clear_removes_emptied_key_directories_not_the_root(tmp_path, capsys, real_cache_bytes):
    r = tmp_path / "r"
    save(r / KEY / "gpu-3b6d1a2c.bin", real_cache_bytes)
    save(r / "nested" / OTHER_KEY / "gpu-3b6d1a2c.bin", real_cache_bytes)
    assert main(["cache", "clear", str(r)]) == EXIT_OK
    assert os.listdir(r) == []
    assert main(["cache", "clear", str(r)]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == f"no cache files under {r}"


def test_clear_one_gpu(gpu_root, capsys):
    assert main(["cache", "clear", str(gpu_root), "--gpu", "3b6d1a2c"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"removed {gpu_root / KEY / 'gpu-3b6d1a2c.bin'}\n" in out and " of GPU 3b6d1a2c under " in out
    assert files_under(gpu_root) == {
        "README",
        f"{KEY}/notes.txt",
        f"{KEY}/rank0.bin",  # no record: not known to be this GPU's
        f"{KEY}/gpu-9f8e7d6c.bin",
        f"{KEY}/gpu-9f8e7d6c.bin.json",
        f"{KEY}/gpu-9f8e7d6c.bin.lock",
    }
    # a full UUID as nvidia-smi -L prints it names the same GPU
    assert main(["cache", "clear", str(gpu_root), "--gpu", "GPU-" + OTHER.uuid.upper()]) == EXIT_OK
    assert files_under(gpu_root) == {"README", f"{KEY}/notes.txt", f"{KEY}/rank0.bin"}


def test_clear_a_gpu_seen_under_other_device_numbers(tmp_path, real_cache_bytes, capsys):
    """A DDP host's files of cuda:1, cuda:2 show as 3b6d1a2c-1, 3b6d1a2c-2: each id clears its own, the GPU's
    8 hex digits or UUID clear all of them."""
    root = tmp_path / "g"
    paths = {
        n: save(root / KEY / f"gpu-{n}.bin", real_cache_bytes, dataclasses.replace(H100, ordinal=n)) for n in (0, 1, 2)
    }
    code, by_file = listing(root, capsys)
    assert code == EXIT_OK and sorted(e["gpu"] for e in by_file.values()) == ["3b6d1a2c", "3b6d1a2c-1", "3b6d1a2c-2"]
    assert main(["cache", "clear", str(root), "--gpu", "3b6d1a2c-1"]) == EXIT_OK
    assert [os.path.exists(paths[n]) for n in (0, 1, 2)] == [True, False, True]
    assert main(["cache", "clear", str(root), "--gpu", "GPU-" + H100.uuid]) == EXIT_OK
    assert not any(os.path.exists(p) for p in paths.values())


def test_clear_a_gpu_with_no_files_says_which_gpus_have_some(gpu_root, capsys):
    before = files_under(gpu_root)
    assert main(["cache", "clear", str(gpu_root), "--gpu", "deadbeef"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "no cache files of GPU deadbeef" in out and "3b6d1a2c, 9f8e7d6c" in out
    assert files_under(gpu_root) == before


def test_clear_dry_run_removes_nothing(gpu_root, capsys):
    before = files_under(gpu_root)
    assert main(["cache", "clear", str(gpu_root), "--dry-run", "--gpu", "9f8e7d6c"]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"would remove {gpu_root / KEY / 'gpu-9f8e7d6c.bin'}",
        f"would remove {gpu_root / KEY / 'gpu-9f8e7d6c.bin.json'}",
        f"would remove {gpu_root / KEY / 'gpu-9f8e7d6c.bin.lock'}",
        out[-1],
    ]
    assert out[-1].startswith("would remove 3 files (")
    assert files_under(gpu_root) == before


def test_clear_leftovers_of_a_file_that_is_gone(tmp_path, capsys, real_cache_bytes):
    """A crashed save's temp file and a record whose cache was deleted by hand are ours to clear."""
    r = tmp_path / "r"
    write(r / KEY / "gpu-3b6d1a2c.bin.tmp", real_cache_bytes[:100])
    write(r / KEY / "gpu-3b6d1a2c.bin.json.tmp", b"{")
    write(r / KEY / "custom.json", json.dumps({"format": cache.RECORD_FORMAT}).encode())
    write(r / KEY / "custom.lock", b"")
    write(r / KEY / "mine.tmp", real_cache_bytes[:100])  # a template without .bin, crashed mid-save
    write(r / KEY / "user.json", b'{"a": 1}')
    write(r / KEY / "user.tmp", b"draft")
    assert main(["cache", "list", str(r)]) == EXIT_OK  # nothing to list: side files only
    assert main(["cache", "clear", str(r)]) == EXIT_OK
    assert files_under(r) == {f"{KEY}/user.json", f"{KEY}/user.tmp"}


def test_clear_missing_roots(tmp_path, capsys):
    assert main(["cache", "clear"]) == EXIT_OK  # the default root: no run has saved yet
    assert "nothing to clear" in capsys.readouterr().out
    assert not os.path.exists(cache.default_cache_dir())  # and it is not created
    assert main(["cache", "clear", str(tmp_path / "nope")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_clear_default_root(capsys, real_cache_bytes):
    path = save(os.path.join(cache.default_cache_dir(), KEY, "gpu-3b6d1a2c.bin"), real_cache_bytes)
    assert main(["cache", "clear"]) == EXIT_OK
    assert f"removed {path}\n" in capsys.readouterr().out
    assert os.listdir(cache.default_cache_dir()) == []


def test_clear_reports_a_file_it_cannot_remove(gpu_root, capsys, monkeypatch):
    stuck = str(gpu_root / KEY / "rank0.bin")
    real_remove = os.remove

    def remove(path, *args, **kwargs):
        if str(path) == stuck:
            raise PermissionError(13, "Permission denied", path)
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", remove)
    assert main(["cache", "clear", str(gpu_root)]) == EXIT_INVALID
    captured = capsys.readouterr()
    assert f"could not remove {stuck}: Permission denied" in captured.err
    assert f"removed {stuck}" not in captured.out and f"removed {gpu_root / KEY / 'gpu-9f8e7d6c.bin'}" in captured.out
    assert files_under(gpu_root) == {"README", f"{KEY}/notes.txt", f"{KEY}/rank0.bin"}


def test_clear_on_a_read_only_root_reports_the_failure_not_no_files(gpu_root, capsys, monkeypatch):
    """os.remove fails with EROFS for every file: the run says what it could not remove and exits 1 (it said
    "no cache files" and exited 1). A real read-only mount: the next test."""

    def remove(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", path)

    before = files_under(gpu_root)
    monkeypatch.setattr(os, "remove", remove)
    assert main(["cache", "clear", str(gpu_root)]) == EXIT_INVALID
    captured = capsys.readouterr()
    assert "no cache files" not in captured.out and "removed" not in captured.out
    assert f"could not remove {gpu_root / KEY / 'gpu-3b6d1a2c.bin'}: Read-only file system" in captured.err
    assert f"error: could not remove 8 file(s) under {gpu_root} (see above); they are still there" in captured.err
    assert files_under(gpu_root) == before


def test_clear_on_a_real_read_only_mount(gpu_root):
    """``cache clear`` in a mount namespace where the root is bind-mounted read-only (unshare, no root needed)."""
    root = str(gpu_root)
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
        if os.path.exists("/usr/bin/unshare")
        else None
    )
    if probe is None or probe.returncode != 0:
        pytest.skip("no unshare -rm (user and mount namespaces) on this host")
    before = files_under(gpu_root)
    clear = f'"{sys.executable}" -m lightning_trt_rtx cache clear "{root}"'
    script = f'mount --bind -o ro "{root}" "{root}" && exec {clear}'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == EXIT_INVALID, proc.stderr
    assert "Read-only file system" in proc.stderr and "no cache files" not in proc.stdout
    assert f"error: could not remove 8 file(s) under {root}" in proc.stderr
    assert files_under(gpu_root) == before


@pytest.mark.parametrize("gpu", ["3b6d1a2", "3b6d1a2cz", "xyz", "", "GPU-", "3b6d1a2c-0000", "3b6d1a2c-0", "3b6d1a2c-"])
def test_clear_bad_gpu_id(gpu, gpu_root, capsys):
    before = files_under(gpu_root)
    assert main(["cache", "clear", str(gpu_root), "--gpu", gpu]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --gpu" in err and "8 hex digits" in err and "UUID" in err
    assert files_under(gpu_root) == before


# --- verify -----------------------------------------------------------------------------------------


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


def test_verify_a_directory_or_an_unreadable_file(tmp_path, capsys, monkeypatch):
    assert main(["cache", "verify", str(tmp_path)]) == EXIT_USAGE
    assert "not a regular file" in capsys.readouterr().err
    locked = tmp_path / "rank0.bin"
    locked.write_bytes(b"x")
    real_open = open

    def refuse(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    assert main(["cache", "verify", str(locked)]) == EXIT_INVALID
    assert "INVALID (unreadable: Permission denied)" in capsys.readouterr().out


# --- usage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        ([], "{cache,prewarm}"),
        (["cache"], "list,verify,clear"),
        (["cache", "frobnicate"], "'list', 'verify', 'clear'"),
        (["cache", "verify"], "files"),
        (["cache", "list", "--jsn"], "did you mean --json?"),
        (["purge"], "'cache'"),
        (["cache", "list", "a", "b"], "unrecognized arguments: b"),
        (["cache", "clear", "a", "b"], "unrecognized arguments: b"),
        (["cache", "clear", "--gpu"], "--gpu ID"),
        (["cache", "clear", "--dryrun"], "usage: lightning-trt-rtx cache clear [-h] [--gpu ID] [--dry-run] [root]"),
    ],
)
def test_bad_usage(argv, names, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage: lightning-trt-rtx" in err and "error:" in err
    assert names in err  # the error or its usage line names what is valid


def test_version(capsys):
    from importlib import metadata

    import torch

    from lightning_trt_rtx import __version__, _backend

    assert main(["--version"]) == EXIT_OK
    out = capsys.readouterr().out.strip()
    trt = _backend.installed_distribution()
    assert out == (
        f"lightning-trt-rtx {__version__} (torch {metadata.version('torch')}, {trt} {metadata.version(trt)},"
        f" lightning {metadata.version('lightning')})"
    )
    assert torch.__version__.split("+")[0] in out
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, json.dumps(["--version"])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert json.loads(proc.stdout.splitlines()[-1]) == {"code": 0, "heavy": []}  # read without importing them
    assert proc.stdout.splitlines()[0] == out


def test_help_exits_ok(capsys):
    assert main(["--help"]) == EXIT_OK
    assert "cache" in capsys.readouterr().out
    assert main(["cache", "--help"]) == EXIT_OK
    assert "clear" in capsys.readouterr().out
    assert main(["cache", "list", "--help"]) == EXIT_OK
    assert "--json" in capsys.readouterr().out
    assert main(["cache", "clear", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "--gpu ID" in out and "--dry-run" in out and cache.default_cache_dir() in out


# --- as a command -----------------------------------------------------------------------------------


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


# A fresh interpreter runs the command as ``python -m`` does, then says which heavy modules it imported.
IMPORTS_PROBE = """
import json, runpy, sys
sys.argv = ["lightning-trt-rtx", *json.loads(sys.argv[1])]
try:
    runpy.run_module("lightning_trt_rtx", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    code = exit_.code
heavy = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "torch_tensorrt", "tensorrt")
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy)}))
"""


@pytest.mark.parametrize("action", [["list"], ["list", "--json"], ["clear", "--dry-run"], ["clear"], ["verify"]])
def test_command_imports_neither_torch_nor_lightning(action, gpu_root):
    """The command starts fast: nothing on its path imports torch or Lightning (they took ~3 s)."""
    files = [str(gpu_root / KEY / "gpu-3b6d1a2c.bin")] if action == ["verify"] else [str(gpu_root)]
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, json.dumps(["cache", *action, *files])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"code": EXIT_OK, "heavy": []}


def test_console_script(good_root):
    script = os.path.join(os.path.dirname(sys.executable), "lightning-trt-rtx")
    if not os.path.exists(script):
        pytest.skip("the lightning-trt-rtx console script is not installed in this environment")
    proc = subprocess.run(
        [script, "cache", "list", good_root], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "rank0.bin" in proc.stdout and "rank1.bin" in proc.stdout


def test_list_into_a_closed_pipe(tmp_path):
    """``cache list | head -1``: no traceback when the reader stops early."""
    for r in range(2000):  # far more JSON than a pipe buffers
        write(tmp_path / "many" / KEY / f"rank{r}.bin", b"x")
    cmd = f"{sys.executable} -m lightning_trt_rtx cache list {tmp_path / 'many'} --json | head -1"
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout == "[\n"
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


# --- prewarm ----------------------------------------------------------------------------------------
# The command's own checks, on CPU. What it does on a GPU (the kernels it compiles, the cache it fills,
# the next process's first calls) is tests/gpu/test_gpu_prewarm.py.


@pytest.fixture
def program_file(tmp_path) -> str:
    """A file where a program is expected (its content matters only where ``load_program`` is real)."""
    return write(tmp_path / "model.ep", b"not read before the shapes and the GPU are checked")


def test_prewarm_missing_program_exits_2_before_importing_torch(tmp_path):
    missing = str(tmp_path / "nope.ep")
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, json.dumps(["prewarm", missing, "--shape", "8x16"])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"code": EXIT_USAGE, "heavy": []}
    assert f"error: no such program {missing!r} (does not exist)" in proc.stderr


def test_prewarm_a_directory_is_not_a_program(tmp_path, capsys):
    assert main(["prewarm", str(tmp_path), "--shape", "8x16"]) == EXIT_USAGE
    assert "no such program" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["8x", "8x16,", "8*16", "0x16"])
def test_prewarm_bad_shape_exits_2_naming_the_valid_form(program_file, shape, capsys):
    assert main(["prewarm", program_file, "--shape", "4x16", "--shape", shape]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"Invalid prewarm shape {shape!r}" in err
    assert "'8x128,8x128' (two inputs, one call)" in err


def test_prewarm_bad_dtype_exits_2_naming_the_valid_names(program_file, capsys):
    assert main(["prewarm", program_file, "--shape", "8x16", "--dtype", "fp8"]) == EXIT_USAGE
    assert "Valid names: float16, half, bfloat16, float32, int64, int32" in capsys.readouterr().err


def test_prewarm_needs_a_shape(program_file, capsys):
    assert main(["prewarm", program_file]) == EXIT_USAGE
    assert "--shape" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the host without a GPU")
def test_prewarm_without_a_gpu_exits_2(program_file, capsys):
    assert main(["prewarm", program_file, "--shape", "8x16"]) == EXIT_USAGE
    assert "prewarm compiles this GPU's kernels: run it on the GPU whose cache it fills" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["-1", "-7", "one", "1.5"])
def test_prewarm_device_below_0_or_not_a_number_exits_2(program_file, capsys, device):
    assert main(["prewarm", program_file, "--shape", "8x16", "--device", device]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"argument --device: {device!r} is not a CUDA device number: give 0 or more" in err
    assert "usage: lightning-trt-rtx prewarm" in err


def test_cuda_device_names_the_valid_device_numbers(monkeypatch):
    import torch

    from lightning_trt_rtx import _backend

    if not torch.cuda.is_available():
        assert _backend.cuda_device(0) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(IndexError, match=r"device 5 does not exist: this process sees 2 CUDA device\(s\), 0..1"):
        _backend.cuda_device(5)


class OnAGpu:
    """The command's GPU boundary faked (``_backend``: the device, the program, the GPU it was built
    for; ``cache.current_gpu``): what it loads runs on CPU."""

    def __init__(self, monkeypatch, program, built=None) -> None:
        import torch

        from lightning_trt_rtx import _backend

        self.loaded: list[str] = []
        monkeypatch.setattr(_backend, "cuda_device", lambda ordinal: torch.device("cpu"))
        monkeypatch.setattr(cache, "current_gpu", lambda: H100)

        def load(path: str):
            self.loaded.append(path)
            return program

        monkeypatch.setattr(_backend, "load_program", load)
        if built is not None:
            monkeypatch.setattr(_backend, "engine_target", lambda obj: built)


def engine_holder():
    """A module holding a real engine-less TorchTensorRTModule; its forward runs on CPU without it."""
    from torch import nn

    from tests.procs.lightning_models import ttm

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.engine = ttm("e0")
            self.shapes: list[tuple] = []

        def forward(self, *xs):
            self.shapes.append(tuple(tuple(x.shape) for x in xs) + tuple(x.dtype for x in xs))
            return xs[0]

    return Holder()


def test_prewarm_a_program_for_another_gpu_exits_2_naming_both(program_file, monkeypatch, capsys):
    from lightning_trt_rtx import _backend

    program = engine_holder()
    OnAGpu(monkeypatch, program, built=_backend.EngineTarget("sm89", "NVIDIA L4", False))
    assert main(["prewarm", program_file, "--shape", "8x16"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the program was built for another GPU: engine engine targets NVIDIA L4 (sm89)" in err
    assert f"this is {H100.name} (sm90, GPU {H100.id})" in err
    assert program.shapes == []  # nothing ran


def exported(min_batch: int = 2, max_batch: int = 64):
    """A real exported program (what torch_tensorrt.load(...).module() gives, less the engines)."""
    import torch

    class Scale(torch.nn.Module):
        def forward(self, x, mask):
            return x * mask

    batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
    dynamic = {"x": {0: batch}, "mask": {0: batch}}
    return torch.export.export(Scale(), (torch.randn(8, 16), torch.ones(8, 16)), dynamic_shapes=dynamic).module()


@pytest.mark.parametrize(
    ("shape", "why"),
    [
        ("8x16", "1 input(s) given"),
        ("128x16,128x16", "input 0 dimension 0 is 128, outside s"),
        ("8x15,8x16", "input 0 dimension 1 is 15, the program's is 16"),
    ],
)
def test_prewarm_a_shape_the_program_rejects_exits_2_with_what_it_takes(program_file, monkeypatch, capsys, shape, why):
    OnAGpu(monkeypatch, exported())
    assert main(["prewarm", program_file, "--shape", "8x16,8x16", "--shape", shape]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"the program does not accept --shape {shape} ({why}" in err
    assert "it takes 2 input(s): " in err and "x16 float32" in err and "in 2..64" in err


def test_prewarm_dtype_other_than_the_programs_exits_2(program_file, monkeypatch, capsys):
    OnAGpu(monkeypatch, exported())
    assert main(["prewarm", program_file, "--shape", "8x16,8x16", "--dtype", "float16"]) == EXIT_USAGE
    assert "--dtype float16: the program takes 2 input(s)" in capsys.readouterr().err


def test_prewarm_an_engine_error_exits_2_naming_the_shape(program_file, monkeypatch, capsys):
    program = engine_holder()

    def forward(*xs):
        raise RuntimeError("input shape outside the optimization profile")

    program.forward = forward
    OnAGpu(monkeypatch, program)
    assert main(["prewarm", program_file, "--shape", "8x16"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Prewarm call with input shape(s) 8x16 (float16) failed: RuntimeError: input shape outside" in err


def test_prewarm_fills_and_saves_this_gpus_cache(program_file, monkeypatch, capsys, tmp_path, real_cache_bytes):
    # on CPU nothing compiles: the run's kernels are faked at our boundary with a real TensorRT-RTX cache
    monkeypatch.setattr(cache.RunCache, "serialize", lambda self: real_cache_bytes)
    program = engine_holder()
    fake = OnAGpu(monkeypatch, program)
    template = str(tmp_path / "caches" / "gpu-{gpu}.bin")
    argv = ["prewarm", program_file, "--shape", "8x16", "--shape", "2x4,2x4", "--dtype", "int32", "--cache", template]
    code = main(argv)
    out = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    assert fake.loaded == [program_file]
    int32 = __import__("torch").int32
    # each shape eagerly, then again under the session's own (lazy) settings
    assert program.shapes == [((8, 16), int32), ((2, 4), (2, 4), int32, int32)] * 2
    path = str(tmp_path / "caches" / f"gpu-{H100.id}.bin")
    assert out[0].startswith("8x16: first call ") and out[1].startswith("2x4,2x4: first call ")
    assert out[2] == f"saved {len(real_cache_bytes)} bytes of GPU {H100.id}'s kernels ({H100.name}) to {path}"
    record = cache.read_record(path)
    assert record is not None and record.gpu_uuid == H100.uuid
    with open(path, "rb") as f:
        assert f.read() == real_cache_bytes


def test_prewarm_that_cannot_save_exits_1(program_file, monkeypatch, capsys, tmp_path):
    OnAGpu(monkeypatch, engine_holder())  # nothing compiled: the cache handle is empty
    assert main(["prewarm", program_file, "--shape", "8x16", "--cache", str(tmp_path / "c.bin")]) == EXIT_INVALID
    assert "not saved: nothing to save" in capsys.readouterr().err


def test_prewarm_help(capsys):
    assert main(["prewarm", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "--shape SHAPE" in out and "8x128,8x128" in out and "--device N" in out and "--cache TEMPLATE" in out
