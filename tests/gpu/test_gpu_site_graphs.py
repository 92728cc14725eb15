"""Call-site graphs with real TensorRT-RTX engines inside Trainer.predict (``pytest -m gpu``):
``$LIGHTNING_TRT_RTX_STABLE_ADDRESSES=graphs`` under whole-graph capture captures each call site in a
CUDA graph of its own; predictions equal eager on every batch (kept on the GPU, a smaller last batch, a
graph break, a loaded program, a dynamic batch), and the figures say what was replayed."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from lightning_trt_rtx import TRTRuntimeSettings, addresses
from lightning_trt_rtx.engines import find_engines
from tests.gpu.models import KeptPredictions, TwoBlocks, compile_trt, mlp, saved_resnet_like
from tests.helpers import run_if


class Holder(L.LightningModule):
    """Serves ``self.model``; records the engines' strategy at each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.strategies: set[str] = set()

    def predict_step(self, batch, batch_idx):
        self.strategies.update(e.get().cuda_graph_strategy for e in find_engines(self.model))
        return self.model(batch)


def _predict(model: torch.nn.Module, samples: list[torch.Tensor], batch_size: int | None, **settings):
    """Predictions kept on the GPU (a writer keeping them), over CPU samples (``batch_size=None``: each
    sample a batch): the figures and the writer."""
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False,
                                  **settings)  # fmt: skip
    writer = KeptPredictions()
    holder = Holder(model)
    trainer = L.Trainer(accelerator="gpu", devices=1, callbacks=[callback, writer], logger=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    loader = torch.utils.data.DataLoader(samples, batch_size=batch_size)
    trainer.predict(holder, loader, return_predictions=False)
    return callback.figures[0], writer.written, holder, loader


def _check(eager: torch.nn.Module, loader, written, tol: float = 5e-2) -> None:
    with torch.no_grad():
        expected = [eager(batch.cuda().to(next(eager.parameters()).dtype)) for batch in loader]
    assert len(written) == len(expected)
    assert not torch.equal(expected[0], expected[1])
    for i, (got, want) in enumerate(zip(written, expected, strict=True)):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=f"batch {i}")


def _note(text: str) -> None:
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "site-graphs.txt"), "a", encoding="utf-8") as f:
            f.write(text + "\n")


@pytest.fixture
def graphs_mode(monkeypatch):
    monkeypatch.setenv(addresses.ENABLED_ENV, "graphs")


@run_if(min_cuda_gpus=1, rtx=True)
def test_a_compiled_model_is_replayed_and_every_kept_prediction_is_right(graphs_mode):
    torch.manual_seed(0)
    eager = mlp(256, 32).cuda().eval().half()
    compiled = compile_trt(eager, torch.randn(8, 256, device="cuda", dtype=torch.float16))
    samples = [torch.randn(256, dtype=torch.float16) for _ in range(8 * 31)]  # its engine takes batches of 8 only
    figures, written, holder, loader = _predict(compiled, samples, 8)
    _note(f"compiled MLP: {figures.capture}")
    _check(eager, loader, written)
    assert holder.strategies == {"disabled"}  # the engines' own capture off: ours holds their launches
    assert figures.capture.startswith("call-site graphs: 1 call site(s), 1 capture(s), 29 of 31 call(s)"), figures
    assert all("forward" not in vars(e.obj) for e in find_engines(compiled))  # given back
    assert {e.get().cuda_graph_strategy for e in find_engines(compiled)} == {"disabled"}  # as they were


@run_if(min_cuda_gpus=1, rtx=True)
def test_a_model_with_a_graph_break_has_each_engine_replayed(graphs_mode):
    torch.manual_seed(0)
    eager = TwoBlocks().cuda().eval()
    compiled = compile_trt(eager, torch.randn(8, 64, device="cuda"), graph_break=True)
    figures, written, _, loader = _predict(compiled, [torch.randn(64) for _ in range(8 * 12)], 8)
    _note(f"graph break: {figures.capture}")
    _check(eager, loader, written, tol=2e-2)
    assert figures.capture.startswith("call-site graphs: 2 call site(s), 2 capture(s), 20 of 24 call(s)"), figures


@run_if(min_cuda_gpus=1, rtx=True)
def test_a_loaded_program_is_replayed_whole(graphs_mode, tmp_path):
    from lightning_trt_rtx import load_program

    path = str(tmp_path / "resnet.ep")
    eager, _ = saved_resnet_like(path)
    program = load_program(path)
    figures, written, _, loader = _predict(program, [torch.randn(3, 32, 32) for _ in range(8 * 12)], 8)
    _note(f"loaded program: {figures.capture}")
    _check(eager, loader, written, tol=2e-2)
    assert figures.capture.startswith("call-site graphs: 1 call site(s), 1 capture(s), 10 of 12 call(s)"), figures


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("kernels", ["lazy", "eager"])
def test_a_dynamic_batch_is_right_whether_or_not_its_engine_can_be_captured(graphs_mode, kernels):
    """TensorRT-RTX says whether an engine with a dynamic input can be captured (lazy kernel specialization
    swaps kernels while it runs); where it cannot, the site runs as it is and the figures say why."""
    import torch_tensorrt

    torch.manual_seed(0)
    eager = mlp(128, 4).cuda().eval().half()
    spec = torch_tensorrt.Input(min_shape=(1, 128), opt_shape=(8, 128), max_shape=(16, 128), dtype=torch.float16)
    compiled = compile_trt(eager, spec)
    samples = [torch.randn(128, dtype=torch.float16) for _ in range(8 * 10 + 5)]
    figures, written, _, loader = _predict(
        compiled, samples, 8, dynamic_shapes_kernel_specialization_strategy=kernels
    )
    _note(f"dynamic batch, {kernels} kernels: {figures.capture}")
    _check(eager, loader, written)
    capture = figures.capture
    assert capture.startswith("call-site graphs: 1 call site(s)"), capture
    if "NOT captured" in capture:
        assert "lazy kernel specialization" in capture and kernels == "lazy", capture
    else:
        assert ", 1 capture(s), 8 of 11 call(s)" in capture, capture


@run_if(min_cuda_gpus=1, rtx=True)
def test_shapes_that_come_in_runs_are_each_captured_in_turn_and_right(graphs_mode):
    """A dynamic batch whose sizes come in runs (8, 16, 8): each run is captured after 2 calls, the graph
    before it freed (TensorRT ties a graph to the context's shapes), every prediction right."""
    import torch_tensorrt

    torch.manual_seed(0)
    eager = mlp(128, 4).cuda().eval().half()
    spec = torch_tensorrt.Input(min_shape=(1, 128), opt_shape=(8, 128), max_shape=(16, 128), dtype=torch.float16)
    compiled = compile_trt(eager, spec)
    sizes = [8] * 5 + [16] * 5 + [8] * 5
    batches = [torch.randn(n, 128, dtype=torch.float16) for n in sizes]
    figures, written, _, loader = _predict(
        compiled, batches, None, dynamic_shapes_kernel_specialization_strategy="eager"
    )
    _note(f"shapes in runs: {figures.capture}")
    _check(eager, loader, written)
    assert figures.capture.startswith("call-site graphs: 1 call site(s), 3 capture(s), 9 of 15 call(s)"), figures


@run_if(min_cuda_gpus=1, rtx=True)
def test_a_prewarm_and_apply_settings_in_a_session_free_the_graphs_and_every_output_is_right(graphs_mode, tmp_path):
    """A ServingSession under call-site graphs, as the README shows it: a graph captured, then a prewarm (eager
    kernels, new execution contexts) and ``apply_settings`` each free it; the next calls capture again, and
    every output equals eager (a graph replayed into the replaced contexts' memory would not)."""
    import torch_tensorrt

    from lightning_trt_rtx import ServingSession, TRTSettings

    torch.manual_seed(0)
    eager = mlp(128, 4).cuda().eval().half()
    spec = torch_tensorrt.Input(min_shape=(1, 128), opt_shape=(8, 128), max_shape=(16, 128), dtype=torch.float16)
    compiled = compile_trt(eager, spec)
    xs = [torch.randn(8, 128, device="cuda", dtype=torch.float16) for _ in range(24)]
    # lazy kernels (the default): the prewarm's eager ones re-create the execution contexts
    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=str(tmp_path / "gpu-{gpu}.bin"))

    def run(batch: torch.Tensor) -> None:
        with torch.inference_mode():
            got = compiled(batch)
            torch.testing.assert_close(got, eager(batch), atol=5e-2, rtol=5e-2)

    with ServingSession(compiled, settings) as session:
        assert session.stable is not None and session.stable.graphs
        site = session.stable.sites[0]
        for x in xs[:4]:
            run(x)
        assert site.graph is not None and site.replays >= 1
        session.prewarm([xs[0][:4], xs[0]])
        assert site.graph is None  # the prewarm's new contexts freed it
        for x in xs[4:10]:
            run(x)
        assert site.graph is not None
        assert session.apply_settings(dynamic_shapes_kernel_specialization_strategy="eager") >= 1
        assert site.graph is None
        for x in xs[10:16]:
            run(x)
        assert session.apply_settings() >= 1 and site.graph is None  # back to the session's own
        for x in xs[16:]:
            run(x)
        captures, replays = site.captures, site.replays
    _note(f"session with a prewarm and apply_settings: {session.figures.capture}")
    # one capture per settings (a graph kept across a change would replay the old contexts' memory instead)
    assert captures == 4 and replays >= 24 - 4 * addresses.GRAPH_AFTER, (captures, replays)
