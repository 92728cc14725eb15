"""Property-based fuzzing of every public constructor, the cache path templates and the CLI.

The contract for any input: either a valid object whose fields equal the input, or a ValueError /
TypeError whose message names what is valid (choices, keys or placeholders). Never another
exception type, and never a near-miss silently accepted (a strategy in another case, with
trailing whitespace, with a hyphen...). The CLI returns 0, 1 or 2 and never raises.

Run with ``-s`` to see the ``fuzz cases run: N`` summary line.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import re
import string
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimePrecision, TRTRuntimeSettings, TRTSettings, cache
from lightning_trt_rtx.__main__ import main
from lightning_trt_rtx.callbacks import _LOOPS
from lightning_trt_rtx.plugin import _PRECISIONS
from lightning_trt_rtx.settings import CUDA_GRAPH_STRATEGIES, KERNEL_STRATEGIES
from tests.conftest import FAKE_GPU, OTHER_GPU
from tests.reliability.workers import FIXTURE, make_payload

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    derandomize=True,  # CI sees the same cases every run: a failure there is reproducible here
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
CASES: collections.Counter = collections.Counter()
REAL_CACHE_BYTES = FIXTURE.read_bytes()
KEYS = TRTSettings.keys()
PLACEHOLDER_NAMES = cache.PLACEHOLDERS


@pytest.fixture(scope="module", autouse=True)
def _report_case_count():
    yield
    total = sum(CASES.values())
    detail = ", ".join(f"{name} {n}" for name, n in sorted(CASES.items()))
    print(f"\nfuzz cases run: {total} ({detail})")


# --- strategies -----------------------------------------------------------------------------------


def near_misses(choices: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Typos a user could plausibly make: case, whitespace, separators, truncation, invisible chars."""
    variants = [
        str.upper,
        str.title,
        str.swapcase,
        lambda c: c + " ",
        lambda c: " " + c,
        lambda c: c + "\n",
        lambda c: c + "\t",
        lambda c: c.replace("_", "-"),
        lambda c: c.replace("_", " "),
        lambda c: c.replace("_", ""),
        lambda c: c[:-1],
        lambda c: c + "s",
        lambda c: "\u200b" + c,
        lambda c: c + "\x00",
        lambda c: f"'{c}'",
    ]
    return (
        st.tuples(st.sampled_from(choices), st.sampled_from(variants))
        .map(lambda cv: cv[1](cv[0]))
        .filter(lambda v: v not in choices)
    )


def choice_values(choices: tuple[str, ...]) -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(choices),
        near_misses(choices),
        st.text(max_size=20),
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.binary(max_size=8),
        st.lists(st.sampled_from(choices), max_size=2),
    )


TEMPLATE_PIECES = st.one_of(
    st.sampled_from(
        [
            "{", "}", "{{", "}}", "/", "-", ".bin", "~", "rank", "!r", "!s", ":", ":03d", ".x", "[0]", "{}",
            "{0}", "{rank}", "{sm}", "{host}", "{world_size}", "{rank.x}", "{rank[0]}", "{rank!r}",
            "{rank:03d}", "{rank:}", "{rank:{sm}}", "{RANK}", "{ rank}", "{rank }", "{Rank}", "{rank-id}",
            "{local rank}", "{{rank}}", "{rank}}", "{{rank}", "\x00", " ",
        ]
        + [f"{{{p}}}" for p in PLACEHOLDER_NAMES]
    ),
    st.text(max_size=6),
)
templates = st.lists(TEMPLATE_PIECES, max_size=8).map("".join)

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|\{|\}")


def unknown_protocol(template: str) -> bool:
    """A URL protocol (``xyz://``) fsspec does not know: every load and save would fail on it."""
    import fsspec

    protocol = fsspec.core.split_protocol(template)[0]
    return protocol is not None and any(p not in fsspec.available_protocols() for p in protocol.split("::"))


def oracle_placeholders(template: str):
    """The placeholders of ``template`` in order, or None if a brace is neither an escape nor a known one."""
    fields = []
    for match in _TOKEN.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            return None
        name = match.group(1)
        if name.endswith(":"):  # "{rank:}" has an empty format spec: it is "{rank}"
            name = name[:-1]
        if name not in PLACEHOLDER_NAMES:
            return None
        fields.append(name)
    return fields


def oracle_fields(template: str):
    """Independent reading of a template: the placeholder list, or None where it must be rejected."""
    if not template.strip() or "\x00" in template:
        return None
    fields = oracle_placeholders(template)
    if fields is None or unknown_protocol(template):
        return None
    if names_a_directory(template, fields):
        return None
    return fields


def names_a_directory(template: str, fields: list[str]) -> bool:
    """A template ending in a separator, or a local one without placeholders that is an existing directory."""
    import fsspec

    if template.endswith("/"):
        return True
    literal = template.replace("{{", "{").replace("}}", "}")
    local = fsspec.core.split_protocol(template)[0] in (None, "file")
    return local and not fields and os.path.isdir(os.path.expanduser(literal))


def oracle_resolve(template: str, values: dict) -> str:
    def sub(match: re.Match) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return str(values[match.group(1).rstrip(":")])

    return os.path.expanduser(_TOKEN.sub(sub, template))


runtime_cache_values = st.one_of(
    st.none(),
    templates,
    templates.map(Path),
    st.integers(),
    st.binary(max_size=8),
    st.lists(st.text(max_size=3), max_size=2),
)


# --- oracles --------------------------------------------------------------------------------------


def expect_choice(name: str, value, choices: tuple[str, ...]):
    """None if ``value`` is valid, else (exception type, fragments its message must contain)."""
    if not isinstance(value, str):
        return TypeError, [repr(c) for c in choices]
    if value not in choices:
        return ValueError, [repr(c) for c in choices]
    return None


def expect_runtime_cache(value):
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        return TypeError, ["path template", "None"]
    if oracle_fields(value) is None:
        if not value.strip():
            return ValueError, ["must not be empty", "None"]
        if "\x00" in value:
            return ValueError, ["NUL"]
        if unknown_protocol(value) and oracle_fields(value.replace("://", "")) is not None:
            return ValueError, ["Unknown filesystem protocol", " s3,", " file,"]
        if oracle_placeholders(value) is not None:  # then what is wrong is the protocol, else the directory
            if unknown_protocol(value):
                return ValueError, ["Unknown filesystem protocol"]
            return ValueError, ["names a directory", "must name a file"]
        return ValueError, ["{" + p + "}" for p in PLACEHOLDER_NAMES]
    return None


def expect_settings_runtime_cache(value):
    """TRTSettings' runtime_cache: a keyword in another form ("DEFAULT", "None") is not a file name."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if isinstance(text, str) and text != "default" and text.strip().lower() in ("default", "none", "null"):
        return ValueError, ["'default'", "None", "path template"]
    return expect_runtime_cache(value)


def expect_settings(values: Mapping):
    """The first problem TRTSettings(**values) must report (fields are checked in declaration order)."""
    checks = [
        ("cuda_graph_strategy", lambda v: expect_choice("cuda_graph_strategy", v, CUDA_GRAPH_STRATEGIES)),
        (
            "dynamic_shapes_kernel_specialization_strategy",
            lambda v: expect_choice("dynamic_shapes_kernel_specialization_strategy", v, KERNEL_STRATEGIES),
        ),
        ("runtime_cache", expect_settings_runtime_cache),
    ]
    for key, check in checks:
        if key in values:
            problem = check(values[key])
            if problem:
                return problem
    return None


def check_outcome(build, problem):
    """Run ``build``; it must fail exactly as ``problem`` says, or succeed when ``problem`` is None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if problem is None:
            return build()
        expected_type, fragments = problem
        with pytest.raises((ValueError, TypeError)) as err:
            build()
    assert isinstance(err.value, expected_type), f"{type(err.value).__name__}: {err.value}"
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not named in: {message}"
    return None


def assert_fields(obj: TRTSettings, values: Mapping) -> None:
    defaults = TRTSettings()
    for key in KEYS:
        expected = values.get(key, getattr(defaults, key))
        if isinstance(expected, os.PathLike):
            expected = os.fspath(expected)
        elif key == "runtime_cache" and expected == "default":  # the documented alias of the default template
            expected = cache.default_template()
        assert getattr(obj, key) == expected
        assert type(getattr(obj, key)) is type(expected)


# --- TRTSettings ------------------------------------------------------------------------------------

setting_values = st.fixed_dictionaries(
    {},
    optional={
        "cuda_graph_strategy": choice_values(CUDA_GRAPH_STRATEGIES),
        "dynamic_shapes_kernel_specialization_strategy": choice_values(KERNEL_STRATEGIES),
        "runtime_cache": runtime_cache_values,
    },
)
key_typos = near_misses(KEYS) | st.sampled_from(["runtime-cache", "cache", "strategy", "cuda_graphs"])


@FUZZ
@given(values=setting_values, extra=st.dictionaries(key_typos | st.text(max_size=8), st.integers(), max_size=2))
def test_trt_settings_kwargs(values, extra):
    CASES["TRTSettings(**kwargs)"] += 1
    extra = {k: v for k, v in extra.items() if k not in KEYS}
    if extra:
        # Python's own keyword check runs first and names the unexpected keyword
        with pytest.raises(TypeError) as err:
            TRTSettings(**values, **extra)
        assert "unexpected keyword argument" in str(err.value), str(err.value)
        return
    obj = check_outcome(lambda: TRTSettings(**values), expect_settings(values))
    if obj is not None:
        assert_fields(obj, values)
        assert TRTSettings.from_dict(obj.to_dict()) == obj
        assert TRTSettings.from_yaml(obj.to_yaml()) == obj


@FUZZ
@given(
    values=st.one_of(
        setting_values,
        st.dictionaries(key_typos | st.sampled_from(KEYS) | st.integers(), st.text(max_size=5), max_size=3),
        st.lists(st.text(max_size=3), max_size=2),
        st.text(max_size=10),
        st.none(),
        st.integers(),
    )
)
def test_trt_settings_from_dict(values):
    CASES["TRTSettings.from_dict"] += 1
    if not isinstance(values, Mapping):
        problem = (TypeError, ["mapping"])
    elif any(k not in KEYS for k in values):
        problem = (TypeError, [repr(k) for k in KEYS])
    else:
        problem = expect_settings(values)
    obj = check_outcome(lambda: TRTSettings.from_dict(values), problem)
    if obj is not None:
        assert_fields(obj, values)


yaml_scalars = st.one_of(
    st.sampled_from(CUDA_GRAPH_STRATEGIES + KERNEL_STRATEGIES),
    near_misses(CUDA_GRAPH_STRATEGIES + KERNEL_STRATEGIES),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.integers(),
)


@FUZZ
@given(
    doc=st.one_of(
        st.dictionaries(
            st.sampled_from(KEYS) | key_typos, yaml_scalars | st.lists(yaml_scalars, max_size=2), max_size=3
        ),
        st.lists(yaml_scalars, max_size=3),
        yaml_scalars,
    ),
    as_file=st.booleans(),
)
def test_trt_settings_from_yaml_documents(doc, as_file, tmp_path):
    """Well-formed YAML: the same outcome as from_dict of what the YAML holds, from text or from a file."""
    CASES["TRTSettings.from_yaml (documents)"] += 1
    text = yaml.safe_dump(doc)
    values = yaml.safe_load(text)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        problem = (TypeError, ["mapping"])
    elif any(k not in KEYS for k in values):
        problem = (TypeError, [repr(k) for k in KEYS])
    else:
        problem = expect_settings(values)
    source = text
    if as_file:
        source = Path(tempfile.mkstemp(dir=tmp_path, suffix=".yaml")[1])
        source.write_text(text, encoding="utf-8")
    obj = check_outcome(lambda: TRTSettings.from_yaml(source), problem)
    if obj is not None:
        assert_fields(obj, values)


@FUZZ
@given(
    source=st.one_of(
        st.text(max_size=40),
        st.lists(
            st.sampled_from(
                ["{", "}", "[", "]", ":", "- ", "\n", "runtime_cache: ", "&a ", "*a", "!!python/object "
                 "", "'", '"', "\x00", "\t", "cuda_graph_strategy: disabled"]
            ),
            max_size=8,
        ).map("".join),
        st.binary(max_size=20),
        st.integers(),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )
)
def test_trt_settings_from_yaml_any_input(source, tmp_path, monkeypatch):
    """Malformed YAML, binary, non-text sources: a valid object or ValueError/TypeError, nothing else."""
    CASES["TRTSettings.from_yaml (any input)"] += 1
    monkeypatch.chdir(tmp_path)  # a one-line source is tried as a file name
    try:
        obj = TRTSettings.from_yaml(source)
    except (ValueError, TypeError) as err:
        message = str(err)
        named = KEYS + CUDA_GRAPH_STRATEGIES + KERNEL_STRATEGIES + ("YAML", "mapping")
        assert any(k in message for k in named), message
    else:
        assert isinstance(obj, TRTSettings)
        if isinstance(source, str):
            assert obj == TRTSettings.from_dict(yaml.safe_load(source) or {})


# --- templates --------------------------------------------------------------------------------------

placements = st.builds(
    cache.Placement,
    rank=st.integers(0, 4096),
    local_rank=st.integers(0, 16),
    node_rank=st.integers(0, 512),
    world_size=st.integers(1, 8192),
    sm=st.sampled_from(["cpu", "sm90", "sm120"]),
    trt=st.sampled_from(["none", "1.6.1.120"]),
    cuda=st.sampled_from(["none", "13.0"]),
    host=st.text(alphabet=string.ascii_letters + "-.{}", min_size=1, max_size=8),
    gpu=st.sampled_from([cache.Gpu(), FAKE_GPU, OTHER_GPU]),
)


def oracle_values(placement: cache.Placement) -> dict:
    """Placeholder values, read independently of ``Placement.values``: ``{gpu}`` is the UUID's first 8 hex digits."""
    values = {k: getattr(placement, k) for k in PLACEHOLDER_NAMES if k != "gpu"}
    values["gpu"] = placement.gpu.uuid.replace("-", "")[:8] if placement.gpu.uuid else "cpu"
    return values


def oracle_per_rank(fields: list) -> bool:
    """Every rank gets its own file: ``{rank}``, or ``{local_rank}`` with ``{node_rank}`` or ``{host}``."""
    return "rank" in fields or ("local_rank" in fields and bool({"node_rank", "host"} & set(fields)))


@FUZZ
@given(template=templates, placement=placements)
@example(template="[0]/{rank}.bin", placement=cache.Placement())
@example(template="cache/{rank}\x00.bin", placement=cache.Placement())
@example(template="~{rank}", placement=cache.Placement())
@example(template="~/{rank}", placement=cache.Placement())
@example(template="s4://bucket/{rank}.bin", placement=cache.Placement())  # a typo of s3: rejected up front
@example(template="cache/://{rank}", placement=cache.Placement())
@example(template="/c/{sm}/gpu-{gpu}.bin", placement=cache.Placement(gpu=FAKE_GPU))
@example(template="/c/gpu-{gpu}.bin", placement=cache.Placement())  # no CUDA: "cpu"
@example(template="/c/{host}-{local_rank}.bin", placement=cache.Placement())  # per rank without {rank}
def test_templates_fields_and_resolve(template, placement):
    CASES["template_fields / Placement.resolve"] += 1
    fields = oracle_fields(template)
    problem = expect_runtime_cache(template)
    got = check_outcome(lambda: cache.template_fields(template), problem)
    if fields is None:
        with pytest.raises(ValueError):
            placement.resolve(template)
        with pytest.raises(ValueError):
            placement.siblings_pattern(template)
        return
    assert got == fields
    assert cache.is_per_rank(template) == oracle_per_rank(fields)
    assert cache.is_per_process(template) == bool(set(fields) & set(cache.PROCESS_PLACEHOLDERS))
    assert placement.resolve(template) == oracle_resolve(template, oracle_values(placement))
    # the sibling glob of the same key matches this rank's own file
    import fnmatch

    assert fnmatch.fnmatchcase(placement.resolve(template), placement.siblings_pattern(template))


@settings(FUZZ, max_examples=150)
@given(relative=templates, placement=placements, body=st.integers(0, 64))
# regressions the fuzzer found: adjacent rank placeholders made the sibling glob "**" (a ValueError
# out of cache.load), glob characters in the directory name were not escaped (seeding never matched)
@example(relative="r{rank}{local_rank}.bin", placement=cache.Placement(), body=0)
@example(relative="run[1]/*/{host}{rank}.bin", placement=cache.Placement(host="h"), body=0)
@example(relative="a\x00b/{rank}", placement=cache.Placement(), body=0)
@example(relative="/{rank}", placement=cache.Placement(), body=0)  # "base//0": fsspec's glob saw nothing
@example(relative="x/../{rank}/./c", placement=cache.Placement(), body=0)
@example(relative="{rank}/", placement=cache.Placement(), body=0)
@example(relative="://", placement=cache.Placement(), body=0)  # cache.load raised "Protocol not known"
@example(relative="gpu-{gpu}.bin", placement=cache.Placement(gpu=FAKE_GPU), body=0)  # the default's file name
@example(relative="r{rank}.bin", placement=cache.Placement(gpu=FAKE_GPU), body=0)
def test_accepted_templates_load_and_save_without_raising(relative, placement, body, tmp_path):
    """Whatever template TRTSettings accepts, loading and saving through it warns at worst, never raises."""
    CASES["accepted template -> cache.load/save"] += 1
    base = tempfile.mkdtemp(dir=tmp_path)
    template = base + "/" + relative
    try:
        TRTSettings(runtime_cache=template)
    except ValueError:
        return
    resolved = placement.resolve(template)
    real = os.path.realpath(resolved)
    assume(real.startswith(os.path.realpath(base) + os.sep))  # never write outside the test's directory
    payload = make_payload(REAL_CACHE_BYTES, f"fuzz{body}", size=256 + body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, stats = cache.load(template, placement)
        assert data is None and stats.source == "cold"
        saved = cache.save(resolved, payload, placement=placement)
        if not saved.saved:
            assert saved.save_error
            return
        data, stats = cache.load(template, placement)
        # its own file, recorded as filled on this GPU: warm; without a GPU the record vouches for nothing
        assert data == payload and stats.source == ("warm" if placement.gpu.uuid else "unverified")
        # another rank on the same GPU under the same key, without a file of its own, starts from this one;
        # a rank on another GPU never does (kernels are bound to the GPU that compiled them)
        other_gpu = OTHER_GPU if placement.gpu != OTHER_GPU else FAKE_GPU
        for gpu in (placement.gpu, other_gpu):
            sibling = dataclasses.replace(placement, rank=placement.rank + 1, gpu=gpu)
            path = sibling.resolve(template)
            if path == resolved or os.path.lexists(path):
                continue
            if not os.path.realpath(path).startswith(os.path.realpath(base) + os.sep):
                continue
            data, stats = cache.load(template, sibling)
            if gpu.uuid and gpu == placement.gpu:
                assert (stats.source, data) == ("seeded", payload), (template, stats)
                assert os.path.realpath(stats.loaded_from) == os.path.realpath(resolved)
            else:
                assert (stats.source, data) == ("cold", None), (template, stats)


# --- callbacks and plugin -------------------------------------------------------------------------

loops_values = st.one_of(
    st.lists(st.sampled_from(_LOOPS), max_size=4),
    st.lists(st.sampled_from(_LOOPS) | near_misses(_LOOPS), min_size=1, max_size=3),
    st.lists(st.sampled_from(_LOOPS), min_size=1, max_size=3).map(tuple),
    st.lists(st.sampled_from(_LOOPS), min_size=1, max_size=3).map(iter),
    st.sampled_from(_LOOPS),
    near_misses(_LOOPS),
    st.none(),
    st.integers(),
    st.lists(st.integers() | st.none(), min_size=1, max_size=2),
)


def expect_loops(loops):
    """(accepted tuple, None) or (None, problem)."""
    fragments = [repr(loop) for loop in _LOOPS]
    if isinstance(loops, (str, bytes)) or not isinstance(loops, Iterable):
        return None, (TypeError, fragments)
    items = list(loops)
    if not all(isinstance(loop, str) for loop in items):
        return None, (TypeError, fragments)
    if not items or any(loop not in _LOOPS for loop in items):
        return None, (ValueError, fragments)
    return tuple(dict.fromkeys(items)), None


def _default_arg(cls):
    import inspect

    return inspect.signature(cls).parameters["runtime_cache"].default


def _replayable(value):
    """A fresh copy of an iterator argument for the oracle (the constructor consumes the original)."""
    if isinstance(value, Iterable) and iter(value) is value:
        items = list(value)
        return iter(items), items
    return value, value


@FUZZ
@given(values=setting_values, loops=loops_values, print_table=st.booleans())
def test_trt_runtime_settings_callback(values, loops, print_table):
    CASES["TRTRuntimeSettings(...)"] += 1
    loops, seen = _replayable(loops)
    accepted_loops, loop_problem = expect_loops(seen)
    problem = expect_settings(values) or loop_problem
    cb = check_outcome(lambda: TRTRuntimeSettings(**values, loops=loops, print_table=print_table), problem)
    if cb is not None:
        assert_fields(cb.settings, {"runtime_cache": _default_arg(TRTRuntimeSettings), **values})
        assert cb.loops == accepted_loops
        assert cb.print_table is print_table


targets_values = st.one_of(
    st.none(),
    st.lists(st.sampled_from(["model", "encoder", "trt_model", "_engine"]), max_size=3),
    st.lists(st.sampled_from(["model", "encoder"]), min_size=1, max_size=2).map(iter),
    st.lists(st.text(max_size=6), max_size=2),
    st.sampled_from(["model", "encoder"]),
    st.lists(st.integers() | st.none(), min_size=1, max_size=2),
    st.integers(),
)


@FUZZ
@given(targets=targets_values, loops=loops_values)
def test_trt_cuda_graphs_callback(targets, loops):
    CASES["TRTCudaGraphs(...)"] += 1
    targets, seen_targets = _replayable(targets)
    loops, seen_loops = _replayable(loops)
    accepted_loops, problem = expect_loops(seen_loops)
    if seen_targets is not None and (
        isinstance(seen_targets, (str, bytes))
        or not isinstance(seen_targets, Iterable)
        or not all(isinstance(t, str) and t.isidentifier() for t in seen_targets)
    ):
        problem = (TypeError, ["attribute names"])
    elif seen_targets is not None and len(list(seen_targets)) == 0:
        problem = (ValueError, ["pass None"])
    cb = check_outcome(lambda: TRTCudaGraphs(targets=targets, loops=loops), problem)
    if cb is not None:
        assert cb.targets == (list(seen_targets) if seen_targets is not None else None)
        assert cb.loops == accepted_loops


@settings(FUZZ, max_examples=200)
@given(
    precision=st.one_of(
        st.sampled_from(_PRECISIONS),
        near_misses(_PRECISIONS) | st.sampled_from(["16", "bf16", "32", "16-true", "64-true", "transformer-engine"]),
        st.integers(),
        st.none(),
        st.sampled_from(["precision-instance", "trt-instance"]),
    ),
    values=setting_values,
)
def test_trt_runtime_precision_plugin(precision, values):
    CASES["TRTRuntimePrecision(...)"] += 1
    from lightning.pytorch.plugins.precision import Precision

    if precision == "precision-instance":
        precision = Precision()
    elif precision == "trt-instance":
        precision = TRTRuntimePrecision()
    problem = expect_settings(values)
    if isinstance(precision, TRTRuntimePrecision):
        problem = (TypeError, ["TRTRuntimePrecision"])
    elif not isinstance(precision, Precision) and precision not in _PRECISIONS:
        problem = (ValueError, [repr(p) for p in _PRECISIONS])
    plugin = check_outcome(lambda: TRTRuntimePrecision(precision=precision, **values), problem)
    if plugin is not None:
        assert_fields(plugin.settings, {"runtime_cache": _default_arg(TRTRuntimePrecision), **values})
        if isinstance(precision, Precision):
            assert isinstance(plugin, type(precision)) and vars(precision).items() <= vars(plugin).items()
        elif precision == "16-mixed" and not torch.cuda.is_available():
            assert plugin.precision == "bf16-mixed"  # fp16 AMP is not supported on CPU: Lightning's choice too
        else:
            assert plugin.precision == precision


# --- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture
def cli_tree(tmp_path, real_cache_bytes):
    """A working directory with a valid file, a bad one, and cache roots (one with a dangling symlink)."""
    root = tmp_path / "cli"
    (root / "good" / "cpu-key").mkdir(parents=True)
    (root / "good" / "cpu-key" / "rank0.bin").write_bytes(real_cache_bytes)
    (root / "good" / "cpu-key" / "rank0.bin.lock").write_bytes(b"")
    (root / "mixed" / "k").mkdir(parents=True)
    (root / "mixed" / "k" / "rank0.bin").write_bytes(real_cache_bytes)
    (root / "mixed" / "k" / "rank1.bin").write_bytes(real_cache_bytes[:100])
    (root / "mixed" / "k" / "rank2.bin.corrupt").write_bytes(b"junk")
    (root / "mixed" / "k" / "rank3.bin.tmp").write_bytes(b"half")
    os.symlink(root / "gone.bin", root / "mixed" / "k" / "rank4.bin")  # dangling
    (root / "valid.bin").write_bytes(real_cache_bytes)
    (root / "invalid.bin").write_bytes(b"ptrt" + b"\0" * 40)
    (root / "empty").mkdir()
    return root


CLI_WORDS = [
    "cache", "list", "verify", "--json", "-h", "--help", "--js", "--json=1", "--", "-", "good", "mixed", "empty",
    "valid.bin", "invalid.bin", "missing.bin", "mixed/k/rank1.bin", "mixed/k/rank4.bin", "good/cpu-key", ".",
    "Cache", "LIST", "verify ", "",
]
argv_lists = st.lists(st.sampled_from(CLI_WORDS) | st.text(max_size=8), max_size=6).filter(
    lambda argv: not any(a.startswith(("/", "~")) or ".." in a for a in argv)  # stay inside the tree
)


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@FUZZ
@given(argv=argv_lists)
def test_cli_any_argv(argv, cli_tree, monkeypatch):
    CASES["CLI main(argv)"] += 1
    monkeypatch.chdir(cli_tree)
    code, out, err = run_cli(argv)
    assert type(code) is int and code in (0, 1, 2), (argv, code)
    if code == 2 and not (out or err):
        pytest.fail(f"exit 2 without saying why: {argv}")


@FUZZ
@given(
    argv=st.lists(
        st.sampled_from(["cache", "clear", "list", "--gpu", "--dry-run", "--dry", "3b6d1a2c", "GPU-3b6d1a2c", "zz",
                         "good", "mixed", "empty", ".", "valid.bin", "--json", "-h", ""]) | st.text(max_size=8),
        max_size=6,
    ).filter(lambda argv: not any(a.startswith(("/", "~")) or ".." in a for a in argv)),
)
def test_cli_any_argv_with_clear(argv, cli_tree, tmp_path_factory, monkeypatch):
    """``cache clear`` with any arguments: 0, 1 or 2, says why on 2, and never removes a file that is not ours."""
    import shutil

    CASES["CLI main(argv) with clear"] += 1
    tree = tmp_path_factory.mktemp("clear") / "cli"
    shutil.copytree(cli_tree, tree, symlinks=True)  # each example clears its own copy
    (tree / "good" / "README").write_text("not a cache")
    (tree / "mixed" / "k" / "notes.txt").write_text("not a cache either")
    monkeypatch.chdir(tree)
    code, out, err = run_cli(["cache", "clear", *argv])
    assert type(code) is int and code in (0, 1, 2), (argv, code)
    if code == 2:
        assert err, f"exit 2 without saying why: {argv}"
    assert (tree / "good" / "README").exists() and (tree / "mixed" / "k" / "notes.txt").exists()


@FUZZ
@given(files=st.lists(st.sampled_from(["valid.bin", "invalid.bin", "missing.bin", "empty", "mixed/k/rank1.bin",
                                       "mixed/k/rank0.bin", "mixed/k/rank4.bin"]), min_size=1, max_size=4))
def test_cli_verify_exit_code(files, cli_tree, monkeypatch):
    """``cache verify``: 2 if any path is missing, else 1 if any is invalid, else 0; one line per file."""
    CASES["CLI verify"] += 1
    monkeypatch.chdir(cli_tree)
    status = {"valid.bin": 0, "mixed/k/rank0.bin": 0, "invalid.bin": 1, "mixed/k/rank1.bin": 1}
    expected = max(status.get(f, 2) for f in files)
    code, out, err = run_cli(["cache", "verify", *files])
    assert code == expected
    assert len((out + err).strip().splitlines()) == len(files)


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_list_survives_unreadable_entries(cli_tree, as_json):
    """A dangling symlink in the root is reported as invalid, not a traceback; valid files still listed."""
    code, out, _ = run_cli(["cache", "list", str(cli_tree / "mixed")] + (["--json"] if as_json else []))
    assert code == 1
    assert "rank0.bin" in out and "rank4.bin" in out and "rank3.bin.tmp" not in out
    assert "rank2.bin.corrupt" in out and "quarantined by a run" in out
    code, out, _ = run_cli(["cache", "list", str(cli_tree / "good")])
    assert code == 0 and "rank0.bin" in out and ".lock" not in out
    # clearing removes what is provably ours; the dangling "rank4.bin" has only its name (a model's
    # "pytorch_model.bin" has that too), so it is listed but left where it is
    code, out, _ = run_cli(["cache", "clear", str(cli_tree / "mixed")])
    assert code == 0 and f"removed {cli_tree / 'mixed' / 'k' / 'rank0.bin'}" in out and "rank4.bin" not in out
    assert sorted(os.listdir(cli_tree / "mixed" / "k")) == ["rank3.bin.tmp", "rank4.bin"]  # the tmp: no cache tag


@FUZZ
@given(data=st.data())
def test_cli_clear_removes_exactly_what_list_calls_ours(data, tmp_path):
    """Any mix of caches, side files and other files: ``cache list`` lists the caches of ours and
    ``cache clear`` removes them with their side files, nothing else; ``--gpu`` only files a valid
    record ties to that GPU; ``--dry-run`` names the same files and removes none."""
    import json

    CASES["CLI list/clear"] += 1
    gpu_a = cache.Gpu(uuid="3b6d1a2c-0000-1111-2222-333344445555", name="NVIDIA H100 80GB HBM3", sm="sm90")
    gpu_b = cache.Gpu(uuid="9f8e7d6c-1a2b-4c3d-8e9f-ba9876543210", name="NVIDIA H100 80GB HBM3", sm="sm90")
    saved = tmp_path / "saved"  # saved once by the store, copied into each example's root
    if not saved.exists():
        for name, gpu in (("gpu-a.bin", gpu_a), ("gpu-b.bin", gpu_b), ("custom", gpu_a)):
            assert cache.save(str(saved / name), REAL_CACHE_BYTES, None, cache.Placement(gpu=gpu)).saved

    def run_files(name: str) -> dict:
        return {f"k/{name}{s}": (saved / f"{name}{s}").read_bytes() for s in ("", ".json", ".lock")}

    groups = {  # a cache of ours -> (its files, the GPU its record names)
        "gpu-a": (run_files("gpu-a.bin"), gpu_a.id),
        "gpu-b": (run_files("gpu-b.bin"), gpu_b.id),
        "custom": (run_files("custom"), gpu_a.id),  # not named .bin: its record says it is ours
        "rank0": ({"k/rank0.bin": REAL_CACHE_BYTES}, None),  # no record
        "rank1": ({"k/rank1.bin": REAL_CACHE_BYTES[:100], "k/rank1.bin.tmp": b"half"}, None),  # truncated
        "rank2": ({"k/rank2.bin.corrupt": b"junk"}, None),  # quarantined by a run
        "kernels": ({"kernels": REAL_CACHE_BYTES}, None),  # at the root, no .bin, no record: the tag says ours
        "gone": ({"k/gone.bin.json": (saved / "gpu-a.bin.json").read_bytes()}, None),  # record of a deleted file
    }
    others = {
        "README": b"# team caches\n",
        "k/notes.txt": b"H100 runs\n",
        "k/notes.txt.lock": b"",
        "k/config.json": b'{"format": "other"}',
        "k/data": b"\0" * 64,
        "k/user.tmp": b"draft",
        "k/sub/readme.md": b"hi",
    }
    chosen = data.draw(st.sets(st.sampled_from(sorted(groups))), label="caches")
    junk = data.draw(st.sets(st.sampled_from(sorted(others))), label="other files")
    gpu = data.draw(st.sampled_from([None, gpu_a.id, gpu_b.id, "deadbeef", "GPU-" + gpu_a.uuid.upper()]), label="gpu")
    dry_run = data.draw(st.booleans(), label="dry_run")

    root = Path(tempfile.mkdtemp(dir=tmp_path))
    files = {path: content for g in chosen for path, content in groups[g][0].items()}
    files.update({path: others[path] for path in junk})
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)

    def on_disk() -> set:
        return {os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names}

    def listed() -> tuple[int, dict]:
        code, out, err = run_cli(["cache", "list", str(root), "--json"])
        return code, {os.path.relpath(e["path"], root): e for e in json.loads(out)}

    code, entries = listed()
    caches = {p for g in chosen for p in groups[g][0] if not p.endswith((".json", ".lock", ".tmp"))}
    assert set(entries) == caches
    assert code == (1 if "rank1" in chosen else 0)  # a quarantined file is not a failure
    for g in chosen & {"gpu-a", "gpu-b", "custom"}:
        (path,) = [p for p in groups[g][0] if not p.endswith((".json", ".lock"))]
        assert entries[path]["gpu"] == groups[g][1] and entries[path]["gpu_name"] == gpu_a.name

    wanted = gpu_a.id if gpu and gpu.startswith("GPU-") else gpu
    removed = {p for g in chosen if wanted is None or groups[g][1] == wanted for p in groups[g][0]}
    argv = ["cache", "clear", str(root)] + (["--gpu", gpu] if gpu else []) + (["--dry-run"] if dry_run else [])
    code, out, err = run_cli(argv)
    assert (code, err) == (0, "")
    verb = "would remove " if dry_run else "removed "
    named = {line[len(verb) :] for line in out.splitlines() if line.startswith(verb + str(root))}
    assert named == {str(root / p) for p in removed}
    assert on_disk() == set(files) - (set() if dry_run else removed)
    assert root.is_dir()
    assert set(listed()[1]) == (caches if dry_run else caches - removed)
