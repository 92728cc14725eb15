"""CUDA-graph scopes over several targets, on CPU, with torch_tensorrt's real runtime module.

``enable_cudagraphs``, its context manager and ``get_cuda_graph_module`` are upstream's own, and so are
the process-global mode and its getters; only the whole-module wrapper class
(``CudaGraphsTorchTensorRTModule``, which needs CUDA to warm up) is replaced by a stand-in that does
what its ``forward`` does with the mode: capture when ``get_whole_cudagraphs_mode()`` is on at the
call, else run the module plainly. Each compiled target's forward records the mode its engines would
read at that moment (``_backend.engine_cudagraphs_mode()``: the C++ runtime's copy).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import nn

from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimeSettings, _backend
from lightning_trt_rtx.graphs import GraphScopes
from tests.procs.lightning_models import compiled_tree, make_trainer, predict_loader

STANDARD, SUBGRAPH, WHOLE = _backend.STANDARD, _backend.SUBGRAPH, _backend.WHOLE_GRAPH


class StandInWrapper(nn.Module):
    """Upstream's ``CudaGraphsTorchTensorRTModule`` as far as the mode goes (its __init__ needs CUDA)."""

    def __init__(self, compiled_module: nn.Module) -> None:
        super().__init__()
        self.compiled_module = compiled_module
        self.cudagraph: Any = None
        self.whole_seen: list[bool] = []

    def forward(self, *args: Any) -> Any:
        import torch_tensorrt

        whole = torch_tensorrt.runtime.get_whole_cudagraphs_mode()  # what upstream's forward reads
        self.whole_seen.append(whole)
        self.cudagraph = "captured" if whole else None  # upstream resets its graph when the mode is off
        return self.compiled_module(*args)


class Compiled(nn.Module):
    """Three real engine-less TorchTensorRTModules; its forward records the mode its engines would read."""

    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        tree = compiled_tree()
        self.e0, self.e1, self.block = tree.e0, tree.e1, tree.block
        if graph_break:  # PyTorch ops between engines, as upstream names them: enable_cudagraphs wraps it whole
            self._run_on_gpu_0 = nn.Identity()
        self.modes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(_backend.engine_cudagraphs_mode())
        return x + 1


class Mixed(LightningModule):
    """``backbone`` has a graph break (upstream wraps it whole), ``head`` has none (engines capture
    themselves); ``predict_step`` runs both and records the modes upstream's getters give there."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Compiled(graph_break=True)
        self.head = Compiled()
        self.seen: list[tuple[bool, bool]] = []  # (get_cudagraphs_mode, get_whole_cudagraphs_mode) per step
        self.meddle = False  # predict_step switches the mode off before running head

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        import torch_tensorrt

        runtime = torch_tensorrt.runtime
        self.seen.append((runtime.get_cudagraphs_mode(), runtime.get_whole_cudagraphs_mode()))
        features = self.backbone(batch)
        if self.meddle:
            torch_tensorrt.runtime.set_cudagraphs_mode(False)
        return self.head(features)


@pytest.fixture
def upstream(trt, monkeypatch):
    """The real runtime module with the stand-in wrapper class; the global mode put back whatever happens."""
    module = sys.modules["torch_tensorrt.runtime._cudagraphs"]
    monkeypatch.setattr(module, "CudaGraphsTorchTensorRTModule", StandInWrapper)
    before = module._PY_RT_CUDAGRAPHS
    assert before == STANDARD
    yield module
    _backend.restore_cudagraphs_mode(before)


def _callbacks(order: str) -> tuple[list[Any], TRTRuntimeSettings | None, TRTCudaGraphs]:
    graphs = TRTCudaGraphs()
    if order == "graphs-alone":
        return [graphs], None, graphs
    settings = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    return ([graphs, settings] if order == "graphs-first" else [settings, graphs]), settings, graphs


@pytest.mark.parametrize("order", ["graphs-alone", "graphs-first", "settings-first"])
def test_every_target_runs_its_own_graph(tmp_path, upstream, order):
    """The graph-break target's wrapper sees the whole-graph mode at every call, the other target's
    engines the subgraph mode at every call; the figures say so, read during the loop."""
    model = Mixed()
    callbacks, settings, graphs = _callbacks(order)
    outputs = make_trainer(tmp_path, callbacks).predict(model, predict_loader(batches=3))
    wrappers = {type(model.backbone)}
    assert wrappers == {Compiled}  # put back after the loop
    assert model.seen == [(True, False)] * 3  # the process-wide mode: what head's engines need
    assert model.backbone.modes == [WHOLE] * 3  # inside the wrapper's call: its graph ran
    assert model.head.modes == [SUBGRAPH] * 3
    assert _backend.cudagraphs_mode() == _backend.engine_cudagraphs_mode() == STANDARD  # restored
    for batch, out in zip(predict_loader(batches=3), outputs):
        torch.testing.assert_close(out, batch + 2)
    if settings is None:
        assert graphs.graphs == "backbone: whole-module graph; head: engine graphs"
    else:
        expected = "backbone: whole-module graph (engines' own capture off); head: engine graphs (whole_graph_capture)"
        assert settings.figures[0].graphs == graphs.graphs == expected


@pytest.mark.parametrize("targets", [["backbone", "head"], ["head", "backbone"], ["backbone"], ["head"]])
def test_scopes_give_each_target_its_mode_whatever_the_opening_order(upstream, targets):
    """Upstream's scopes each set the process-wide mode: whichever opened last used to win."""
    model = Mixed()
    scopes = GraphScopes(model, targets)
    scopes.open()
    try:
        wrapped = "backbone" in targets
        assert isinstance(model.backbone, StandInWrapper) == wrapped
        # the process-wide mode: subgraph while any target runs its engines' own graphs
        assert _backend.cudagraphs_mode() == (SUBGRAPH if "head" in targets else WHOLE)
        for _ in range(2):
            model.predict_step(torch.zeros(2, 4), 0)
            assert _backend.cudagraphs_mode() == (SUBGRAPH if "head" in targets else WHOLE)  # put back after a call
    finally:
        scopes.close()
    backbone, head = (m.compiled_module if isinstance(m, StandInWrapper) else m for m in (model.backbone, model.head))
    assert backbone.modes == [WHOLE if wrapped else (SUBGRAPH if "head" in targets else STANDARD)] * 2
    assert head.modes == [SUBGRAPH if "head" in targets else WHOLE] * 2
    assert _backend.cudagraphs_mode() == STANDARD
    expected = {"backbone": "backbone: whole-module graph", "head": "head: engine graphs"}
    assert scopes.describe() == "; ".join(expected[t] for t in targets)


def test_figures_say_when_a_target_ran_no_graph(tmp_path, upstream):
    """A predict_step that switches the mode off before calling head: the figures say what head saw."""
    model = Mixed()
    model.meddle = True
    settings = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    make_trainer(tmp_path, [TRTCudaGraphs(), settings]).predict(model, predict_loader(batches=2))
    assert model.backbone.modes == [WHOLE] * 2  # the wrapper's call sets its own mode, whatever it finds
    assert model.head.modes == [STANDARD] * 2
    assert settings.figures[0].graphs == (
        "backbone: whole-module graph (engines' own capture off);"
        " head: no graph (torch_tensorrt's CUDA-graphs mode was standard at its call)"
    )


def test_targets_never_called_are_reported_so(upstream):
    scopes = GraphScopes(Mixed())
    scopes.open()
    scopes.close()
    assert scopes.describe() == "backbone: not called; head: not called"


def test_a_wrapper_call_that_raises_gives_the_mode_back(upstream):
    model = Mixed()
    scopes = GraphScopes(model)
    scopes.open()
    try:
        with pytest.raises(TypeError):
            model.backbone("not a tensor")  # x + 1 fails inside the wrapped module
        assert _backend.cudagraphs_mode() == _backend.engine_cudagraphs_mode() == SUBGRAPH
        assert "backbone" not in scopes.ran  # a failed call is not what ran
    finally:
        scopes.close()
    assert "forward" not in vars(model.backbone)
    assert _backend.cudagraphs_mode() == STANDARD


def test_the_table_and_summary_show_what_each_target_ran():
    from lightning_trt_rtx.report import RankFigures, table

    ran = "backbone: whole-module graph; head: no graph (torch_tensorrt's CUDA-graphs mode was standard at its call)"
    rows = [RankFigures(rank=0, graphs=ran), RankFigures(rank=1)]
    header, _, first, second = table(rows).splitlines()
    assert "CUDA graphs" in header and ran in first and second.split()[-2:] == ["-", "-"]
    assert f"CUDA graphs: {ran}" in rows[0].summary()
    assert "CUDA graphs" not in table([RankFigures()])  # no column without TRTCudaGraphs
