"""TRTSettings: validated, immutable, serializable, and free of torch_tensorrt until applied."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lightning_trt_rtx import cache
from lightning_trt_rtx.settings import CUDA_GRAPH_STRATEGIES, KERNEL_STRATEGIES, TRTSettings


def test_defaults(tmp_path):
    s = TRTSettings()
    assert s.cuda_graph_strategy == "disabled"
    assert s.dynamic_shapes_kernel_specialization_strategy == "lazy"
    # conftest points the default cache dir at tmp_path/default-cache
    assert s.runtime_cache == os.path.join(
        str(tmp_path / "default-cache"), "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}.bin"
    )
    # one file per physical GPU (not per rank): every process on another GPU gets its own file
    assert cache.template_fields(s.runtime_cache) == ["sm", "trt", "cuda", "gpu"]
    assert cache.is_per_process(s.runtime_cache) and not cache.is_per_rank(s.runtime_cache)
    assert TRTSettings.keys() == (
        "cuda_graph_strategy",
        "dynamic_shapes_kernel_specialization_strategy",
        "runtime_cache",
    )


def test_default_cache_dir_is_read_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert TRTSettings().runtime_cache.startswith(str(tmp_path / "elsewhere") + os.sep)
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert TRTSettings().runtime_cache.startswith(os.path.join(str(tmp_path / "xdg"), "lightning-trt-rtx") + os.sep)


def test_kwargs(tmp_path):
    s = TRTSettings(
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=str(tmp_path / "{sm}" / "r{rank}-of-{world_size}.bin"),
    )
    assert s.cuda_graph_strategy == "whole_graph_capture"
    assert s.dynamic_shapes_kernel_specialization_strategy == "eager"
    assert s.runtime_cache == str(tmp_path / "{sm}" / "r{rank}-of-{world_size}.bin")
    assert TRTSettings(runtime_cache=None).runtime_cache is None
    # a PathLike becomes its string form (so equality, YAML and hashing work)
    p = TRTSettings(runtime_cache=tmp_path / "c.bin")
    assert p.runtime_cache == str(tmp_path / "c.bin") and isinstance(p.runtime_cache, str)
    assert p == TRTSettings(runtime_cache=str(tmp_path / "c.bin"))
    assert (
        TRTSettings(runtime_cache="s3://bucket/{sm}/rank{rank}.bin").runtime_cache == "s3://bucket/{sm}/rank{rank}.bin"
    )


def test_from_dict():
    s = TRTSettings.from_dict({"cuda_graph_strategy": "whole_graph_capture", "runtime_cache": None})
    assert s == TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    assert TRTSettings.from_dict({}) == TRTSettings()
    with pytest.raises(TypeError, match="mapping"):
        TRTSettings.from_dict([("cuda_graph_strategy", "disabled")])


def test_from_yaml_text_and_file(tmp_path):
    text = (
        "cuda_graph_strategy: whole_graph_capture\n"
        "dynamic_shapes_kernel_specialization_strategy: none\n"
        "runtime_cache: null\n"
    )
    expected = TRTSettings(
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="none",
        runtime_cache=None,
    )
    assert TRTSettings.from_yaml(text) == expected
    # one line of YAML (no newline) that is not a file name is parsed as YAML
    assert (
        TRTSettings.from_yaml("{cuda_graph_strategy: whole_graph_capture}").cuda_graph_strategy == "whole_graph_capture"
    )
    path = tmp_path / "trt.yaml"
    path.write_text(text)
    assert TRTSettings.from_yaml(path) == expected
    assert TRTSettings.from_yaml(str(path)) == expected
    (tmp_path / "empty.yaml").write_text("")
    assert TRTSettings.from_yaml(tmp_path / "empty.yaml") == TRTSettings()
    with pytest.raises(TypeError, match="mapping"):
        TRTSettings.from_yaml("- disabled\n- lazy\n")
    with pytest.raises(FileNotFoundError):
        TRTSettings.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "s",
    [
        TRTSettings(),
        TRTSettings(runtime_cache=None),
        TRTSettings(cuda_graph_strategy="whole_graph_capture", dynamic_shapes_kernel_specialization_strategy="eager"),
        TRTSettings(runtime_cache="~/caches/{host}/{{literal}}/n{node_rank}-l{local_rank}.bin"),
    ],
)
def test_dict_and_yaml_roundtrip(s):
    d = s.to_dict()
    assert list(d) == list(TRTSettings.keys())
    assert d["runtime_cache"] == s.runtime_cache
    assert TRTSettings.from_dict(d) == s
    y = s.to_yaml()
    assert y.splitlines()[0].startswith("cuda_graph_strategy:")
    assert TRTSettings.from_yaml(y) == s


@hsettings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    graphs=st.sampled_from(CUDA_GRAPH_STRATEGIES),
    kernels=st.sampled_from(KERNEL_STRATEGIES),
    parts=st.lists(
        st.one_of(
            st.sampled_from([f"{{{p}}}" for p in cache.PLACEHOLDERS]),
            st.text(alphabet="abc_-./ :{}#'\"", min_size=1, max_size=6).map(
                lambda t: t.replace("{", "{{").replace("}", "}}")
            ),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_yaml_roundtrip_property(graphs, kernels, parts):
    template = "".join(parts)
    if not template.strip() or template.endswith("/") or os.path.isdir(template):
        return  # rejected: no path, or a directory's
    s = TRTSettings(
        cuda_graph_strategy=graphs, dynamic_shapes_kernel_specialization_strategy=kernels, runtime_cache=template
    )
    assert TRTSettings.from_yaml(s.to_yaml()) == s
    assert TRTSettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("source", ["/nonexistent/settings", "cuda_graph_strategy=auto", "- a list"])
def test_yaml_that_holds_no_mapping_names_the_form_and_the_keys(source):
    with pytest.raises(TypeError, match=r"must hold a mapping \(e\.g\. 'cuda_graph_strategy: auto'\).*Valid keys"):
        TRTSettings.from_yaml(source)


def test_equality_hash_repr():
    a = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    b = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    c = TRTSettings(runtime_cache=None)
    assert a == b and a is not b
    assert hash(a) == hash(b)
    assert a != c
    assert len({a, b, c}) == 2
    assert {a: 1}[b] == 1
    assert a != a.to_dict()
    r = repr(a)
    assert r.startswith("TRTSettings(")
    assert "cuda_graph_strategy='whole_graph_capture'" in r
    assert "dynamic_shapes_kernel_specialization_strategy='lazy'" in r
    assert "runtime_cache=None" in r


def test_frozen():
    s = TRTSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.cuda_graph_strategy = "whole_graph_capture"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.runtime_cache = None
    assert s.cuda_graph_strategy == "disabled"
    changed = dataclasses.replace(s, cuda_graph_strategy="whole_graph_capture")
    assert changed.cuda_graph_strategy == "whole_graph_capture" and s.cuda_graph_strategy == "disabled"
    with pytest.raises(ValueError):
        dataclasses.replace(s, cuda_graph_strategy="sometimes")


def test_invalid_strategy_names_valid_choices():
    with pytest.raises(ValueError) as err:
        TRTSettings(cuda_graph_strategy="whole_graph")
    message = str(err.value)
    assert "'whole_graph'" in message
    assert "'disabled'" in message and "'whole_graph_capture'" in message
    assert "Did you mean 'whole_graph_capture'?" in message
    with pytest.raises(ValueError) as err:
        TRTSettings(dynamic_shapes_kernel_specialization_strategy="EAGER")
    message = str(err.value)
    assert "'lazy'" in message and "'eager'" in message and "'none'" in message
    assert "Did you mean 'eager'?" in message
    with pytest.raises(ValueError, match="Valid choices"):
        TRTSettings.from_yaml("dynamic_shapes_kernel_specialization_strategy: always\n")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cuda_graph_strategy": 1},
        {"cuda_graph_strategy": None},
        {"dynamic_shapes_kernel_specialization_strategy": True},
        {"runtime_cache": 5},
        {"runtime_cache": b"/tmp/x.bin"},
        {"runtime_cache": ["/tmp/x.bin"]},
    ],
)
def test_wrong_type(kwargs):
    with pytest.raises(TypeError):
        TRTSettings(**kwargs)


@pytest.mark.parametrize("keyword", ["DEFAULT", "Default", " default", "None", "none", "NULL", "null"])
def test_a_keyword_in_another_form_is_not_taken_as_a_file_name(keyword, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        TRTSettings(runtime_cache=keyword)
    message = str(err.value)
    assert f"Invalid runtime_cache {keyword!r}" in message and "a file named" in message
    assert "Valid choices: 'default'" in message and "None (YAML: null)" in message and "path template" in message
    with pytest.raises(ValueError, match="Valid choices: 'default'"):
        TRTSettings(runtime_cache=pathlib.Path(keyword))
    if keyword.strip() not in ("default", "null", "NULL"):  # YAML's null is None; its "None", "DEFAULT" strings
        with pytest.raises(ValueError, match="Valid choices: 'default'"):
            TRTSettings.from_yaml(f"runtime_cache: {keyword.strip()}\n")
    # the keyword itself, and paths that only contain such a name, stay valid
    assert TRTSettings(runtime_cache="default").runtime_cache == cache.default_template()
    assert TRTSettings(runtime_cache=f"./{keyword.strip()}").runtime_cache == f"./{keyword.strip()}"
    assert TRTSettings(runtime_cache=f"{keyword.strip()}.bin").runtime_cache == f"{keyword.strip()}.bin"
    assert list(tmp_path.iterdir()) == []


def test_unknown_key_names_valid_keys():
    with pytest.raises(TypeError) as err:
        TRTSettings.from_dict({"cuda_graphs": "whole_graph_capture", "runtime_cache": None})
    message = str(err.value)
    assert "cuda_graphs" in message
    valid = message.split("Valid keys")[1]
    assert all(
        key in valid
        for key in ("cuda_graph_strategy", "dynamic_shapes_kernel_specialization_strategy", "runtime_cache")
    )
    with pytest.raises(TypeError, match="Valid keys"):
        TRTSettings.from_yaml("cache: /tmp/x.bin\n")
    with pytest.raises(TypeError):
        TRTSettings(cache="/tmp/x.bin")


@pytest.mark.parametrize(
    "template",
    [
        "/tmp/{device}/rank{rank}.bin",
        "/tmp/{rank:03d}.bin",
        "/tmp/{rank!r}.bin",
        "/tmp/{}.bin",
        "/tmp/{0}.bin",
        "/tmp/{rank",
    ],
)
def test_bad_template_names_valid_placeholders(template):
    with pytest.raises(ValueError) as err:
        TRTSettings(runtime_cache=template)
    message = str(err.value)
    assert "Valid placeholders" in message
    for placeholder in cache.PLACEHOLDERS:
        assert "{" + placeholder + "}" in message


def test_blank_template_rejected():
    with pytest.raises(ValueError, match="pass None"):
        TRTSettings(runtime_cache="  ")


def test_to_runtime_settings(trt):
    handle = trt.runtime.RuntimeCache(path="", autosave_on_del=False)
    s = TRTSettings(cuda_graph_strategy="whole_graph_capture", dynamic_shapes_kernel_specialization_strategy="none")
    rs = s.to_runtime_settings(handle)
    assert isinstance(rs, trt.runtime.RuntimeSettings)
    assert rs.cuda_graph_strategy == "whole_graph_capture"
    assert rs.dynamic_shapes_kernel_specialization_strategy == "none"
    assert rs.runtime_cache is handle
    assert rs == s.to_runtime_settings(handle)  # same handle -> equal
    assert rs != s.to_runtime_settings(trt.runtime.RuntimeCache(path=""))  # handles compare by identity
    none = TRTSettings().to_runtime_settings()
    assert none.runtime_cache is None  # the template is never handed to torch_tensorrt as a path
    assert s.to_runtime_settings(handle, cuda_graph_strategy="disabled").cuda_graph_strategy == "disabled"


def test_construction_does_not_import_torch_tensorrt(tmp_path):
    code = """
        import sys
        from lightning_trt_rtx import TRTSettings
        s = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache="/tmp/{sm}/rank{rank}.bin")
        t = TRTSettings.from_yaml(s.to_yaml())
        assert t == s and hash(t) == hash(s) and repr(t) == repr(s)
        assert TRTSettings.from_dict(s.to_dict()) == s
        try:
            TRTSettings(cuda_graph_strategy="nope")
        except ValueError:
            pass
        assert 'torch_tensorrt' not in sys.modules
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, cache.CACHE_DIR_ENV: str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_path_object_template(tmp_path):
    template = pathlib.Path(tmp_path) / "{sm}" / "rank{rank}.bin"
    s = TRTSettings(runtime_cache=template)
    assert cache.Placement(rank=3, sm="sm90").resolve(s.runtime_cache) == str(tmp_path / "sm90" / "rank3.bin")


def test_default_cache_is_resolved_at_construction_not_import(tmp_path, monkeypatch):
    from lightning_trt_rtx import TRTRuntimePrecision, TRTRuntimeSettings

    monkeypatch.setenv("LIGHTNING_TRT_RTX_CACHE_DIR", str(tmp_path / "late"))
    expected = str(tmp_path / "late" / "{sm}-trtrtx{trt}-cuda{cuda}" / "gpu-{gpu}.bin")
    assert TRTSettings(runtime_cache="default").runtime_cache == expected
    assert TRTSettings().runtime_cache == expected
    assert TRTRuntimeSettings().settings.runtime_cache == expected
    assert TRTRuntimePrecision().settings.runtime_cache == expected


def test_from_yaml_names_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="No YAML file 'settings.yaml'"):
        TRTSettings.from_yaml("settings.yaml")
