"""``cuda_graph_strategy="auto"`` with real TensorRT-RTX engines inside Trainer.predict (``pytest -m gpu``):
it keeps graphs on a launch-bound MLP, and on a big-kernel conv net it keeps whatever runs fastest
(within 5% of the best fixed strategy after its trial); predictions equal eager on every batch,
through every switch of the trial."""

from __future__ import annotations

import os
import time

import lightning as L
import torch

from lightning_trt_rtx import TRTRuntimeSettings, addresses, auto
from lightning_trt_rtx.engines import find_engines
from tests.gpu.models import KeptPredictions, compile_trt, mlp
from tests.helpers import run_if

# batches of a first trial with held addresses (the first candidate warms up longer)
TRIAL = sum(auto.WARMUP.values()) + len(auto.CANDIDATES) * auto.TIMED + auto.FIRST_EXTRA_WARMUP


class Holder(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def predict_step(self, batch, batch_idx):
        return self.model(batch)


class SteadyAfter(L.Callback):
    """Per-batch ms from batch ``start`` to the loop's end (synchronised at both edges only)."""

    def __init__(self, start: int) -> None:
        self.start, self.ms, self._t0, self._n = start, 0.0, 0.0, 0

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.start:
            torch.cuda.synchronize()
            self._t0 = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._n = batch_idx + 1

    def on_predict_epoch_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.ms = (time.perf_counter() - self._t0) * 1e3 / (self._n - self.start)


def _trainer(*callbacks) -> L.Trainer:
    return L.Trainer(accelerator="gpu", devices=1, callbacks=list(callbacks), logger=False,
                     enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def _gpu_batches(example: torch.Tensor, batches: int) -> list[torch.Tensor]:
    """Batches already on the GPU (the upload is not what is compared)."""
    return [torch.randn_like(example) for _ in range(batches)]


class Stream(torch.utils.data.IterableDataset):
    """Batches of a length the loop does not know (a stream): ``"auto"`` treats the loop as long."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _loader(batches: list[torch.Tensor], known: bool = False) -> torch.utils.data.DataLoader:
    # each tensor is a batch, as it is
    return torch.utils.data.DataLoader(batches if known else Stream(batches), batch_size=None)


def _predict(compiled, batches, strategy: str, template: str, *extra, known: bool = False):
    callback = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)
    loader = _loader(batches, known)
    outputs = _trainer(callback, *extra).predict(Holder(compiled), loader, return_predictions=True)
    return callback, outputs


@run_if(min_cuda_gpus=1, rtx=True)
def test_auto_keeps_graphs_on_a_launch_bound_model_and_every_prediction_is_right(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 256, device="cuda", dtype=torch.float16)
    eager = mlp(256, 32).cuda().eval().half()
    compiled = compile_trt(eager, x)
    batches = _gpu_batches(x, TRIAL + 60)
    writer = KeptPredictions()
    template = str(tmp_path / "gpu-{gpu}.bin")
    _predict(compiled, batches[:4], "disabled", template)  # fill the kernel cache: switches re-JIT warm
    callback, _ = _predict(compiled, batches, "auto", template, writer)
    figures = callback.figures[0]
    _note("auto-mlp.txt", f"first loop: {figures.auto}")  # before the checks: a failure says what ran
    with torch.no_grad():
        for x_i, got in zip(batches, writer.written, strict=True):  # through every switch of the trial
            torch.testing.assert_close(got, eager(x_i), atol=5e-2, rtol=5e-2)
    graphs = ("kept whole_graph_capture", f"kept {auto.HELD}", f"kept {auto.SITE_GRAPHS}")
    assert figures.auto.startswith(graphs), figures.auto
    medians = figures.auto_ms
    # call-site graphs run under the default's strategy: tried without a switch
    assert {auto.DISABLED, auto.SITE_GRAPHS} <= set(medians), medians
    kept = figures.auto.removeprefix("kept ").split(" (")[0]
    assert medians[kept] < medians[auto.DISABLED] * (1 - auto.MARGIN), medians
    if auto.UPSTREAM in medians:  # where the engines' own capture was tried: a switch, measured
        assert "a strategy switch cost" in figures.auto, figures.auto
    assert all("forward" not in vars(e.obj) for e in find_engines(compiled))  # given back
    # a later loop over the same engines (another LightningModule) starts with the decision: one window checks it
    writer = KeptPredictions()
    callback, _ = _predict(compiled, batches[:40], "auto", template, writer)
    again = callback.figures[0].auto
    _note("auto-mlp.txt", f"later loop: {again}")
    assert again.startswith(f"kept {kept}, decided earlier in this process"), again
    with torch.no_grad():
        for x_i, got in zip(batches, writer.written, strict=False):
            torch.testing.assert_close(got, eager(x_i), atol=5e-2, rtol=5e-2)
    # a loop too short to win back re-creating the execution contexts tries nothing (nothing remembered)
    auto.forget(compiled)
    callback, outputs = _predict(compiled, batches[:24], "auto", template, known=True)
    short = callback.figures[0].auto
    _note("auto-mlp.txt", f"short loop: {short}")
    assert short.startswith("kept disabled") and "batches left could not" in short, short
    print(f"launch-bound MLP: {figures.auto}\nlater loop: {again}\nshort loop: {short}")


def _note(name: str, text: str) -> None:
    """Append ``text`` to ``$OUT/name`` where the GPU host collects files (``device`` runs): written before
    the checks, so a failed or cut run still says what auto kept and why."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "a", encoding="utf-8") as f:
            f.write(text + "\n")


def convnet() -> torch.nn.Module:
    """ResNet-ish, few long kernels at batch 32: CUDA graphs save launches that are not the cost here."""
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU()]
    for _ in range(6):
        layers += [torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)]
    return torch.nn.Sequential(*layers)


@run_if(min_cuda_gpus=1, rtx=True)
def test_auto_on_a_big_kernel_model_is_within_5_percent_of_the_best_strategy(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, 64, device="cuda", dtype=torch.float16)
    eager = convnet().cuda().eval().half()
    compiled = compile_trt(eager, x)
    batches = _gpu_batches(x, TRIAL + 80)
    template = str(tmp_path / "gpu-{gpu}.bin")
    _predict(compiled, batches[:4], "disabled", template)
    steady: dict[str, float] = {}
    for name, strategy, env in (("disabled", "disabled", "1"), ("upstream", "whole_graph_capture", "0"),
                                ("held", "whole_graph_capture", "1"), ("site", "whole_graph_capture", "graphs"),
                                ("auto", "auto", "1")):  # fmt: skip
        monkeypatch.setenv(addresses.ENABLED_ENV, env)
        timer = SteadyAfter(TRIAL + 5)  # after auto's trial: what it kept against each fixed strategy
        callback, outputs = _predict(compiled, batches, strategy, template, timer)
        steady[name] = timer.ms
        if name == "auto":
            figures = callback.figures[0]
            with torch.no_grad():
                for x_i, got in zip(batches[::9], outputs[::9]):
                    torch.testing.assert_close(got.cuda(), eager(x_i), atol=5e-2, rtol=5e-2)
    print(f"big-kernel conv net, ms per batch after the trial: {steady}; auto {figures.auto}")
    _note("auto-convnet.txt", f"{steady}\n{figures.auto}")  # before the checks
    best = min(steady[n] for n in ("disabled", "upstream", "held", "site"))
    assert steady["auto"] <= best * 1.05, (steady, figures.auto)
    assert figures.auto.startswith("kept "), figures.auto
