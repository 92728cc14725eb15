"""TRTRuntimePrecision as the precision it wraps, on a GPU Trainer (``pytest -m gpu``): the GradScaler of
``"16-mixed"``, ThroughputMonitor's FLOPs for bf16, and FSDP's precision check."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor, throughput_monitor
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision

from lightning_trt_rtx import TRTRuntimePrecision
from lightning_trt_rtx.engines import find_engines
from tests.gpu.models import compile_trt
from tests.helpers import run_if


class Served(L.LightningModule):
    """A compiled block served in predict, and a Linear that trains (under the precision's autocast)."""

    flops_per_batch = 8 * 2 * 64 * 64

    def __init__(self, compiled: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.compiled = compiled
        self.linear = torch.nn.Linear(64, 64)
        self.seen: list[list[str]] = []

    def predict_step(self, batch, batch_idx):
        assert self.compiled is not None
        self.seen.append([e.get().cuda_graph_strategy for e in find_engines(self.compiled)])
        return self.compiled(batch)

    def training_step(self, batch, batch_idx):
        return self.linear(batch).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.linear.parameters(), lr=0.1)


class MetricsLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []

    name = "metrics"  # type: ignore[assignment]
    version = 0  # type: ignore[assignment]

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


def _trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False)
    return L.Trainer(**{**options, **kwargs})


def _loader(batches: int = 4) -> torch.utils.data.DataLoader:
    torch.manual_seed(0)
    return torch.utils.data.DataLoader(torch.randn(8 * batches, 64), batch_size=8)


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    return compile_trt(net, torch.randn(8, 64, device="cuda"))


@run_if(min_cuda_gpus=1, rtx=True)
def test_16_mixed_gives_the_trainer_a_grad_scaler_that_steps_as_lightnings(compiled, tmp_path):
    runs = {}
    for name, kwargs in [
        ("plain", dict(precision="16-mixed")),
        ("plugin", dict(plugins=[TRTRuntimePrecision("16-mixed", cuda_graph_strategy="whole_graph_capture",
                                                     runtime_cache=str(tmp_path / "r{rank}.bin"))])),
    ]:
        torch.manual_seed(0)
        model = Served(compiled)
        trainer = _trainer(max_steps=3, default_root_dir=tmp_path / name, **kwargs)
        assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.precision == "16-mixed"
        trainer.fit(model, _loader())
        runs[name] = (trainer.scaler.state_dict(), model.linear.weight.detach().clone())
        if name == "plugin":
            plugin = trainer.precision_plugin
            assert isinstance(plugin, MixedPrecision) and plugin.device == "cuda"
            out = _trainer(plugins=[plugin]).predict(model, _loader(2))
            assert len(out) == 2 and model.seen == [["whole_graph_capture"]] * 2
            assert (tmp_path / "r0.bin").stat().st_size > 0
    assert runs["plugin"][0] == runs["plain"][0]
    torch.testing.assert_close(runs["plugin"][1], runs["plain"][1])


@run_if(min_cuda_gpus=1, rtx=True)
def test_throughput_monitor_counts_bf16_flops_for_a_bf16_mixed_plugin(compiled, tmp_path, monkeypatch):
    device = torch.device("cuda", 0)
    bf16, fp32 = get_available_flops(device, torch.bfloat16), get_available_flops(device, torch.float32)
    asked: list[torch.dtype] = []

    def spy(device: torch.device, dtype: torch.dtype):  # passes through: Lightning's own answer
        asked.append(dtype)
        return get_available_flops(device, dtype)

    # Lightning 2.6 has no FLOPs figure for "NVIDIA H200" (None for every dtype): the dtype it asks for
    # is what the plugin decides
    monkeypatch.setattr(throughput_monitor, "get_available_flops", spy)
    monitors, logged = {}, {}
    for name, kwargs in [
        ("plain", dict(precision="bf16-mixed")),
        ("plugin", dict(plugins=[TRTRuntimePrecision("bf16-mixed", runtime_cache=None)])),
    ]:
        # a window of 2 batches: the FLOPs figures are logged from the second batch on (the default, 100,
        # would need 100 batches before the first)
        monitor, logger = ThroughputMonitor(batch_size_fn=len, window_size=2), MetricsLogger()
        trainer = _trainer(callbacks=[monitor], logger=logger, log_every_n_steps=1, **kwargs)
        trainer.predict(Served(compiled), _loader())
        monitors[name], logged[name] = monitor.available_flops, logger.metrics
    print(f"\n{torch.cuda.get_device_name(device)}: available FLOPs bf16 {bf16}, fp32 {fp32};"
          f" ThroughputMonitor {monitors}")
    assert asked == [torch.bfloat16, torch.bfloat16]
    assert monitors["plugin"] == monitors["plain"] == bf16
    if bf16 is not None:  # a GPU Lightning knows (H100; not H200 in Lightning 2.6): the figures differ, MFU is logged
        assert bf16 != fp32
        assert [sorted(m) for m in logged["plugin"]] == [sorted(m) for m in logged["plain"]]
        for metrics in (logged["plugin"][-1], logged["plain"][-1]):  # MFU against the bf16 figure
            assert metrics["predict/device/mfu"] == pytest.approx(metrics["predict/device/flops_per_sec"] / bf16)


@run_if(min_cuda_gpus=1, rtx=True)
def test_an_fsdp_trainer_takes_the_plugin_wrapping_an_fsdp_precision(tmp_path):
    plugin = TRTRuntimePrecision(FSDPPrecision("bf16-mixed"), runtime_cache=None)
    trainer = _trainer(strategy="fsdp", plugins=[plugin], default_root_dir=tmp_path)
    assert trainer.strategy.precision_plugin is plugin and trainer.precision == "bf16-mixed"
    with pytest.raises(TypeError, match="FSDPPrecision"):
        _trainer(strategy="fsdp", plugins=[TRTRuntimePrecision("bf16-mixed", runtime_cache=None)])
