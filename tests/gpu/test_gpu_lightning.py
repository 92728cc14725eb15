"""The callbacks and plugin with real TensorRT-RTX engines inside Trainer.predict (``pytest -m gpu``)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimePrecision, TRTRuntimeSettings, _backend
from lightning_trt_rtx.engines import find_engines
from tests.gpu.models import KeptPredictions, TwoBlocks, compile_trt, mlp
from tests.helpers import run_if

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Holder(L.LightningModule):
    """Serves ``self.model``; records what the engines hold and what is called at each step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen_settings: list = []
        self.called: list[type] = []

    def predict_step(self, batch, batch_idx):
        self.seen_settings.append([e.get() for e in find_engines(self.model)])
        self.called.append(type(self.model))
        return self.model(batch)


def _trainer(*callbacks, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu", devices=1, callbacks=list(callbacks), logger=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


def _loader(example: torch.Tensor, batches: int) -> torch.utils.data.DataLoader:
    data = [torch.randn_like(example[0]).cpu() for _ in range(example.shape[0] * batches)]
    return torch.utils.data.DataLoader(data, batch_size=example.shape[0])


@pytest.fixture(scope="module")
def two_blocks():
    torch.manual_seed(0)
    x = torch.randn(8, 64, device="cuda")
    eager = TwoBlocks().cuda().eval()
    return eager, compile_trt(eager, x, graph_break=True), x


@run_if(min_cuda_gpus=1, rtx=True)
def test_trainer_predict_creates_one_context_per_engine(two_blocks, tmp_path):
    _, compiled, x = two_blocks
    holder = Holder(compiled)
    cache = str(tmp_path / "r{rank}.bin")
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=cache)
    _trainer(callback).predict(holder, _loader(x, 6))
    assert all(s.cuda_graph_strategy == "whole_graph_capture" for s in holder.seen_settings[0])
    engines = find_engines(compiled)
    assert len(engines) == 2
    assert [_backend.contexts_created(e.obj.engine) for e in engines] == [1, 1]
    assert callback.figures[0].engines == 2 and callback.figures[0].batches == 6
    assert os.path.getsize(tmp_path / "r0.bin") > 0
    assert all(e.get().cuda_graph_strategy == "disabled" for e in engines)  # restored


def _serve(program: str, template: str, env: dict | None = None) -> dict:
    return _figures(_start_serving(program, template, env))


def _start_serving(program: str, template: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.gpu.serve_worker", program, template],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})),
    )


def _figures(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    row = json.loads(next(line for line in out.splitlines() if line.startswith("FIGURES "))[8:])
    row["stderr"] = err
    return row


@pytest.fixture(scope="module")
def conv_program(tmp_path_factory):
    import torch_tensorrt

    from tests.gpu.models import ConvNet

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    path = str(tmp_path_factory.mktemp("program") / "conv.ep")
    torch_tensorrt.save(compile_trt(ConvNet(), x), path, inputs=[x])
    return path


@run_if(min_cuda_gpus=1, rtx=True)
def test_second_run_starts_warm_and_loaded_programs_are_served(conv_program, tmp_path):
    template = str(tmp_path / "{sm}-{trt}" / "rank{rank}.bin")
    cold = _serve(conv_program, template)
    warm = _serve(conv_program, template)
    assert (cold["cache_source"], warm["cache_source"]) == ("cold", "warm")
    assert cold["engines"] >= 1 and cold["contexts"] == [1] * cold["engines"]
    assert warm["cache_bytes"] == cold["saved_bytes"] > 0
    ratio = cold["first_batch_ms"] / warm["first_batch_ms"]
    print(f"\n[{torch.cuda.get_device_name()}] Trainer.predict first batch: cold {cold['first_batch_ms']:.1f} ms,"
          f" warm {warm['first_batch_ms']:.1f} ms ({ratio:.1f}x)")
    assert ratio >= 3.0


@run_if(min_cuda_gpus=1, rtx=True)
def test_whole_graph_capture_gives_every_batch_its_own_output(tmp_path):
    # a captured graph replays fixed addresses: a new batch tensor each step must still get its own result.
    # Speed is the benchmark's job (benchmarks/run.py, "graphs"): a timed assert here failed on an H100.
    torch.manual_seed(0)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.half)
    compiled = compile_trt(mlp().half(), x)  # strongly typed: fp16 weights and inputs give an fp16 engine
    loader = _loader(x, 50)
    outputs, served = {}, {}
    for strategy in ("disabled", "whole_graph_capture"):
        holder = Holder(compiled)
        callback = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=None, print_table=False)
        outputs[strategy] = torch.stack(_trainer(callback).predict(holder, loader))
        served[strategy] = {s.cuda_graph_strategy for step in holder.seen_settings for s in step}
    assert served == {"disabled": {"disabled"}, "whole_graph_capture": {"whole_graph_capture"}}
    assert outputs["disabled"].shape == (50, 8, 1024)
    assert not torch.equal(outputs["disabled"][0], outputs["disabled"][1])  # the batches differ
    torch.testing.assert_close(outputs["whole_graph_capture"], outputs["disabled"], rtol=1e-2, atol=1e-2)


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("strategy", ["disabled", "whole_graph_capture"])
@pytest.mark.parametrize("order", ["graphs_first", "settings_first"])
def test_graph_break_model_under_cuda_graphs_matches_eager(two_blocks, order, strategy):
    # whole_graph_capture inside the wrapper's whole-module capture was a nested capture that CUDA refused
    eager, compiled, x = two_blocks
    holder = Holder(compiled)
    settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=None, print_table=False)
    callbacks = [TRTCudaGraphs(), settings]
    if order == "settings_first":
        callbacks.reverse()
    loader = _loader(x, 4)
    outputs = _trainer(*callbacks).predict(holder, loader)
    from torch_tensorrt.dynamo.runtime._CudaGraphsTorchTensorRTModule import CudaGraphsTorchTensorRTModule

    assert set(holder.called) == {CudaGraphsTorchTensorRTModule}  # calls went through the wrapper
    assert holder.model is compiled  # and the attribute was put back
    assert _backend.cudagraphs_mode() == 0  # process-global mode restored
    # inside the wrapper the engines leave the capture to it; afterwards they hold their prior settings
    assert all(s.cuda_graph_strategy == "disabled" for step in holder.seen_settings for s in step)
    assert all(e.get().cuda_graph_strategy == "disabled" for e in find_engines(compiled))
    with torch.no_grad():
        expected = [eager(batch.cuda()) for batch in loader]
    for got, want in zip(outputs, expected):
        # Trainer.predict hands predictions back on the CPU
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=2e-2, rtol=2e-2)


class _MixedChildren(L.LightningModule):
    """``backbone`` has a graph break (upstream wraps it in a whole-module graph), ``head`` has none (its
    engines capture themselves). Records, per step, the modes upstream's getters give in ``predict_step``,
    whether the wrapper holds a captured graph after its call, and (at each capture) the mode the
    wrapped module ran under."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.modes: list[tuple[bool, bool]] = []
        self.wrapper_graph: list[bool] = []
        self.whole_inside: list[bool] = []
        self.wrapped: set[type] = set()

    def predict_step(self, batch, batch_idx):
        import torch_tensorrt

        from lightning_trt_rtx.engines import find_engines

        if batch_idx == 0 and hasattr(self.backbone, "compiled_module"):
            self.hook = self.backbone.compiled_module.register_forward_pre_hook(
                lambda *_: self.whole_inside.append(torch_tensorrt.runtime.get_whole_cudagraphs_mode())
            )
        runtime = torch_tensorrt.runtime
        self.modes.append((runtime.get_cudagraphs_mode(), runtime.get_whole_cudagraphs_mode()))
        self.wrapped.add(type(self.backbone))
        features = self.backbone(batch)
        self.wrapper_graph.append(getattr(self.backbone, "cudagraph", None) is not None)
        assert find_engines(self.head)  # head is called as itself: its engines capture themselves
        return self.head(features)


@pytest.fixture(scope="module")
def mixed_children():
    torch.manual_seed(0)
    x = torch.randn(8, 64, device="cuda")
    backbone, head = TwoBlocks().cuda().eval(), mlp(64, 2).cuda().eval()
    with torch.no_grad():
        features = backbone(x)
    return backbone, head, compile_trt(backbone, x, graph_break=True), compile_trt(head, features), x


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("order", ["graphs_alone", "graphs_first", "settings_first"])
def test_mixed_children_each_run_their_own_graph(mixed_children, order):
    """Two compiled children, one with a graph break: the backbone's whole-module graph runs (the last
    scope opened used to set the process-wide mode for both), the head's engines capture themselves,
    outputs equal eager on every batch, and the figures say what was observed."""
    from torch_tensorrt.dynamo.runtime._CudaGraphsTorchTensorRTModule import CudaGraphsTorchTensorRTModule

    eager_backbone, eager_head, backbone, head, x = mixed_children
    model = _MixedChildren(backbone, head)
    graphs = TRTCudaGraphs()
    settings = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    callbacks = {"graphs_alone": [graphs], "graphs_first": [graphs, settings], "settings_first": [settings, graphs]}
    loader = _loader(x, 6)
    try:
        outputs = _trainer(*callbacks[order]).predict(model, loader)
    finally:
        if hasattr(model, "hook"):
            model.hook.remove()  # the compiled backbone serves the other orders too
    assert model.wrapped == {CudaGraphsTorchTensorRTModule}
    assert model.modes == [(True, False)] * 6  # in predict_step: the subgraph mode the head's engines read
    assert model.wrapper_graph == [True] * 6  # the backbone's whole-module graph ran on every batch
    assert model.whole_inside and all(model.whole_inside)  # its captures ran under the whole-graph mode
    assert model.backbone is backbone and model.head is head
    assert _backend.cudagraphs_mode() == 0
    with torch.no_grad():
        expected = [eager_head(eager_backbone(batch.cuda())) for batch in loader]
    assert not torch.equal(expected[0], expected[1])
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=2e-2, rtol=2e-2)
    if order == "graphs_alone":
        assert graphs.graphs == "backbone: whole-module graph; head: engine graphs"
    else:
        assert settings.figures[0].graphs == graphs.graphs == (
            "backbone: whole-module graph (engines' own capture off); head: engine graphs (whole_graph_capture)"
        )
    print(f"\n[{torch.cuda.get_device_name()}] {order}: {graphs.graphs}")


@run_if(min_cuda_gpus=1, rtx=True)
def test_precision_plugin_applies_in_convert_module(two_blocks, tmp_path):
    _, compiled, x = two_blocks
    holder = Holder(compiled)
    plugin = TRTRuntimePrecision("32-true", dynamic_shapes_kernel_specialization_strategy="eager",
                                 runtime_cache=str(tmp_path / "p{rank}.bin"))
    _trainer(plugins=[plugin]).predict(holder, _loader(x, 2))
    assert all(s.dynamic_shapes_kernel_specialization_strategy == "eager" for s in holder.seen_settings[0])
    assert os.path.getsize(tmp_path / "p0.bin") > 0


# --- the kernel cache follows the physical GPU (two GPUs) ----------------------------------------------


def _on(gpu: int, cache_dir) -> dict:
    return {"CUDA_VISIBLE_DEVICES": str(gpu), "LIGHTNING_TRT_RTX_CACHE_DIR": str(cache_dir)}


@run_if(min_cuda_gpus=2, rtx=True)
def test_default_cache_follows_the_gpu_in_either_order(conv_program, tmp_path):
    # one process per GPU, each seen as device 0: with the default template each GPU keeps its own file
    first = [_serve(conv_program, "default", _on(gpu, tmp_path)) for gpu in (0, 1)]
    second = [_serve(conv_program, "default", _on(gpu, tmp_path)) for gpu in (1, 0)]  # the other order
    assert [r["cache_source"] for r in first] == ["cold", "cold"]
    assert [r["cache_source"] for r in second] == ["warm", "warm"]
    assert first[0]["gpu"] != first[1]["gpu"] and {r["gpu"] for r in second} == {r["gpu"] for r in first}
    files = sorted(glob.glob(str(tmp_path / "*" / "gpu-*.bin")))
    assert [os.path.basename(f) for f in files] == sorted(f"gpu-{r['gpu']}.bin" for r in first)
    for cold, warm in zip(first, reversed(second)):
        ratio = warm["first_batch_ms"] / cold["first_batch_ms"]
        print(f"\n[{cold['device']}] GPU {cold['gpu']}: first batch cold {cold['first_batch_ms']:.1f} ms,"
              f" warm after the order swap {warm['first_batch_ms']:.1f} ms ({ratio:.3f} of cold)")
        assert ratio <= 0.25


@run_if(min_cuda_gpus=2, rtx=True)
def test_two_concurrent_single_gpu_jobs_are_both_warm_on_their_second_run(conv_program, tmp_path):
    runs = []
    for _ in range(2):
        jobs = [_start_serving(conv_program, "default", _on(gpu, tmp_path)) for gpu in (0, 1)]
        runs.append([_figures(job) for job in jobs])
    assert [r["cache_source"] for r in runs[0]] == ["cold", "cold"]
    assert [r["cache_source"] for r in runs[1]] == ["warm", "warm"]
    for cold, warm in zip(*runs):
        print(f"\n[{cold['device']}] concurrent job on GPU {cold['gpu']}: cold {cold['first_batch_ms']:.1f} ms,"
              f" warm {warm['first_batch_ms']:.1f} ms ({warm['first_batch_ms'] / cold['first_batch_ms']:.3f})")
        assert "changed on disk" not in warm["stderr"]


@run_if(min_cuda_gpus=2, rtx=True)
def test_a_file_copied_to_the_other_gpu_is_reported_as_such(conv_program, tmp_path):
    template = str(tmp_path / "copied.bin")  # one fixed file: a user copying a cache between machines/GPUs
    filled = _serve(conv_program, template, {"CUDA_VISIBLE_DEVICES": "0"})
    elsewhere = _serve(conv_program, template, {"CUDA_VISIBLE_DEVICES": "1"})
    assert (filled["cache_source"], elsewhere["cache_source"], elsewhere["applies"]) == ("cold", "other-gpu", "no")
    assert elsewhere["cache_bytes"] == filled["saved_bytes"] > 0
    assert "was filled on another GPU" in elsewhere["stderr"]
    print(f"\n[{filled['device']}] copied file: GPU {filled['gpu']} filled it (cold {filled['first_batch_ms']:.1f}"
          f" ms); GPU {elsewhere['gpu']} ran its first batch in {elsewhere['first_batch_ms']:.1f} ms, reported"
          f" {elsewhere['cache_source']!r}\n{elsewhere['stderr'].strip()[-600:]}")


@run_if(min_cuda_gpus=1, rtx=True)
def test_corrupt_file_and_read_only_directory_messages_reach_stderr(conv_program, tmp_path):
    template = str(tmp_path / "c" / "cache.bin")
    os.makedirs(os.path.dirname(template))
    with open(template, "wb") as f:
        f.write(b"not a cache at all")
    corrupt = _serve(conv_program, template)
    assert corrupt["cache_source"] == "corrupt" and os.path.exists(template + ".corrupt")
    assert "is unusable" in corrupt["stderr"]
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        filled = _serve(conv_program, str(mnt / "cache.bin"))
        assert subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode == 0
        read_only = _serve(conv_program, str(mnt / "cache.bin"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert filled["saved_bytes"] > 0 and read_only["cache_source"] == "warm"
    assert read_only["saved_bytes"] == 0 and "Could not save the kernel cache" in read_only["stderr"]
    print("\nas printed:\n" + corrupt["stderr"].strip()[-800:] + "\n" + read_only["stderr"].strip()[-800:])


def _first_execute_on(visible: str, ordinal: int, template: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.gpu.ordinal_worker", str(ordinal), template], cwd=ROOT, capture_output=True,
        text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=visible),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("FIGURES "))[8:])


@run_if(min_cuda_gpus=2, rtx=True)
def test_a_cache_applies_only_under_the_device_number_that_filled_it(tmp_path):
    # measured (2 x H200): one GPU's file, filled as cuda:1, ran as cold when used as cuda:0, and the
    # same GPU as cuda:0 under another CUDA_VISIBLE_DEVICES order was warm: the identity is both
    template = str(tmp_path / "gpu-{gpu}.bin")
    filled = _first_execute_on("0,1", 1, template)  # physical GPU 1 as cuda:1
    again = _first_execute_on("0,1", 1, template)
    renumbered = _first_execute_on("1", 0, template)  # the same GPU, now cuda:0: its own file, cold
    renumbered_again = _first_execute_on("1,0", 0, template)  # cuda:0 again, another order: warm
    back = _first_execute_on("0,1", 1, template)  # the first numbering's kernels were not overwritten
    assert [r["source"] for r in (filled, again, renumbered, renumbered_again, back)] == [
        "cold", "warm", "cold", "warm", "warm",
    ]  # fmt: skip
    assert filled["path"] != renumbered["path"] and filled["gpu"] == renumbered["gpu"] + "-1"
    for r in (filled, again, renumbered, renumbered_again, back):
        print(f"\n[{r['device']}] {r['gpu']}: {r['source']} first execute {r['first_ms']:.1f} ms")
    assert again["first_ms"] < filled["first_ms"] / 3 and renumbered_again["first_ms"] < renumbered["first_ms"] / 3


# --- whole-graph capture with stable addresses --------------------------------------------------------


class _Watched(Holder):
    """Also records the output buffers each TorchTensorRTModule keeps after every step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.kept_outputs: list[list[int]] = []

    def predict_step(self, batch, batch_idx):
        out = super().predict_step(batch, batch_idx)
        held = [e.obj.pre_allocated_outputs for e in find_engines(self.model) if e.kind == "module"]
        self.kept_outputs.append([outputs[0].data_ptr() if outputs else None for outputs in held])
        return out


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("graph_break", [False, True], ids=["one-engine", "graph-break"])
def test_whole_graph_capture_holds_addresses_and_never_overwrites_predictions(graph_break):
    import torch_tensorrt

    torch.manual_seed(0)
    eager = (TwoBlocks() if graph_break else mlp(64, 4)).cuda().eval()
    # a dynamic batch: the smaller last batch is a shape the engine must accept (a static engine refuses it)
    batch = torch_tensorrt.Input(min_shape=(1, 64), opt_shape=(8, 64), max_shape=(8, 64), dtype=torch.float32)
    compiled = compile_trt(eager, batch, graph_break=graph_break)
    data = [torch.randn(64) for _ in range(8 * 6 + 3)]  # a new tensor every batch, and a smaller last batch
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    holder, writer = _Watched(compiled), KeptPredictions()
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    outputs = _trainer(callback, writer).predict(holder, loader)
    with torch.no_grad():
        expected = [eager(batch.cuda()).cpu() for batch in loader]
    assert len(outputs) == len(writer.written) == len(expected) == 7
    for got, written, want in zip(outputs, writer.written, expected):  # no later batch overwrote one
        torch.testing.assert_close(got.cpu(), want, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(written.cpu(), want, atol=1e-2, rtol=1e-2)
    # the kept predictions moved the model's outputs between batches 0 and 1: from batch 2 the engine
    # producing them keeps its outputs, allocated at batch 2 and the same through the full batches
    # (an intermediate engine of the graph-break model holds only if its own addresses move: not compared)
    steady = [step[-1] for step in holder.kept_outputs[2:6]]
    assert steady[0] is not None and all(step == steady[0] for step in steady), holder.kept_outputs
    capture = callback.figures[0].capture
    assert capture.startswith("stable addresses: ") and "outputs kept and copied out" in capture, capture
    assert "outputs moved" not in capture, capture
    assert all("forward" not in vars(e.obj) for e in find_engines(compiled))  # given back


@run_if(min_cuda_gpus=1, rtx=True)
@pytest.mark.parametrize("kept", [False, True], ids=["predictions-copied", "predictions-kept"])
def test_a_loaded_resnet_style_program_is_held_under_whole_graph_capture(tmp_path, kept):
    """A program saved with ``torch_tensorrt.save`` and served with ``load_program`` (its engine sits on
    a container module of the program graph; a saved ResNet-50 used to be left alone): its addresses are
    held, its outputs equal eager on every batch, also with every prediction kept on the GPU."""
    from lightning_trt_rtx import load_program
    from lightning_trt_rtx.addresses import _inputs_written
    from tests.gpu.models import saved_resnet_like

    path = str(tmp_path / "resnet.ep")
    eager, x = saved_resnet_like(path)
    program = load_program(path)
    engines = find_engines(program)
    assert engines and all(e.kind == "bare" and e.runner is program for e in engines), engines
    assert _inputs_written(program) == [], program.graph  # provably writes into no input: inputs held too
    loader = _loader(x, 12)
    writer = KeptPredictions() if kept else _Copied()
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
    outputs = _trainer(callback, writer).predict(Holder(program), loader, return_predictions=not kept)
    with torch.no_grad():
        expected = [eager(batch.cuda()).cpu() for batch in loader]
    assert not torch.equal(expected[0], expected[1])
    for i, want in enumerate(expected):
        torch.testing.assert_close(writer.written[i].float().cpu(), want, atol=2e-2, rtol=2e-2)
        if not kept:
            torch.testing.assert_close(outputs[i].float().cpu(), want, atol=2e-2, rtol=2e-2)
    capture = callback.figures[0].capture
    print(f"\n[{torch.cuda.get_device_name()}] loaded ResNet-style program, {len(engines)} engine(s): {capture}")
    assert capture.startswith(f"stable addresses: {len({id(e.runner) for e in engines})} call site(s)"), capture
    assert "left as they are" not in capture and "NOT held" not in capture, capture
    if kept:  # the kept predictions moved the program's outputs: held from then on, no capture after that
        assert "outputs kept and copied out" in capture and "outputs moved" not in capture, capture
    assert "inputs moved" not in capture, capture  # a program that writes no input has its inputs held too


class _Copied(L.pytorch.callbacks.BasePredictionWriter):
    """A prediction writer that keeps a host copy of every prediction (and so holds no engine output)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.written: list[torch.Tensor] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.written.append(prediction.cpu())


@run_if(min_cuda_gpus=1, rtx=True)
def test_whole_graph_capture_copies_nothing_while_the_addresses_stay():
    """With ``return_predictions=False`` and predictions copied off the GPU, each batch's tensors are
    freed before the next is made: the allocator hands the engine the same addresses, so the package
    copies nothing (what the README promises for that case)."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, device="cuda")
    eager = mlp(64, 4).cuda().eval()
    compiled = compile_trt(eager, x)
    loader = _loader(x, 12)
    writer = _Copied()
    callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False,
                                  upload_ahead=False)  # uploaded batches land at new addresses: held then
    _trainer(callback, writer).predict(Holder(compiled), loader, return_predictions=False)
    with torch.no_grad():
        expected = [eager(batch.cuda()).cpu() for batch in loader]
    assert len(writer.written) == len(expected) == 12
    for written, want in zip(writer.written, expected):
        torch.testing.assert_close(written, want, atol=1e-2, rtol=1e-2)
    capture = callback.figures[0].capture
    assert capture == "stable addresses: 1 call site(s), 1 shape(s), nothing to copy (the addresses did not move)", (
        capture
    )


@run_if(min_cuda_gpus=1, rtx=True)
def test_a_second_predict_holding_from_its_first_batch_reads_only_outputs_the_engine_kept(monkeypatch):
    """``always`` holds at the first batch of each run. The engine's last call (the first run's last
    batch, same shape) kept its outputs, and upstream reuses them unchecked: the package must not have
    emptied them (that read past the end of an empty list)."""
    monkeypatch.setenv("LIGHTNING_TRT_RTX_STABLE_ADDRESSES", "always")
    torch.manual_seed(0)
    x = torch.randn(8, 64, device="cuda")
    eager = mlp(64, 4).cuda().eval()
    compiled = compile_trt(eager, x)
    loader = _loader(x, 6)
    with torch.no_grad():
        expected = [eager(batch.cuda()).cpu() for batch in loader]
    for run in range(2):
        callback = TRTRuntimeSettings(cuda_graph_strategy="whole_graph_capture", runtime_cache=None, print_table=False)
        writer = KeptPredictions()
        _trainer(callback, writer).predict(Holder(compiled), loader, return_predictions=False)
        for written, want in zip(writer.written, expected, strict=True):
            torch.testing.assert_close(written.cpu(), want, atol=1e-2, rtol=1e-2)
        assert "from the first call" in callback.figures[0].capture, (run, callback.figures[0].capture)
