"""Small models, a synthetic data module and a LightningModule shared by the examples and benchmarks.

* ``conv``: a small conv net with many distinct layer shapes. TensorRT-RTX JIT-compiles a kernel for
  each at the first execute, which makes it the model that shows the kernel cache (warm start).
* ``mlp``: 8 layers of 1024-wide ``Linear`` + ``ReLU``, fp16 on GPU. Launch-bound at small batches,
  which makes it the model that shows whole-graph capture.
* ``mlp-deep``: 32 layers of 256-wide ``Linear`` + ``ReLU``, fp16 on GPU: more launches per call
  and less work in each, the benchmark's model for whole-graph capture inside ``Trainer.predict``.
* ``encoder``: 4 pre-norm transformer blocks, width 256, over 64 tokens, fp16 on GPU, batch 1.
* ``resnet18``: torchvision's ResNet-18 (random weights; needs torchvision), 224x224, fp16, batch 1.

:class:`CompiledPredictor` compiles its model with ``torch_tensorrt`` (dynamo, static shape = the
batch size) where a CUDA device and torch-tensorrt are present, and stays eager elsewhere;
:func:`prepare_model` does the same for loops without a Trainer (Lightning Fabric). The examples keep
their kernel caches one file per physical GPU (:func:`cache_template`: the package's default layout
under the example's own directory) and report each rank's ``RankFigures`` as :func:`figures_dict`.
Nothing is downloaded; every tensor comes from a fixed seed.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_trt_rtx
from lightning_trt_rtx import _backend

# --- models ---------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """A 3x32x32 image classifier with 14 conv layers of distinct shapes.

    Kernel sizes 7, 5, 3, 1 and 1x5/5x1, strides 1 and 2, depthwise, grouped and dilated
    convolutions: TensorRT-RTX JIT-compiles a kernel for each shape at the first execute, so the
    first batch is dominated by JIT when the kernel cache is cold.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []

        def conv(c_in: int, c_out: int, kernel: Any, stride=1, groups=1, dilation=1, norm=False) -> None:
            k = (kernel, kernel) if isinstance(kernel, int) else kernel
            padding = (k[0] // 2 * dilation, k[1] // 2 * dilation)
            layers.append(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups, dilation=dilation))
            layers.extend([nn.BatchNorm2d(c_out), nn.ReLU()] if norm else [nn.ReLU()])

        conv(3, 24, 7, norm=True)
        conv(24, 24, 3, groups=24)  # depthwise
        conv(24, 48, 1)
        conv(48, 48, (1, 5))
        conv(48, 48, (5, 1))
        conv(48, 72, 3, stride=2)  # 16x16
        conv(72, 72, 5, groups=72)  # depthwise 5x5
        conv(72, 96, 3, dilation=2)
        conv(96, 40, 1)
        conv(40, 112, 3, stride=2, norm=True)  # 8x8
        conv(112, 112, 3, groups=4)
        conv(112, 160, 1)
        conv(160, 160, 3, stride=2)  # 4x4
        conv(160, 200, 3, groups=8)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(200, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """``layers`` x (``Linear(width, width)`` + ``ReLU``), the last layer without the ReLU."""

    def __init__(self, width: int = 1024, layers: int = 8) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks.append(nn.Linear(width, width))
            if i < layers - 1:
                blocks.append(nn.ReLU())
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Block(nn.Module):
    """Pre-norm self-attention (written out: every op has a TensorRT converter) and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) * (w // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """``layers`` transformer blocks over ``(batch, tokens, width)`` inputs (already embedded)."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _resnet18() -> nn.Module:
    import torchvision  # only this model needs it

    return torchvision.models.resnet18(weights=None)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int  # the default batch size
    half_on_gpu: bool  # served in fp16 on a GPU


MODELS: dict[str, ModelSpec] = {
    "conv": ModelSpec(ConvNet, (3, 32, 32), 32, False),
    "mlp": ModelSpec(MLP, (1024,), 8, True),
    # 32 narrow layers: each call is dozens of tiny kernel launches, the case whole-graph capture is for
    "mlp-deep": ModelSpec(lambda: MLP(width=256, layers=32), (256,), 8, True),
    "encoder": ModelSpec(Encoder, (64, 256), 1, True),
    "resnet18": ModelSpec(_resnet18, (3, 224, 224), 1, True),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid choices: {sorted(MODELS)}.")
    return MODELS[name]


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The eager model ``name`` with weights from ``seed``, in eval mode, on CPU, fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_spec(name).build()
    return model.eval()


def default_half(name: str) -> bool:
    """Whether ``name`` is served in fp16 here (only on a CUDA device)."""
    return model_spec(name).half_on_gpu and torch.cuda.is_available()


# --- torch_tensorrt -------------------------------------------------------------------------------


def can_compile() -> bool:
    """A CUDA device and an installed torch-tensorrt (checked without importing it)."""
    return torch.cuda.is_available() and _backend.is_available()


def compile_tensorrt(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch_tensorrt.compile`` (dynamo, static shape of ``example``, everything in TensorRT)."""
    trt = _backend.torch_tensorrt()
    with torch.cuda.device(example.device):
        return trt.compile(model, ir="dynamo", inputs=[example], min_block_size=1)


def save_program(compiled: nn.Module, path: str, example: torch.Tensor) -> None:
    """Save a compiled module as an ExportedProgram file (engines serialized inside)."""
    trt = _backend.torch_tensorrt()
    trt.save(compiled, path, inputs=[example])


load_program = lightning_trt_rtx.load_program  # torch_tensorrt.load(path).module(), made servable by Lightning


def prepare_model(
    model_name: str,
    device: Any,
    batch_size: int | None = None,
    half: bool | None = None,
    use_tensorrt: bool | None = None,
    seed: int = 0,
    net: nn.Module | None = None,
) -> tuple[nn.Module, torch.dtype, bool]:
    """``model_name`` ready to serve on ``device``: (module, input dtype, whether compiled with TensorRT).

    On a CUDA device with torch-tensorrt (``use_tensorrt=None``: wherever it is installed) the model
    is compiled for a static input of ``batch_size`` samples; elsewhere it stays eager (fp32 on CPU).
    ``net``: the eager model to serve (default: :func:`build_model` with ``seed``).
    """
    device = torch.device(device)
    net = build_model(model_name, seed) if net is None else net
    if device.type != "cuda":
        return net, torch.float32, False
    half = default_half(model_name) if half is None else half
    dtype = torch.float16 if half else torch.float32
    net = net.to(device=device, dtype=dtype).eval()
    if not (_backend.is_available() if use_tensorrt is None else use_tensorrt):
        return net, dtype, False
    batch_size = batch_size or model_spec(model_name).batch_size
    example = torch.randn((batch_size, *model_spec(model_name).input_shape), device=device, dtype=dtype)
    return compile_tensorrt(net, example), dtype, True


# --- kernel caches and figures --------------------------------------------------------------------

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "lightning-trt-rtx-example")


def cache_template(cache_dir: str) -> str:
    """The package's default layout under ``cache_dir``: one file per physical GPU (``{gpu}``: the first
    8 hex digits of its UUID) under a directory keyed by GPU architecture and TensorRT-RTX/CUDA versions."""
    return os.path.join(cache_dir, "{sm}-trtrtx{trt}-cuda{cuda}", "gpu-{gpu}.bin")


def clear_cache(cache_dir: str) -> list[str]:
    """Remove the examples' cache files under ``cache_dir`` with their records and lock, tmp and quarantine
    siblings (``<key>/gpu-*.bin*``, and ``<key>/rank*.bin*`` the 0.1 examples wrote), nothing else."""
    removed = []
    for pattern in ("gpu-*.bin*", "rank*.bin*"):
        for path in sorted(glob.glob(os.path.join(glob.escape(cache_dir), "*", pattern))):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def figures_dict(figures: Any) -> dict[str, Any]:
    """A rank's ``RankFigures`` as JSON values: its fields (``cache``: the run's ``CacheStats``, or None) and
    the derived ``cache_source``, ``applies``, ``cache_path``, ``cache_bytes`` (loaded), ``saved_bytes``, ``warm``."""
    values = asdict(figures)
    values.update(
        cache_source=figures.cache_source,
        applies=figures.cache.applies if figures.cache is not None else "-",
        cache_path=figures.cache_path,
        cache_bytes=figures.cache_bytes,
        saved_bytes=figures.saved_bytes,
        warm=figures.warm,
    )
    return values


# --- data -----------------------------------------------------------------------------------------


class SyntheticDataset(Dataset):
    """``num_samples`` inputs for model ``model_name``, drawn from a fixed pool of seeded tensors."""

    POOL = 64

    def __init__(self, model_name: str, num_samples: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        shape = model_spec(model_name).input_shape
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn((self.POOL, *shape), generator=generator).to(dtype)  # the same for any size
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return self.pool[index % len(self.pool)]


class SyntheticDataModule(LightningDataModule):
    """``batches`` full batches of synthetic inputs (``drop_last``: every batch has the compiled shape).

    Args:
        model_name: ``"conv"`` or ``"mlp"`` (decides the input shape).
        batch_size: samples per batch (default: the model's).
        batches: number of batches in the whole dataset (split across ranks under DDP).
        half: fp16 inputs; by default, fp16 where the model is served in fp16 (mlp on a GPU).
        seed: the data seed.
    """

    def __init__(
        self,
        model_name: str = "conv",
        batch_size: int | None = None,
        batches: int = 100,
        half: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        model_spec(model_name)
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}.")
        self.model_name = model_name
        self.batch_size = batch_size or model_spec(model_name).batch_size
        self.batches = batches
        self.half = default_half(model_name) if half is None else half
        self.seed = seed

    def predict_dataloader(self) -> DataLoader:
        dtype = torch.float16 if self.half else torch.float32
        dataset = SyntheticDataset(self.model_name, self.batches * self.batch_size, dtype, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)


# --- the LightningModule --------------------------------------------------------------------------


class CompiledPredictor(LightningModule):
    """Serves ``model_name`` through ``predict_step``: compiled with torch_tensorrt on a GPU, eager on CPU.

    The model is built in ``__init__`` (eager, CPU) and compiled in ``setup``, once the Trainer has
    picked this rank's device: ``torch_tensorrt.compile(ir="dynamo")`` with a static input of
    ``batch_size`` samples. ``program`` loads a program saved with :func:`save_program` instead.

    Args:
        model_name: ``"conv"`` or ``"mlp"``.
        batch_size: the compiled (static) batch size (default: the model's).
        use_tensorrt: compile with torch_tensorrt; by default wherever CUDA and torch-tensorrt exist.
        half: serve in fp16 (default: the model's choice on a GPU, fp32 on CPU).
        program: path of a saved compiled program to load instead of compiling.
        seed: the weights' seed.
    """

    def __init__(
        self,
        model_name: str = "conv",
        batch_size: int | None = None,
        use_tensorrt: bool | None = None,
        half: bool | None = None,
        program: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model_name
        self.batch_size = batch_size or model_spec(model_name).batch_size
        self.use_tensorrt = use_tensorrt
        self.half = half
        self.program = program
        self.net = build_model(model_name, seed)
        self.input_dtype = torch.float32
        self.compiled = False
        self.compile_s = 0.0  # seconds spent compiling (or loading the program)

    def setup(self, stage: str) -> None:
        if self.compiled:
            return  # a second predict with the same module reuses its engines
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            return  # CPU: eager
        half = default_half(self.model_name) if self.half is None else self.half
        use_tensorrt = _backend.is_available() if self.use_tensorrt is None else self.use_tensorrt
        if self.program is None and not use_tensorrt:
            rank_zero_warn(f"torch-tensorrt is not installed: serving {self.model_name} eagerly on {device}.")
        start = time.perf_counter()
        if self.program is not None:
            self.net = load_program(self.program).to(device)
            self.input_dtype = torch.float16 if half else torch.float32
            self.compiled = True
        else:
            self.net, self.input_dtype, self.compiled = prepare_model(
                self.model_name, device, self.batch_size, half, use_tensorrt, net=self.net
            )
        self.compile_s = time.perf_counter() - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch.to(self.input_dtype))


# --- timing ---------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class EchoPredictor(LightningModule):
    """No model at all: ``predict_step`` returns its batch. Timing it shows what the data path alone costs."""

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return batch


class KeepOnGPU(Callback):
    """Keeps every prediction on the GPU: each batch's outputs stay alive for the rest of the loop."""

    def __init__(self) -> None:
        self.kept: list = []

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any) -> None:
        self.kept.append(outputs)


class BatchTimer(Callback):
    """Times the predict loop of this rank: first batch, and the mean of the others (steady state).

    The first batch runs from its ``on_predict_batch_start`` to its end (after a CUDA synchronize),
    so it includes execution-context creation and any kernel JIT. The steady per-batch time runs
    from the end of the first batch to the end of the loop (synchronized) over the remaining
    batches. The loop ends at ``on_predict_epoch_end``, which Lightning calls before any
    ``on_predict_end``: what callbacks and modules do after the loop (a kernel-cache save) is not
    loop time, wherever this timer is listed. Wall-clock stamps (``time.time()``) let several
    ranks' windows be combined.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.samples = 0
        self.first_batch_ms = 0.0
        self.per_batch_ms = 0.0
        self.loop_s = 0.0
        self.wall_start = self.wall_first_end = self.wall_end = 0.0
        self._start = self._first_end = 0.0

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.reset()

    def on_predict_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.batches == 0:
            self._start, self.wall_start = time.perf_counter(), time.time()

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.batches += 1
        self.samples += len(batch)
        if self.batches == 1:
            _sync()
            self._first_end, self.wall_first_end = time.perf_counter(), time.time()
            self.first_batch_ms = (self._first_end - self._start) * 1e3

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.batches == 0:
            return
        _sync()
        end, self.wall_end = time.perf_counter(), time.time()
        self.loop_s = end - self._start
        if self.batches > 1:
            self.per_batch_ms = (end - self._first_end) * 1e3 / (self.batches - 1)
        else:
            self.per_batch_ms = self.first_batch_ms

    def result(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "samples": self.samples,
            "first_batch_ms": self.first_batch_ms,
            "per_batch_ms": self.per_batch_ms,
            "loop_s": self.loop_s,
            "wall_start": self.wall_start,
            "wall_first_end": self.wall_first_end,
            "wall_end": self.wall_end,
        }


def device_name() -> str:
    """The GPU model (``torch.cuda.get_device_name``), or ``cpu``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def destroy_process_group() -> None:
    """End the process group before exit: a DDP process exiting with it alive can abort in its threads
    ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --- the examples' entry point and their fresh-process phases -------------------------------------


def example_main(
    args: Any,
    run_phase: Callable[[Any], int],
    run_gpu: Callable[[Any], int],
    run_fallback: Callable[[Any, str], int],
) -> int:
    """What every Trainer example does: a phase (``--_phase``, a child), else the GPU job, else the same
    job eagerly with the reason printed; the process group is ended before exit."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        if args._phase:
            return run_phase(args)
        if not torch.cuda.is_available():
            reason = "TensorRT needs an NVIDIA GPU and none is available here: running the same job eagerly on CPU."
            return run_fallback(args, reason)
        if not _backend.is_available():
            reason = f"torch-tensorrt-rtx is not installed (`{_backend.INSTALL_HINT}`): running the same job eagerly."
            return run_fallback(args, reason)
        return run_gpu(args)
    finally:
        destroy_process_group()


def run_phases(script: str, phases: list[tuple[str, str, list[str]]], tmp: str, verbose: bool) -> list[dict] | int:
    """Run ``script`` once per ``(name, what, arguments)`` phase, each in a fresh process with
    ``--_phase name --_result <json>``; their JSON results in order, or the exit code of the first that failed."""
    env = dict(os.environ)
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.pop("LOCAL_RANK", None)  # each phase is a fresh Lightning job
    results = []
    for name, what, arguments in phases:
        result_path = os.path.join(tmp, f"{name}.json")
        command = [sys.executable, os.path.abspath(script), *arguments, "--_phase", name, "--_result", result_path]
        print(f"  {name:<6} ({what}): serving in a fresh process ...", flush=True)
        proc = subprocess.run(
            command, env=env, stdout=None if verbose else subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        if proc.returncode != 0 or not os.path.isfile(result_path):
            if proc.stdout:
                print("\n".join(proc.stdout.splitlines()[-80:]), file=sys.stderr)
            print(f"error: the {name} run failed (exit code {proc.returncode}).", file=sys.stderr)
            return proc.returncode or 1
        with open(result_path, encoding="utf-8") as f:
            results.append(json.load(f))
    return results
