"""Uploads ahead of the engine and host copies on a real GPU with a real engine (``pytest -m gpu``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_trt_rtx import ServingSession, TRTHostPredictions, TRTRuntimeSettings, TRTSettings, addresses, transfers
from tests.gpu.models import ConvNet, compile_trt
from tests.helpers import run_if


class Served(L.LightningModule):
    """Runs ``net`` on the batch (a tensor, or the ``"image"`` of a dict); records each batch's device."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.devices: set[str] = set()

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        x = batch["image"] if isinstance(batch, dict) else batch
        self.devices.add(str(x.device))
        return self.net(x)


def _trainer(*callbacks: Any) -> L.Trainer:
    return L.Trainer(accelerator="gpu", devices=1, callbacks=list(callbacks), logger=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


class Samples(torch.utils.data.Dataset):
    def __init__(self, n: int, as_dict: bool = False) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 16, 16, generator=generator)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        return {"image": self.x[i], "index": i} if self.as_dict else self.x[i]


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    example = torch.randn(8, 3, 16, 16, device="cuda")
    trt = pytest.importorskip("torch_tensorrt")
    dynamic = trt.Input(min_shape=(1, 3, 16, 16), opt_shape=(8, 3, 16, 16), max_shape=(8, 3, 16, 16))
    return compile_trt(ConvNet(), dynamic), example


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("source", ["cpu", "workers", "gpu", "dict"])
@pytest.mark.parametrize("strategy", ["disabled", "whole_graph_capture"])
def test_predictions_equal_the_run_without_uploads_on_every_batch(conv, tmp_path, source, strategy):
    compiled, _ = conv
    data = Samples(8 * 12 + 3, as_dict=source == "dict")  # a smaller last batch

    def loader() -> DataLoader:
        if source == "gpu":
            return DataLoader([data.x[i : i + 8].cuda() for i in range(0, len(data), 8)], batch_size=None)
        return DataLoader(data, batch_size=8, num_workers=2 if source == "workers" else 0,
                          pin_memory=source == "workers")  # fmt: skip

    cache = str(tmp_path / "gpu-{gpu}.bin")
    # warm first: a cold run's lazily specialized kernels differ from a warm run's in the last bits
    _trainer(TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=cache)).predict(Served(compiled), loader())
    runs = {}
    for ahead in (False, True):
        callback = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=cache, upload_ahead=ahead)
        model = Served(compiled)
        runs[ahead] = (_trainer(callback).predict(model, loader()), callback.figures[0], model.devices)
    (off, off_figures, _), (on, on_figures, devices) = runs[False], runs[True]
    assert devices == {"cuda:0"}
    assert len(on) == len(off) == 13
    for a, b in zip(on, off):  # each batch's own prediction (batches differ by far more than the tolerance)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert off_figures.uploads == "off: upload_ahead=False"
    assert on_figures.uploads.startswith("ahead, depth 2: 13 batches"), on_figures.uploads
    if source != "gpu":  # 24 KiB batches, pinned by the workers or not: Lightning's own copy moves them
        assert on_figures.uploads.endswith("(13 under 64 KiB, not staged)"), on_figures.uploads
    assert 0 < on_figures.step_gpu_ms and 0 < on_figures.efficiency <= 1.0


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize(
    "side, mode",
    [(16, ": 40 batches (40 under 64 KiB, not staged)"), (48, ": 40 batches"), (128, ", own thread: 40 batches")],
)
def test_a_slow_step_never_sees_its_batch_overwritten(side, mode):
    """Each step sleeps on the GPU before reading its batch, while the uploads run ahead: if a buffer
    were reused early, a later batch's values would show up in an earlier step's result. The smallest
    batches (24 KiB) are left to Lightning's own copy, small ones (216 KiB) staged by the loop, large ones
    (1.5 MiB) by the uploads' thread."""
    batches = [torch.full((8, 3, side, side), float(i)) for i in range(40)]

    class Slow(L.LightningModule):
        def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            torch.cuda._sleep(2_000_000)  # about a millisecond of GPU time before the batch is read
            return batch.mean(dim=(1, 2, 3))

    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    got = _trainer(callback).predict(Slow(), DataLoader(batches, batch_size=None))
    assert [p.tolist() for p in got] == [[float(i)] * 8 for i in range(40)]
    assert callback.figures[0].uploads == f"ahead, depth 2{mode}"


@run_if(min_cuda_gpus=1, rtx=True)
def test_small_batches_land_where_the_last_one_was_and_whole_graph_capture_copies_nothing(conv, monkeypatch):
    """Small batches (here under 64 KiB: as they are) are handed to Lightning and moved inside the step: one
    batch on the GPU at a time, so the engine's input stays at one address and held addresses copy nothing."""
    compiled, _ = conv
    monkeypatch.setenv(addresses.ENABLED_ENV, "1")
    seen: list[int] = []

    class Addresses(Served):
        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(batch.data_ptr())
            return super().predict_step(batch, batch_idx)

    loader = DataLoader(Samples(8 * 40), batch_size=8)
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    got = _trainer(callback).predict(Addresses(compiled), loader)
    expected = [compiled(x.cuda()).cpu() for x in loader]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert len(set(seen[1:])) == 1, f"{len(set(seen[1:]))} input addresses over 39 batches"
    figures = callback.figures[0]
    assert figures.uploads == "ahead, depth 2: 40 batches (40 under 64 KiB, not staged)"
    assert "inputs copied in" not in figures.capture, figures.capture


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("held", ["0", "1"])
def test_large_batches_under_whole_graph_capture_are_uploaded_between_steps_and_every_prediction_is_right(
    held, monkeypatch
):
    """Regression (H200, a loaded ResNet-50 under whole-graph capture, batches of 9.6 MB): an uploads thread
    calling CUDA while the engine captured broke the capture ("Event is not valid ... a graph capture that is
    no longer running"). Where graphs may be captured, the thread calls CUDA only between steps. With the
    addresses left to torch-tensorrt (held "0") the engine captures again at every batch."""
    monkeypatch.setenv(addresses.ENABLED_ENV, held)
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3, padding=1),
              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)]  # fmt: skip
    eager = torch.nn.Sequential(*layers).cuda().eval()
    compiled = compile_trt(eager, torch.randn(8, 3, 128, 128, device="cuda"))
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 128, 128, generator=generator) for _ in range(60)]  # 1.5 MiB each
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    got = _trainer(callback).predict(Served(compiled), DataLoader(batches, batch_size=None))
    assert callback.figures[0].uploads == (
        "ahead, depth 2, own thread (CUDA calls between steps: graphs may be captured): 60 batches"
    )
    with torch.no_grad():
        for x, y in zip(batches, got, strict=True):
            torch.testing.assert_close(y.cuda(), eager(x.cuda()), atol=2e-2, rtol=2e-2)


@run_if(min_cuda_gpus=1, rtx=True)
def test_gpu_memory_stays_flat_over_1000_batches(conv):
    compiled, _ = conv
    data = Samples(64)
    allocated: list[int] = []

    class Probe(L.Callback):
        def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                 dataloader_idx: int = 0) -> None:  # fmt: skip
            if batch_idx in (100, 999):
                torch.cuda.synchronize()
                allocated.append(torch.cuda.memory_allocated())

    class Cycle(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8 * 1000

        def __getitem__(self, i: int) -> torch.Tensor:
            return data.x[i % 64]

    callback = TRTRuntimeSettings(runtime_cache=None, print_table=False)
    _trainer(callback, Probe()).predict(Served(compiled), DataLoader(Cycle(), batch_size=8), return_predictions=False)
    assert len(allocated) == 2 and allocated[1] <= allocated[0], allocated
    assert callback.figures[0].uploads.startswith("ahead, depth 2: 1000 batches")


@run_if(min_cuda_gpus=1, rtx=True)
def test_host_predictions_equal_the_returned_ones_and_are_pinned(conv):
    compiled, _ = conv  # warm from the tests above or not: both runs below use the same kernels
    loader = DataLoader(Samples(8 * 10), batch_size=8)
    returned = _trainer(TRTRuntimeSettings(runtime_cache=None, print_table=False)).predict(Served(compiled), loader)
    collector = TRTHostPredictions()
    _trainer(TRTRuntimeSettings(runtime_cache=None, print_table=False), collector).predict(
        Served(compiled), loader, return_predictions=False
    )
    assert len(collector.predictions) == len(returned) == 10
    for a, b in zip(collector.predictions, returned):
        assert a.device.type == "cpu" and a.is_pinned()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@run_if(min_cuda_gpus=1, rtx=True)
def test_uploads_ahead_without_a_trainer_and_host_copies(conv):
    compiled, _ = conv
    data = Samples(8 * 6)
    expected = [compiled(data.x[i : i + 8].cuda()).cpu() for i in range(0, 48, 8)]
    copies = transfers.HostCopies(0)
    with ServingSession(compiled, TRTSettings(runtime_cache=None)) as session:
        for batch in session.upload_ahead(DataLoader(data, batch_size=8)):
            copies.add(compiled(batch))
    got = copies.collect()
    assert session.figures.uploads == "ahead, depth 2: 6 batches (6 under 64 KiB, not staged)"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
