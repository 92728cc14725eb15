"""Small models, compile helpers and a prediction writer shared by the GPU tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class ConvNet(torch.nn.Module):
    """Several distinct layer shapes: JIT-compiling its kernels dominates the first execute."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 5, padding=2)
        self.c3 = torch.nn.Conv2d(32, 24, 1)
        self.fc = torch.nn.Linear(24 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.sigmoid(self.c3(x))
        return self.fc(x.flatten(1))


class TwoBlocks(torch.nn.Module):
    """Two linear blocks around a sigmoid that is forced to run in PyTorch: a graph break."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
        self.b = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x)))


class _Residual(torch.nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.skip = torch.nn.Identity()
        if stride != 1 or channels_in != channels:
            self.skip = torch.nn.Sequential(
                torch.nn.Conv2d(channels_in, channels, 1, stride=stride, bias=False), torch.nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNetLike(torch.nn.Module):
    """A small ResNet (BatchNorm, residual adds, a strided projection, pooling): a torchvision ResNet-50
    in miniature, for the loaded-program tests."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU()
        )
        self.blocks = torch.nn.Sequential(_Residual(16, 16), _Residual(16, 32, stride=2), _Residual(32, 32))
        self.fc = torch.nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def mlp(width: int = 1024, layers: int = 8) -> torch.nn.Module:
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks)


def compile_trt(model: torch.nn.Module, example: Any, graph_break: bool = False, **kwargs):
    """``model`` compiled for ``example``: a tensor, or a ``torch_tensorrt.Input`` (e.g. a dynamic batch)."""
    import torch_tensorrt

    if graph_break:
        kwargs["torch_executed_ops"] = {"torch.ops.aten.sigmoid.default"}
    return torch_tensorrt.compile(model.cuda().eval(), ir="dynamo", inputs=[example], min_block_size=1, **kwargs)


def saved_resnet_like(path: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A ``ResNetLike`` (BatchNorm statistics that are not the identity) compiled for batches of 8 and saved
    with ``torch_tensorrt.save`` at ``path``: the eager model and the example batch."""
    import torch_tensorrt

    torch.manual_seed(0)
    eager = ResNetLike().cuda().eval()
    with torch.no_grad():
        for bn in (m for m in eager.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    torch_tensorrt.save(compile_trt(eager, x), path, inputs=[x])
    return eager, x


class KeptPredictions(L.pytorch.callbacks.BasePredictionWriter):
    """Keeps every prediction it is handed on the GPU (as a writer batching its writes would): an engine's
    outputs cannot land where the last ones were, the case held addresses are for."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.written: list[torch.Tensor] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.written.append(prediction)
