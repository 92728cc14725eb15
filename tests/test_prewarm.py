"""Prewarm on CPU: shapes and example inputs, ``ServingSession.prewarm`` on real engine-less
``TorchTensorRTModule``s, the callback and the plugin in a real ``Trainer.predict``, and the checks the
command line makes on a saved program (a real ``torch.export`` program; the GPU an engine was built for
is faked at our boundary, ``_backend.engine_target``).

What the engines hold while each prewarm call runs is what a real engine would run that call with:
``Probe.forward`` records it. Whether the first real call is then fast needs a GPU:
``tests/gpu/test_gpu_prewarm.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_trt_rtx import ServingSession, TRTRuntimePrecision, TRTRuntimeSettings, TRTSettings, _backend, cache
from lightning_trt_rtx.prewarm import (
    DTYPES,
    PrewarmError,
    PrewarmSpec,
    check_program_gpu,
    check_shape,
    describe_inputs,
    example_inputs,
    format_shape,
    parse_dtype,
    parse_shape,
    program_inputs,
)
from tests.conftest import FAKE_GPU
from tests.procs.lightning_models import make_trainer, predict_loader, ttm

VALID_FORM = "'8x128,8x128' (two inputs"


class Probe(nn.Module):
    """Two engine-less engines that cannot run, and a forward that records what they hold at each call."""

    def __init__(self, log: list[dict[str, Any]], fail_at: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.e0 = ttm("e0")
        self.block = nn.Sequential(ttm("e1"))
        self.log = log
        self.fail_at = fail_at

    def engines(self) -> list[nn.Module]:
        return [self.e0, self.block[0]]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        held = [e.runtime_settings for e in self.engines()]
        self.log.append(
            {
                "shape": tuple(tuple(x.shape) for x in xs),
                "dtypes": [x.dtype for x in xs],
                "strategies": [s.dynamic_shapes_kernel_specialization_strategy for s in held],
                "handles": [s.runtime_cache for s in held],
                "inference": torch.is_inference_mode_enabled(),
            }
        )
        if self.fail_at is not None and tuple(xs[0].shape) == self.fail_at:
            raise RuntimeError("the engine rejects this shape")
        return xs[0].float().sum(dim=-1, keepdim=True)


# --- shapes, dtypes, example inputs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("8x128", ((8, 128),)),
        ("8x128,8x128", ((8, 128), (8, 128))),
        (" 4X3x16x16 , 4 ", ((4, 3, 16, 16), (4,))),
        ("1", ((1,),)),
    ],
)
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape
    assert parse_shape(format_shape(shape)) == shape


@pytest.mark.parametrize("text", ["", "8x", "x8", "8x0", "8x-1", "8*128", "eight", "8x128,", "8.5x2", "8xx2"])
def test_parse_shape_rejects_bad_text_showing_the_valid_form(text):
    with pytest.raises(ValueError, match="Valid form") as raised:
        parse_shape(text)
    assert VALID_FORM in str(raised.value) and repr(text) in str(raised.value)


def test_parse_shape_rejects_a_non_string():
    with pytest.raises(TypeError, match="8x128"):
        parse_shape((8, 128))  # type: ignore[arg-type]


def test_parse_dtype():
    assert parse_dtype("float16") is parse_dtype("half") is parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("BFloat16") is torch.bfloat16 and parse_dtype(torch.int32) is torch.int32
    assert {parse_dtype(name) for name in DTYPES} == {
        torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.int32
    }
    with pytest.raises(ValueError, match="Valid names: float16, half, bfloat16, float32, int64, int32"):
        parse_dtype("float8")


def test_example_inputs_one_tuple_per_shape_entry():
    floats = example_inputs(["8x16", parse_shape("2x3,2x5")], "bfloat16", "cpu")
    assert [tuple(t.shape for t in e) for e in floats] == [((8, 16),), ((2, 3), (2, 5))]
    assert all(t.dtype is torch.bfloat16 and t.device.type == "cpu" for e in floats for t in e)
    assert floats[0][0].std() > 0  # random values, not a constant
    (ids,) = example_inputs(["4x32"], "int64")
    assert ids[0].dtype is torch.int64 and not ids[0].any()  # zeros: valid token ids
    (mixed,) = example_inputs(["4x32,4x32"], ["int64", torch.float16])  # one dtype per input
    assert [t.dtype for t in mixed] == [torch.int64, torch.float16]


@pytest.mark.parametrize(
    ("shapes", "dtype", "error", "match"),
    [
        ([], "float16", ValueError, "No prewarm shapes"),
        ("8x16", "float16", TypeError, "list of shapes"),
        (["8x16"], "float64", ValueError, "Valid names"),
        (["8x16,8x16"], ["float16"], ValueError, "2 inputs but only 1 dtypes"),
        (["8x"], "float16", ValueError, "Valid form"),
    ],
)
def test_example_inputs_rejects_bad_input(shapes, dtype, error, match):
    with pytest.raises(error, match=match):
        example_inputs(shapes, dtype)


# --- ServingSession.prewarm -----------------------------------------------------------------------


def calls(log: list[dict[str, Any]]) -> list[tuple[Any, list[str]]]:
    return [(entry["shape"], entry["strategies"]) for entry in log]


def test_prewarm_runs_each_shape_eagerly_then_gives_the_sessions_settings_back(tmp_path, fake_gpu):
    log: list[dict[str, Any]] = []
    model = Probe(log)
    priors = [e.runtime_settings for e in model.engines()]
    settings = TRTSettings(runtime_cache=str(tmp_path / "k.bin"))  # lazy: the default
    with ServingSession(model, settings) as session:
        handle = session.cache.handle
        records = session.prewarm(example_inputs(["8x16", "2x16"], "float32"))
        held = [e.runtime_settings for e in model.engines()]
        model(torch.zeros(8, 16))  # the first real call
        assert session.figures.prewarmed == 2

    eager, lazy = ["eager", "eager"], ["lazy", "lazy"]
    assert calls(log) == [
        (((8, 16),), eager),  # the kernels compile synchronously, into the run's cache
        (((2, 16),), eager),
        (((8, 16),), lazy),  # the session's own settings back: the context is made again before the first batch
        (((2, 16),), lazy),
        (((8, 16),), lazy),  # the real call
    ]
    assert all(h is handle for entry in log for h in entry["handles"])  # one cache handle throughout
    assert all(entry["inference"] for entry in log[:4]) and not log[4]["inference"]
    assert all(s.dynamic_shapes_kernel_specialization_strategy == "lazy" and s.runtime_cache is handle for s in held)
    assert [r.text for r in records] == ["8x16", "2x16"] and [r.shape for r in records] == [((8, 16),), ((2, 16),)]
    assert all(r.first_call_ms >= 0 and r.served_ms is not None and r.served_ms >= 0 for r in records)
    assert all(e.runtime_settings is p for e, p in zip(model.engines(), priors))  # closing restored them
    assert session.figures.prewarmed == 2 and session.figures.metrics()["trt_rtx/prewarmed"] == 2.0


def test_prewarm_under_eager_settings_changes_nothing_and_runs_each_shape_once(tmp_path, fake_gpu):
    log: list[dict[str, Any]] = []
    model = Probe(log)
    settings = TRTSettings(dynamic_shapes_kernel_specialization_strategy="eager", runtime_cache=None)
    with ServingSession(model, settings) as session:
        (record,) = session.prewarm([torch.zeros(4, 16)])
    assert calls(log) == [(((4, 16),), ["eager", "eager"])]
    assert record.served_ms is None


def test_without_a_cache_prewarm_runs_each_shape_once_under_the_sessions_settings(fake_gpu, messages):
    # the eager kernels would live only in the execution context the switch back drops
    log: list[dict[str, Any]] = []
    with ServingSession(Probe(log), TRTSettings(runtime_cache=None)) as session:
        (record,) = session.prewarm([torch.zeros(4, 16)])
    assert calls(log) == [(((4, 16),), ["lazy", "lazy"])]
    assert record.served_ms is None and session.figures.prewarmed == 1
    assert any("Prewarm without a kernel cache" in m for m in messages.infos)


def test_prewarm_calls_the_target_attribute(fake_gpu):
    log: list[dict[str, Any]] = []
    holder = nn.Module()
    holder.net = Probe(log)
    with ServingSession(holder, TRTSettings()) as session:
        session.prewarm([(torch.zeros(2, 4), torch.zeros(2, 6))], target="net")
        with pytest.raises(AttributeError, match=r"no callable attribute 'nett'.*Compiled attributes found: \['net'\]"):
            session.prewarm([torch.zeros(2, 4)], target="nett")
    assert calls(log)[0] == (((2, 4), (2, 6)), ["eager", "eager"])


def test_a_failing_call_names_its_shape_and_the_settings_still_come_back(fake_gpu):
    log: list[dict[str, Any]] = []
    model = Probe(log, fail_at=(3, 16))
    with ServingSession(model, TRTSettings()) as session:
        failed = r"input shape.s. 3x16 \(float32\) failed: RuntimeError: the engine rejects this shape$"
        with pytest.raises(PrewarmError, match=failed) as raised:
            session.prewarm(example_inputs(["8x16", "3x16", "5x16"], "float32"))
        assert raised.value.shape == ((3, 16),) and isinstance(raised.value.__cause__, RuntimeError)
        assert [e.runtime_settings.dynamic_shapes_kernel_specialization_strategy for e in model.engines()] == [
            "lazy",
            "lazy",
        ]
        assert session.figures.prewarmed == 0
    assert [entry["shape"] for entry in log] == [((8, 16),), ((3, 16),)]  # stopped at the failing shape


def test_without_engines_the_calls_do_not_run_and_you_are_told_once(messages):
    seen: list[tuple[int, ...]] = []

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return x

    with ServingSession(Plain(), TRTSettings(runtime_cache=None)) as session:
        assert session.prewarm(example_inputs(["2x2", "3x2"], "float32")) == []
        assert session.prewarm([torch.zeros(1, 2)]) == []
        assert session.figures.prewarmed == 0
    assert seen == []  # nothing to compile: the model's own ops did not run on made-up inputs
    (message,) = messages.matching("Prewarm skipped: no TensorRT engines under Plain")  # once per process
    assert "its calls did not run" in message


class FloatModel(LightningModule):
    """An fp32 CPU model without engines, as a new user's first try."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch)


@pytest.mark.parametrize("component", ["callback", "plugin"])
def test_the_readme_prewarm_arguments_on_a_model_without_engines_do_not_break_predict(tmp_path, messages, component):
    """The README's snippet, float16 shapes, on an fp32 model without engines: predict runs, prewarm says once
    that it did not run (it made predict raise a dtype error from the model's Linear)."""
    kwargs = dict(prewarm_shapes=["8x128", "32x128"], prewarm_dtype="float16", prewarm_target=None)
    if component == "callback":
        trainer = make_trainer(tmp_path, [TRTRuntimeSettings(**kwargs)])
    else:
        trainer = make_trainer(tmp_path, plugins=[TRTRuntimePrecision(**kwargs)])
    loader = torch.utils.data.DataLoader(torch.randn(12, 128), batch_size=4)
    out = trainer.predict(FloatModel(), loader)
    assert [o.shape for o in out] == [(4, 2)] * 3 and all(o.dtype is torch.float32 for o in out)
    assert len(messages.matching("Prewarm skipped: no TensorRT engines under FloatModel")) == 1
    assert not [m for m in messages.infos if m.startswith("TensorRT-RTX prewarm")]


def test_a_prewarm_dtype_the_model_refuses_names_both_dtypes(tmp_path, fake_gpu):
    """With engines the calls run: fp16 examples into an fp32 model fail with a message naming the dtypes
    the model takes and the valid names, not only the model's own error from deep inside."""

    class WithEngines(FloatModel):
        def __init__(self) -> None:
            super().__init__()
            self.trt = nn.Sequential(ttm("e0"))  # a compiled attribute: engines to prewarm (engine-less here)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    callback = TRTRuntimeSettings(prewarm_shapes=["8x128"], prewarm_dtype="float16", prewarm_target="forward")
    with pytest.raises(PrewarmError) as raised:
        make_trainer(tmp_path, [callback]).predict(WithEngines(), predict_loader(features=128))
    text = str(raised.value)
    assert text.startswith("Prewarm call with input shape(s) 8x128 (float16) failed: RuntimeError:")
    assert "The example inputs were float16 and WithEngines's parameters are float32" in text
    assert "prewarm_dtype" in text and "valid names: float16, half, bfloat16, float32, int64, int32" in text


def test_prewarm_needs_an_open_session_with_a_module(fake_gpu):
    with pytest.raises(ValueError, match="needs the session's module"):
        ServingSession(settings=TRTSettings(runtime_cache=None)).prewarm([torch.zeros(1)])
    session = ServingSession(Probe([]), TRTSettings(runtime_cache=None))
    with pytest.raises(ValueError, match="no inputs"):
        session.prewarm([])
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.prewarm([torch.zeros(1)])


def test_open_graph_scopes_are_closed_for_the_calls_and_opened_again(fake_gpu, monkeypatch):
    from tests.test_callbacks import GraphsWrapper, RecordingCudaGraphs

    recorder = RecordingCudaGraphs(wrap=True)
    monkeypatch.setattr(_backend, "enable_cudagraphs", recorder)
    log: list[dict[str, Any]] = []
    holder = nn.Module()
    holder.net = Probe(log)
    with ServingSession(holder, TRTSettings()) as session:
        session.open_graphs()
        assert isinstance(holder.net, GraphsWrapper)
        session.prewarm([torch.zeros(2, 4)], target="net")  # the real module runs, not a capture of it
        assert isinstance(holder.net, GraphsWrapper) and session.graphs.is_open
    assert len(log) == 2 and len(recorder.entered()) == 2 and len(recorder.exited()) == 2
    assert isinstance(holder.net, Probe)


# --- the callback and the plugin ------------------------------------------------------------------


class Served(LightningModule):
    """A LightningModule whose only compiled attribute is ``net``; ``predict_step`` calls it."""

    def __init__(self, log: list[dict[str, Any]], features: int = 4) -> None:
        super().__init__()
        self.net = Probe(log)
        self.linear = nn.Linear(features, 2)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.net(batch)
        return self.linear(batch)


def test_callback_prewarms_before_the_first_batch_once(tmp_path, fake_gpu, messages):
    log: list[dict[str, Any]] = []
    cb = TRTRuntimeSettings(
        runtime_cache=str(tmp_path / "k.bin"), prewarm_shapes=["2x4", "7x4"], prewarm_dtype="float32"
    )
    out = make_trainer(tmp_path, [cb]).predict(Served(log), predict_loader(batches=3))

    assert len(out) == 3
    eager, lazy = ["eager", "eager"], ["lazy", "lazy"]
    assert calls(log) == [
        (((2, 4),), eager),
        (((7, 4),), eager),
        (((2, 4),), lazy),
        (((7, 4),), lazy),
        *[(((2, 4),), lazy)] * 3,  # the three batches
    ]
    assert all(entry["dtypes"] == [torch.float32] for entry in log[:4])
    (figures,) = cb.figures
    assert figures.prewarmed == 2 and figures.batches == 3  # prewarm is not timed as a batch
    (line,) = [m for m in messages.infos if m.startswith("TensorRT-RTX prewarm")]
    assert line.startswith("TensorRT-RTX prewarm: 2 shape(s) in") and "2x4" in line and "7x4" in line


def test_callback_prewarm_target_forward_runs_the_lightning_modules_forward(tmp_path, fake_gpu):
    log: list[dict[str, Any]] = []

    class WithForward(Served):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x * 2)

    cb = TRTRuntimeSettings(
        prewarm_shapes=["3x4"], prewarm_dtype="float32", prewarm_target="forward"
    )
    make_trainer(tmp_path, [cb]).predict(WithForward(log), predict_loader(batches=1))
    assert calls(log)[:2] == [(((3, 4),), ["eager", "eager"]), (((3, 4),), ["lazy", "lazy"])]


def test_callback_with_several_compiled_attributes_asks_for_a_target(tmp_path, fake_gpu):
    model = Served([])
    model.other = Probe([])
    cb = TRTRuntimeSettings(prewarm_shapes=["3x4"])
    with pytest.raises(ValueError, match=r"several compiled attributes \['net', 'other'\].*prewarm_target"):
        make_trainer(tmp_path, [cb]).predict(model, predict_loader(batches=1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prewarm_shapes": ["8x"]}, ValueError, "Valid form"),
        ({"prewarm_shapes": "8x128"}, TypeError, "list of shapes"),
        ({"prewarm_shapes": []}, ValueError, "No prewarm shapes"),
        ({"prewarm_shapes": ["8x4"], "prewarm_dtype": "fp16"}, ValueError, "Valid names: float16, half"),
        ({"prewarm_dtype": "fp16"}, ValueError, "Valid names"),  # checked even without shapes
        ({"prewarm_shapes": ["8x4"], "prewarm_target": "not a name"}, TypeError, "identifier"),
        # shapes given as numbers are held to what the text form allows: positive integer dimensions
        ({"prewarm_shapes": [((-8, 128),)]}, ValueError, "every dimension must be a positive int"),
        ({"prewarm_shapes": [((0, 128),)]}, ValueError, "every dimension must be a positive int"),
        ({"prewarm_shapes": [((8.9, 128),)]}, ValueError, "every dimension must be a positive int"),
        ({"prewarm_shapes": [((True, 128),)]}, ValueError, "every dimension must be a positive int"),
        ({"prewarm_shapes": [()]}, ValueError, "every dimension must be a positive int"),
    ],
)
@pytest.mark.parametrize("component", [TRTRuntimeSettings, TRTRuntimePrecision])
def test_prewarm_arguments_are_checked_at_construction(component, kwargs, error, match):
    with pytest.raises(error, match=match):
        component(**kwargs)


def test_plugin_prewarms_as_the_first_step_starts_once(tmp_path, fake_gpu, messages):
    log: list[dict[str, Any]] = []
    plugin = TRTRuntimePrecision(prewarm_shapes=["5x4"], prewarm_dtype="float32")
    make_trainer(tmp_path, plugins=[plugin]).predict(Served(log), predict_loader(batches=2))
    assert calls(log) == [
        (((5, 4),), ["eager", "eager"]),
        (((5, 4),), ["lazy", "lazy"]),
        (((2, 4),), ["lazy", "lazy"]),
        (((2, 4),), ["lazy", "lazy"]),
    ]
    assert len([m for m in messages.infos if m.startswith("TensorRT-RTX prewarm: 1 shape(s)")]) == 1


def test_plugin_prewarm_with_the_callback_runs_at_the_callbacks_loop_start(tmp_path, fake_gpu):
    log: list[dict[str, Any]] = []
    plugin = TRTRuntimePrecision(prewarm_shapes=["5x4"], prewarm_dtype="float32")
    cb = TRTRuntimeSettings()
    make_trainer(tmp_path, [cb], plugins=[plugin]).predict(Served(log), predict_loader(batches=2))
    assert [entry["shape"] for entry in log] == [((5, 4),), ((5, 4),), ((2, 4),), ((2, 4),)]
    assert cb.figures[0].prewarmed == 1 and cb.figures[0].batches == 2


def test_example_inputs_takes_shapes_as_numbers_and_names_the_dtypes_for_a_bad_one():
    import numpy as np

    (example,) = example_inputs([((np.int64(2), 3), (2, 4))], ["float32", "int64"])
    assert [tuple(t.shape) for t in example] == [(2, 3), (2, 4)] and example[1].dtype == torch.int64
    for dtype in (None, 5):
        with pytest.raises(ValueError, match="Valid names: float16, half, bfloat16, float32, int64, int32"):
            example_inputs(["8x4"], dtype)


def test_prewarm_spec_is_none_without_shapes():
    assert PrewarmSpec.from_args(None, "float16", None) is None
    spec = PrewarmSpec.from_args(["8x4", "2x4,2x4"], "half", "net")
    assert spec == PrewarmSpec((((8, 4),), ((2, 4), (2, 4))), torch.float16, "net")


# --- what a saved program accepts, and which GPU it was built for ---------------------------------


class Stub:
    """Answers ``__getstate__`` as a torchbind Engine does: (serialized info, type name)."""

    def __init__(self, device: str, hardware_compatible: str = "0", aliased_io: str = "") -> None:
        self.info = ["10", "e", device, b"", "", "", hardware_compatible, "", "", "0", "0", "0", aliased_io]

    def __getstate__(self) -> tuple[list[Any], str]:
        return self.info, "__torch__.torch.classes.tensorrt.Engine"


def test_engine_target_reads_the_serialized_device_info(trt):
    from torch_tensorrt.dynamo.runtime import _serialized_engine_layout as layout

    assert (_backend._DEVICE_IDX, _backend._HW_COMPATIBLE_IDX, _backend._ALIASED_IO_IDX) == (
        layout.DEVICE_IDX, layout.HW_COMPATIBLE_IDX, layout.ALIASED_IO_IDX
    )  # fmt: skip
    assert layout.SERIALIZED_RT_DEVICE_DELIM == "%"
    target = _backend.engine_target(Stub("0%8%9%1%NVIDIA L4", "1"))
    assert target == _backend.EngineTarget(sm="sm89", name="NVIDIA L4", hardware_compatible=True)
    assert _backend.engine_target(Stub("garbage")) is None
    assert _backend.engine_target(ttm("not set up")) is None  # no engine yet: unknown


@pytest.mark.parametrize(
    ("built", "problem"),
    [
        (_backend.EngineTarget("sm90", "NVIDIA H200", False), None),  # same SM, another model name: runs
        (_backend.EngineTarget("sm89", "NVIDIA L4", True), None),  # hardware compatible, both Ampere+
        (_backend.EngineTarget("sm89", "NVIDIA L4", False), "targets NVIDIA L4 (sm89)"),
        (_backend.EngineTarget("sm75", "Tesla T4", True), "targets Tesla T4 (sm75)"),
    ],
)
def test_check_program_gpu(monkeypatch, built, problem):
    monkeypatch.setattr(_backend, "engine_target", lambda obj: built)
    found = check_program_gpu(Probe([]), FAKE_GPU)
    if problem is None:
        assert found is None
    else:
        assert problem in found and f"{FAKE_GPU.name} (sm90, GPU {FAKE_GPU.id})" in found


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * mask


def exported_program() -> nn.Module:
    """What ``torch_tensorrt.load(path).module()`` gives, less the engines: a dynamic batch of 2..64."""
    batch = torch.export.Dim("batch", min=2, max=64)
    example = (torch.randn(8, 16), torch.ones(8, 4))
    return torch.export.export(TwoInputs(), example, dynamic_shapes={"x": {0: batch}, "mask": {0: batch}}).module()


def test_program_inputs_and_the_shapes_it_rejects():
    inputs, ranges = program_inputs(exported_program())
    ((symbol, bounds),) = ranges.items()
    assert bounds == (2, 64)
    assert [i.dims for i in inputs] == [(symbol, 16), (symbol, 4)]
    assert describe_inputs(inputs, ranges) == (
        f"2 input(s): {symbol}x16 float32, {symbol}x4 float32 ({symbol} in 2..64)"
    )
    assert check_shape(parse_shape("8x16,8x4"), inputs, ranges) is None
    assert check_shape(parse_shape("64x16,64x4"), inputs, ranges) is None
    assert check_shape(parse_shape("8x16"), inputs, ranges) == "1 input(s) given"
    assert "outside" in check_shape(parse_shape("65x16,65x4"), inputs, ranges)
    assert "outside" in check_shape(parse_shape("1x16,1x4"), inputs, ranges)
    assert check_shape(parse_shape("8x15,8x4"), inputs, ranges) == "input 0 dimension 1 is 15, the program's is 16"
    assert "must be equal" in check_shape(parse_shape("8x16,4x4"), inputs, ranges)
    assert "3 dimension(s), the program's has 2" in check_shape(parse_shape("8x16x1,8x4"), inputs, ranges)
    assert program_inputs(Probe([])) is None  # not an exported program: nothing recorded


def test_the_cache_template_default_is_per_gpu():
    assert "{gpu}" in cache.default_template()  # what the command line's --cache defaults to
