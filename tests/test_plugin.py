"""TRTRuntimePrecision in a real Trainer on CPU, alone and next to the TRTRuntimeSettings callback."""

from __future__ import annotations

import copy
import pickle
import signal
from typing import Any

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ThroughputMonitor, throughput_monitor
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy

from lightning_trt_rtx import TRTRuntimePrecision, TRTRuntimeSettings, _backend, cache
from tests.conftest import FAKE_GPU
from tests.procs.lightning_models import EngineModel, SessionSpy, make_trainer, predict_loader

NO_ENGINES = "No TensorRT engines found"
REPORT = "TensorRT-RTX serving"  # the plugin's one-line summary ("...: ") and the callback's table ("... (strategy):")


def snapshot(model: EngineModel) -> list[Any]:
    return [e.runtime_settings for e in model.engines()]


def assert_restored(model: EngineModel, prior: list[Any]) -> None:
    assert all(a is b for a, b in zip(snapshot(model), prior, strict=True))


def assert_served(seen: list[Any], strategy: str, kernel: str = "lazy") -> Any:
    assert len(seen) == 3
    assert len({id(rs.runtime_cache) for rs in seen}) == 1
    assert all(rs.cuda_graph_strategy == strategy for rs in seen)
    assert all(rs.dynamic_shapes_kernel_specialization_strategy == kernel for rs in seen)
    return seen[0].runtime_cache


def seed_sibling(tmp_path, data: bytes) -> str:
    """A valid cache for another rank, recorded as filled on FAKE_GPU: on that GPU (the ``fake_gpu``
    fixture) rank 0 starts seeded from it (seeding is only from same-GPU files); its own file appears
    only if it is saved."""
    stats = cache.save(str(tmp_path / "rank5.bin"), data, placement=cache.Placement(rank=5, gpu=FAKE_GPU))
    assert stats.saved, stats.save_error
    return str(tmp_path / "rank{rank}.bin")


def reports(messages) -> list[str]:
    """Every serving report the package printed: plugin summaries and callback tables."""
    return [m for m in messages.infos if m.startswith(REPORT)]


class ConvertRecorder(EngineModel):
    """Records what the engines held when the first hook after ``strategy.setup`` ran."""

    def on_predict_start(self) -> None:
        self.at_predict_start = snapshot(self)


def test_plugin_applies_in_convert_module_and_saves_in_teardown(tmp_path, real_cache_bytes, fake_gpu, messages):
    model = ConvertRecorder()
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(
        "32-true",
        cuda_graph_strategy="whole_graph_capture",
        dynamic_shapes_kernel_specialization_strategy="eager",
        runtime_cache=seed_sibling(tmp_path, real_cache_bytes),
    )
    spy = SessionSpy()
    trainer = make_trainer(tmp_path, [spy], plugins=[plugin])
    assert trainer.precision_plugin is plugin
    assert trainer.precision == "32-true"
    out = trainer.predict(model, predict_loader(batches=2))

    assert [o.dtype for o in out] == [torch.float32, torch.float32]
    handle = assert_served(model.at_predict_start, "whole_graph_capture", "eager")
    assert handle is not None
    for step in model.seen:
        assert assert_served(step, "whole_graph_capture", "eager") is handle
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes  # saved in teardown
    assert cache.read_record(str(tmp_path / "rank0.bin")).gpu_uuid == fake_gpu.uuid
    assert_restored(model, prior)
    # the plugin's own session served the run (no callback): closed and dropped at teardown
    session = spy.only()
    assert session.closed and plugin.session is None
    assert session.cache.handle is handle
    figures = session.figures
    assert (figures.rank, figures.gpu, figures.engines) == (0, fake_gpu.id, 3)
    assert figures.cache_source == "seeded" and figures.warm
    assert figures.cache.loaded_from == str(tmp_path / "rank5.bin")
    assert figures.saved_bytes == len(real_cache_bytes)
    assert reports(messages) == [figures.summary()]  # one report: the plugin's one-line summary


def test_plugin_saves_and_restores_after_exception(tmp_path, real_cache_bytes, fake_gpu):
    error = ValueError("plugin run fails")
    model = EngineModel(fail_at=0, error=error)
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(
        cuda_graph_strategy="whole_graph_capture", runtime_cache=seed_sibling(tmp_path, real_cache_bytes)
    )
    spy = SessionSpy()
    with pytest.raises(ValueError, match="plugin run fails") as excinfo:
        make_trainer(tmp_path, [spy], plugins=[plugin]).predict(model, predict_loader())
    assert excinfo.value is error
    assert_served(model.seen[0], "whole_graph_capture")
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)
    session = spy.only()
    assert session.closed and plugin.session is None
    assert session.figures.cache_source == "seeded" and session.figures.saved_bytes == len(real_cache_bytes)


def test_plugin_saves_after_keyboard_interrupt(tmp_path, real_cache_bytes, fake_gpu):
    handler = signal.getsignal(signal.SIGINT)
    model = EngineModel(fail_at=0, error=KeyboardInterrupt())
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(runtime_cache=seed_sibling(tmp_path, real_cache_bytes))
    try:
        with pytest.raises(SystemExit) as excinfo:  # Lightning 2.6 turns Ctrl-C into sys.exit(1)
            make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader())
    finally:
        signal.signal(signal.SIGINT, handler)
    assert excinfo.value.code == 1
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)


def test_plugin_wraps_bf16_mixed(tmp_path):
    model = EngineModel()
    plugin = TRTRuntimePrecision("bf16-mixed", runtime_cache=None)
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed" and plugin.scaler is None
    trainer = make_trainer(tmp_path, plugins=[plugin])
    assert trainer.precision == "bf16-mixed"
    out = trainer.predict(model, predict_loader(batches=1))
    assert out[0].dtype == torch.bfloat16  # the wrapped precision's autocast ran predict_step
    assert all(rs.runtime_cache is None and rs.cuda_graph_strategy == "disabled" for rs in model.seen[0])


def test_plugin_wraps_a_precision_instance(tmp_path):
    inner = MixedPrecision("bf16-mixed", device="cpu")
    plugin = TRTRuntimePrecision(inner, cuda_graph_strategy="whole_graph_capture", runtime_cache=None)
    assert isinstance(plugin, MixedPrecision) and vars(inner).items() <= vars(plugin).items()  # its state
    model = EngineModel()
    out = make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader(batches=1))
    assert out[0].dtype == torch.bfloat16
    assert all(rs.cuda_graph_strategy == "whole_graph_capture" for rs in model.seen[0])
    assert plugin.state_dict() == inner.state_dict()


@pytest.mark.parametrize("precision", ["64-true", "16-true", "bf16", 32])
def test_plugin_rejects_invalid_precision(precision):
    with pytest.raises(ValueError, match=r"Valid choices: \['32-true', '16-mixed', 'bf16-mixed'\]"):
        TRTRuntimePrecision(precision)


def test_plugin_rejects_nested_plugin_and_invalid_settings():
    with pytest.raises(TypeError, match="cannot wrap another TRTRuntimePrecision"):
        TRTRuntimePrecision(TRTRuntimePrecision(runtime_cache=None))
    with pytest.raises(ValueError, match="'disabled', 'whole_graph_capture'"):
        TRTRuntimePrecision(cuda_graph_strategy="on")
    with pytest.raises(ValueError, match="'lazy', 'eager', 'none'"):
        TRTRuntimePrecision(dynamic_shapes_kernel_specialization_strategy="Eager!")
    with pytest.raises(ValueError, match="Valid placeholders"):
        TRTRuntimePrecision(runtime_cache="/c/{device}.bin")


@pytest.fixture
def counted(monkeypatch):
    """Counts settings given to engines and cache saves, each passed through to the real function."""
    calls: dict[str, list] = {"set": [], "save": []}
    set_settings, save = _backend.set_trt_module_settings, cache.save

    def record_set(module, settings):
        calls["set"].append((module, settings))
        return set_settings(module, settings)

    def record_save(path, data, stats=None, placement=None):
        calls["save"].append(path)
        return save(path, data, stats, placement)

    monkeypatch.setattr(_backend, "set_trt_module_settings", record_set)
    monkeypatch.setattr(cache, "save", record_save)
    return calls


def test_plugin_and_callback_with_equal_settings_apply_and_save_once(
    tmp_path, real_cache_bytes, counted, fake_gpu, messages
):
    template = seed_sibling(tmp_path, real_cache_bytes)
    counted["save"].clear()  # the sibling's own save, above: count the run's only
    model = EngineModel()
    prior = snapshot(model)
    kwargs = dict(cuda_graph_strategy="whole_graph_capture", runtime_cache=template)
    plugin, callback, spy = TRTRuntimePrecision(**kwargs), TRTRuntimeSettings(**kwargs), SessionSpy()
    make_trainer(tmp_path, plugins=[plugin], callbacks=[callback, spy]).predict(model, predict_loader(batches=2))

    assert_served(model.seen[0], "whole_graph_capture")
    applied = [s for _, s in counted["set"] if s.cuda_graph_strategy == "whole_graph_capture"]
    assert len(applied) == 3  # once per engine
    assert len(counted["set"]) == 6  # and once per engine to restore
    assert counted["save"] == [str(tmp_path / "rank0.bin")]
    assert (tmp_path / "rank0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)
    assert callback.figures[0].engines == 3
    # one session, the callback's: the plugin opened none of its own, and one report (the callback's table)
    assert spy.only().closed and plugin.session is None and callback.session is None
    (report,) = reports(messages)
    assert report.startswith(f"{REPORT} (whole_graph_capture):")


@pytest.mark.parametrize(
    "plugin_args, callback_args, differ",
    [
        (dict(cuda_graph_strategy="whole_graph_capture"), dict(cuda_graph_strategy="disabled"), "settings "),
        (dict(prewarm_shapes=["32x128"]), dict(prewarm_shapes=["8x128"]), "prewarm "),
        (dict(prewarm_shapes=["8x128"], prewarm_dtype="float32"), dict(prewarm_shapes=["8x128"]), "prewarm "),
        (dict(upload_ahead=False), dict(), "upload_ahead True vs False"),
    ],
)
def test_plugin_and_callback_that_configure_the_model_differently_fail_clearly(
    tmp_path, plugin_args, callback_args, differ
):
    model = EngineModel()
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(runtime_cache=None, **plugin_args)
    callback = TRTRuntimeSettings(runtime_cache=None, **callback_args)
    # checked where the plugin meets the callback's session (convert_module): no batch runs, engines restored
    trainer = make_trainer(tmp_path, plugins=[plugin], callbacks=[callback])
    with pytest.raises(ValueError, match="TRTRuntimeSettings and TRTRuntimePrecision configure the same") as excinfo:
        trainer.predict(model, predict_loader())
    assert differ in str(excinfo.value)
    assert "either the TRTRuntimeSettings callback or the TRTRuntimePrecision plugin" in str(excinfo.value)
    assert model.seen == []
    assert_restored(model, prior)


def test_prewarm_given_to_one_of_plugin_and_callback_is_run_once(tmp_path, monkeypatch):
    """Given to the plugin alone or the callback alone, the prewarm shapes are prewarmed (by the callback's
    session), whichever adapter had them."""
    from lightning_trt_rtx import prewarm

    ran: list[prewarm.PrewarmSpec] = []
    monkeypatch.setattr(prewarm.PrewarmSpec, "run", lambda self, session, module: ran.append(self) or [])
    for plugin_args, callback_args in ((dict(prewarm_shapes=["8x4"]), {}), ({}, dict(prewarm_shapes=["8x4"]))):
        ran.clear()
        plugin = TRTRuntimePrecision(runtime_cache=None, **plugin_args)
        callback = TRTRuntimeSettings(runtime_cache=None, print_table=False, **callback_args)
        make_trainer(tmp_path, plugins=[plugin], callbacks=[callback]).predict(EngineModel(), predict_loader(batches=1))
        assert [spec.shapes for spec in ran] == [(((8, 4),),)]


def test_plugin_repeated_predict(tmp_path):
    model = EngineModel()
    prior = snapshot(model)
    plugin = TRTRuntimePrecision(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "r{rank}.bin"))
    spies = [SessionSpy(), SessionSpy()]
    for spy in spies:
        trainer = make_trainer(tmp_path, [spy], plugins=[plugin])
        trainer.predict(model, predict_loader(batches=1))
        assert_served(model.seen[-1], "whole_graph_capture")
        assert_restored(model, prior)
        assert spy.only().closed and plugin.session is None
    # one handle per run: each run opens its own session, which reads the file again
    assert spies[0].only() is not spies[1].only()
    assert model.seen[0][0].runtime_cache is not model.seen[1][0].runtime_cache


def test_plugin_without_engines_warns_once(tmp_path, messages):
    model = EngineModel(engines_in="none")
    trainer = make_trainer(tmp_path, plugins=[TRTRuntimePrecision(runtime_cache=str(tmp_path / "c" / "r{rank}.bin"))])
    out = trainer.predict(model, predict_loader(batches=2))
    assert len(out) == 2
    (message,) = messages.matching(NO_ENGINES)
    assert "EngineModel" in message
    assert not (tmp_path / "c").exists()


def test_plain_precision_instance_still_works_as_inner(tmp_path):
    inner = Precision()
    plugin = TRTRuntimePrecision(inner, runtime_cache=None)
    assert plugin.precision == "32-true"
    model = EngineModel()
    out = make_trainer(tmp_path, plugins=[plugin]).predict(model, predict_loader(batches=1))
    assert out[0].dtype == torch.float32
    assert all(rs.runtime_cache is None for rs in model.seen[0])


# --- the wrapped precision follows the Trainer's accelerator ------------------------------------------


class AutocastRecorder(EngineModel):
    """Records the plugin's wrapped precision when the first hook after ``strategy.setup`` runs."""

    def on_predict_start(self) -> None:
        plugin = self.trainer.precision_plugin
        self.at_predict_start = (type(plugin), getattr(plugin, "device", None), plugin.precision, plugin.scaler)


def plugin_built_where_cuda_is_available(monkeypatch, precision: str, cuda: bool = True) -> TRTRuntimePrecision:
    """The plugin constructed while ``torch.cuda.is_available()`` says ``cuda`` (restored right after)."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: cuda)
        return TRTRuntimePrecision(precision, runtime_cache=None)


def test_plugin_autocast_device_follows_the_trainers_accelerator(tmp_path, monkeypatch):
    """A CPU Trainer autocasts on "cpu", also where CUDA is available: the device is the accelerator's."""
    plugin = plugin_built_where_cuda_is_available(monkeypatch, "bf16-mixed")
    assert isinstance(plugin, MixedPrecision) and plugin.device == "cuda"  # before the Trainer: CUDA was "available"
    assert torch.cuda.is_available() is False  # only the construction saw CUDA
    trainer = make_trainer(tmp_path, plugins=[plugin])
    assert isinstance(trainer.accelerator, CPUAccelerator)
    model = AutocastRecorder()
    out = trainer.predict(model, predict_loader(batches=2))

    cls, device, precision, _ = model.at_predict_start  # built again in convert_module, before any step ran
    assert cls is type(plugin) and issubclass(cls, MixedPrecision)
    assert (device, precision) == ("cpu", "bf16-mixed")
    assert plugin.device == "cpu" and plugin.precision == trainer.precision == "bf16-mixed"
    # predict_step ran under CPU autocast (bf16), not CUDA's, as Trainer(precision="bf16-mixed") runs it
    assert model.seen_autocast == [(True, torch.bfloat16, False)] * 2
    assert [o.dtype for o in out] == [torch.bfloat16] * 2
    baseline = EngineModel()
    make_trainer(tmp_path, precision="bf16-mixed").predict(baseline, predict_loader(batches=2))
    assert baseline.seen_autocast == model.seen_autocast
    assert all(rs.runtime_cache is None for rs in model.seen[0])  # still served: the settings reached the engines


LIGHTNING_16_MIXED_ON_CPU = (
    "You passed `Trainer(accelerator='cpu', precision='16-mixed')` but AMP with fp16 is not supported on CPU."
    " Using `precision='bf16-mixed'` instead."
)


@pytest.mark.parametrize("cuda_at_construction", [False, True], ids=["cpu-host", "cuda-available"])
def test_plugin_16_mixed_on_a_cpu_trainer_is_bf16_mixed_with_a_warning(
    tmp_path, monkeypatch, messages, cuda_at_construction
):
    """As Lightning 2.6's accelerator connector does for ``Trainer(accelerator="cpu", precision="16-mixed")``:
    one warning, then bf16 autocast on CPU and no GradScaler."""
    with pytest.warns(UserWarning) as lightning_warnings:
        base_trainer = make_trainer(tmp_path, precision="16-mixed")
    assert [str(w.message) for w in lightning_warnings if "16-mixed" in str(w.message)] == [LIGHTNING_16_MIXED_ON_CPU]
    baseline = EngineModel()
    base_out = base_trainer.predict(baseline, predict_loader(batches=2))

    plugin = plugin_built_where_cuda_is_available(monkeypatch, "16-mixed", cuda=cuda_at_construction)
    trainer = make_trainer(tmp_path, plugins=[plugin])
    model = AutocastRecorder()
    out = trainer.predict(model, predict_loader(batches=2))

    (warning,) = messages.matching("16-mixed")  # once, whether given at construction or at convert_module
    assert "AMP with fp16 is not supported on CPU" in warning and "Using 'bf16-mixed' instead" in warning
    _, device, precision, scaler = model.at_predict_start
    assert (device, precision, scaler) == ("cpu", "bf16-mixed", None)
    assert isinstance(plugin, MixedPrecision) and plugin.scaler is trainer.scaler is None
    assert base_trainer.precision_plugin.scaler is None
    assert plugin.precision == trainer.precision == base_trainer.precision == "bf16-mixed"
    assert model.seen_autocast == baseline.seen_autocast == [(True, torch.bfloat16, False)] * 2
    assert [o.dtype for o in out] == [o.dtype for o in base_out] == [torch.bfloat16] * 2


# --- the plugin with the callback serving validation inside fit ---------------------------------------


def test_plugin_with_callback_validating_inside_fit_reports_and_saves_once(
    tmp_path, monkeypatch, real_cache_bytes, messages
):
    """loops=["validate"] in trainer.fit with the plugin too: the callback's session serves every epoch's
    validation (and the sanity check), one save at teardown, one report (the callback's table)."""
    saves: list[str] = []
    real_save = cache.RunCache.save

    def spy_save(self):
        saves.append(self.path)
        return real_save(self)

    monkeypatch.setattr(cache.RunCache, "save", spy_save)
    template = str(tmp_path / "r{rank}.bin")
    (tmp_path / "r0.bin").write_bytes(real_cache_bytes)
    model = EngineModel()
    prior = snapshot(model)
    kwargs = dict(cuda_graph_strategy="whole_graph_capture", runtime_cache=template)
    plugin = TRTRuntimePrecision("bf16-mixed", **kwargs)
    callback, spy = TRTRuntimeSettings(loops=["validate"], **kwargs), SessionSpy()
    trainer = make_trainer(
        tmp_path, [callback, spy], plugins=[plugin], max_epochs=2, limit_train_batches=1, limit_val_batches=2
    )
    trainer.fit(model, predict_loader(batches=2), predict_loader(batches=2))

    assert len(model.seen) == 2 + 2 * 2  # the sanity check's 2 batches, then 2 epochs x 2 validation batches
    handle = assert_served([rs for step in model.seen for rs in step][:3], "whole_graph_capture")
    assert all(rs.runtime_cache is handle and rs.cuda_graph_strategy == "whole_graph_capture"
               for step in model.seen for rs in step)
    assert model.seen_autocast == [(True, torch.bfloat16, False)] * 6  # the plugin's precision ran the steps
    session = spy.only()  # the callback's session, found by the plugin too: one for the whole fit
    assert session.closed and callback.session is None and plugin.session is None
    assert saves == [str(tmp_path / "r0.bin")]  # one save, at teardown
    assert (tmp_path / "r0.bin").read_bytes() == real_cache_bytes
    assert_restored(model, prior)
    (row,) = callback.figures
    assert (row.rank, row.engines, row.cache_source) == (0, 3, "unverified")
    (report,) = reports(messages)  # the callback's table; the plugin's one-line summary is not printed
    assert report.startswith(f"{REPORT} (whole_graph_capture):")
    assert str(tmp_path / "r0.bin") in report


# --- Lightning's own components see the wrapped precision ---------------------------------------------


class MetricsLogger(Logger):
    """A Lightning logger keeping every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


class WithFlops(EngineModel):
    flops_per_batch = 1000


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32), ("16-mixed-instance", torch.float16)],
)
def test_throughput_monitor_computes_for_the_wrapped_dtype(tmp_path, monkeypatch, precision, dtype):
    """ThroughputMonitor asks for the available FLOPs of the wrapped precision's dtype (it asked for
    float32 when the plugin hid its precision), as it does for the plain precision, and logs its figures."""
    asked: list[torch.dtype] = []
    available_flops = throughput_monitor.get_available_flops

    def spy(device: torch.device, dtype: torch.dtype) -> int | None:
        asked.append(dtype)
        return available_flops(device, dtype)  # the real answer (None on CPU)

    monkeypatch.setattr(throughput_monitor, "get_available_flops", spy)

    def run(plugin: Precision) -> list[dict[str, float]]:
        logger = MetricsLogger()
        trainer = make_trainer(
            tmp_path, [ThroughputMonitor(batch_size_fn=len)], plugins=[plugin], logger=logger, log_every_n_steps=1
        )
        trainer.predict(WithFlops(), predict_loader(batches=3))
        return logger.metrics

    def plain() -> Precision:
        if precision == "16-mixed-instance":
            return MixedPrecision("16-mixed", device="cpu")
        return Precision() if precision == "32-true" else MixedPrecision(precision, device="cpu")  # type: ignore[arg-type]

    wrapped = TRTRuntimePrecision(plain() if precision == "16-mixed-instance" else precision, runtime_cache=None)
    assert throughput_monitor._plugin_to_compute_dtype(wrapped) is dtype
    logged = run(wrapped)
    baseline = run(plain())
    assert asked == [dtype, dtype]
    assert [sorted(m) for m in logged] == [sorted(m) for m in baseline]
    assert [m["predict/samples"] for m in logged] == [2, 4, 6]


def test_trainer_scaler_is_the_wrapped_grad_scaler_and_checkpoints_move_both_ways(tmp_path):
    """``trainer.scaler`` is the wrapped precision's GradScaler and steps exactly as without the plugin; its
    state is filed under ``MixedPrecision`` in a checkpoint, so a run resumes from either one.

    fp16 AMP with a GradScaler on CPU: Lightning's connector turns ``Trainer(accelerator="cpu",
    precision="16-mixed")`` into bf16-mixed (no scaler), but runs a ``MixedPrecision("16-mixed", "cpu")``
    plugin as given, with a CPU GradScaler. ``TRTRuntimePrecision("16-mixed")`` on a GPU Trainer:
    ``tests/gpu/test_gpu_plugin.py``."""

    def fit(plugin: Precision, name: str, **kwargs: Any) -> tuple[Any, EngineModel]:
        torch.manual_seed(0)
        model = EngineModel(engines_in="none")  # engines cannot be restored from a checkpoint without CUDA
        trainer = make_trainer(tmp_path / name, plugins=[plugin], max_steps=3, **kwargs)
        assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler is plugin.scaler
        trainer.fit(model, predict_loader(batches=3))
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
        return trainer, model

    base_trainer, base_model = fit(MixedPrecision("16-mixed", device="cpu"), "plain")
    plugin = TRTRuntimePrecision(MixedPrecision("16-mixed", device="cpu"), runtime_cache=None)
    trainer, model = fit(plugin, "wrapped")
    assert trainer.precision == base_trainer.precision == "16-mixed"
    assert trainer.scaler.state_dict() == base_trainer.scaler.state_dict()
    assert trainer.scaler.get_scale() < 2.0**16  # the scaler ran: it backed off from its initial scale
    assert torch.equal(model.linear.weight, base_model.linear.weight)
    saved = torch.load(tmp_path / "wrapped.ckpt", weights_only=False)
    base_saved = torch.load(tmp_path / "plain.ckpt", weights_only=False)
    assert saved["MixedPrecision"] == base_saved["MixedPrecision"] == base_trainer.scaler.state_dict()

    # resume: each run's scaler state reaches the other kind of plugin
    for ckpt, fresh in [
        ("plain.ckpt", TRTRuntimePrecision(MixedPrecision("16-mixed", device="cpu"), runtime_cache=None)),
        ("wrapped.ckpt", MixedPrecision("16-mixed", device="cpu")),
    ]:
        assert fresh.scaler.get_scale() == 2.0**16
        resumed = make_trainer(tmp_path / "resumed", plugins=[fresh], max_steps=3)
        resumed.fit(EngineModel(engines_in="none"), predict_loader(batches=3), ckpt_path=str(tmp_path / ckpt))
        assert fresh.scaler.state_dict() == base_trainer.scaler.state_dict()


def test_fsdp_strategy_precision_check_accepts_a_wrapped_fsdp_precision():
    """FSDPStrategy takes only an FSDPPrecision (its precision_plugin setter checks the type; a Trainer with
    FSDP needs a GPU, the strategy itself does not): the plugin wrapping one passes, wrapping another
    precision fails as that precision does, and the strategy reads the wrapped precision's config."""
    plain = FSDPPrecision("bf16-mixed")
    plugin = TRTRuntimePrecision(FSDPPrecision("bf16-mixed"), runtime_cache=None)
    assert isinstance(plugin, FSDPPrecision) and plugin.precision == "bf16-mixed"
    strategy = FSDPStrategy(precision_plugin=plugin)
    assert strategy.precision_plugin is plugin
    config, base_config = strategy.mixed_precision_config, FSDPStrategy(precision_plugin=plain).mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (
        base_config.param_dtype, base_config.reduce_dtype, base_config.buffer_dtype
    ) == (torch.bfloat16, torch.bfloat16, torch.bfloat16)
    for rejected in (MixedPrecision("bf16-mixed", device="cpu"), TRTRuntimePrecision("bf16-mixed", runtime_cache=None)):
        with pytest.raises(TypeError, match="FSDP strategy can only work with the `FSDPPrecision` plugin"):
            FSDPStrategy(precision_plugin=rejected)


def test_the_plugin_pickles_as_the_class_it_is(tmp_path):
    plugin = TRTRuntimePrecision(
        MixedPrecision("16-mixed", device="cpu"), cuda_graph_strategy="whole_graph_capture", runtime_cache=None
    )
    for copied in (pickle.loads(pickle.dumps(plugin)), copy.deepcopy(plugin)):
        assert type(copied) is type(plugin) and isinstance(copied, (TRTRuntimePrecision, MixedPrecision))
        assert copied.settings == plugin.settings and copied.precision == "16-mixed"
        assert copied.scaler.state_dict() == plugin.scaler.state_dict() and copied.scaler is not plugin.scaler
    assert "TRTRuntimePrecision(MixedPrecision('16-mixed')" in repr(plugin)


def test_a_subclass_of_the_plugin_is_composed_too(tmp_path):
    class Mine(TRTRuntimePrecision):
        pass

    plugin = Mine("bf16-mixed", runtime_cache=None)
    assert isinstance(plugin, Mine) and isinstance(plugin, MixedPrecision)
    assert type(plugin) is type(Mine("bf16-mixed", runtime_cache=None))  # one class per pair
    assert type(TRTRuntimePrecision(runtime_cache=None)) is TRTRuntimePrecision  # "32-true": Precision already
    out = make_trainer(tmp_path, plugins=[plugin]).predict(EngineModel(), predict_loader(batches=1))
    assert out[0].dtype == torch.bfloat16
