"""LightningModules holding real engine-less TorchTensorRTModules, shared by the CPU Lightning tests.

Engine-less ``TorchTensorRTModule`` objects cannot execute, so ``predict_step`` runs a small
``nn.Linear`` and records what every engine holds at that moment (``seen``). Settings given to an
engine-less module are stashed by upstream for ``setup_engine``: what is recorded is exactly what a
real engine would create its first execution context with.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader


def make_trainer(tmp_path: Any, callbacks: Any = (), plugins: Any = None, **kwargs: Any) -> Trainer:
    """A quiet single-process CPU Trainer writing under ``tmp_path`` (``kwargs`` override the defaults)."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return Trainer(callbacks=list(callbacks), plugins=plugins, **{**options, **kwargs})


def ttm(name: str) -> nn.Module:
    """A real, engine-less ``TorchTensorRTModule`` (importing torch_tensorrt through the backend)."""
    from lightning_trt_rtx import _backend

    _backend.torch_tensorrt()
    from torch_tensorrt.dynamo.runtime._TorchTensorRTModule import TorchTensorRTModule

    return TorchTensorRTModule(name=name)


def compiled_tree() -> nn.Module:
    """Three engines, one of them nested two levels deep, next to plain torch modules."""
    tree = nn.Module()
    tree.e0 = ttm("e0")
    tree.e1 = ttm("e1")
    tree.block = nn.Sequential(nn.Identity(), nn.Sequential(ttm("e2")))
    return tree


def predict_loader(batches: int = 3, batch_size: int = 2, features: int = 4) -> DataLoader:
    torch.manual_seed(0)
    return DataLoader(torch.randn(batches * batch_size, features), batch_size=batch_size)


class EngineModel(LightningModule):
    """Engines in ``self.trt`` (made in ``__init__`` or ``configure_model``), a Linear that really runs.

    Args:
        engines_in: ``"init"``, ``"configure_model"`` or ``"none"`` (no engines at all).
        fail_at: ``predict_step`` raises ``error`` at this batch index.
        error: the exception object to raise (the same object, so callers can check identity).
    """

    def __init__(
        self,
        engines_in: str = "init",
        fail_at: int | None = None,
        error: BaseException | None = None,
        features: int = 4,
    ) -> None:
        super().__init__()
        self.engines_in = engines_in
        self.fail_at = fail_at
        self.error = error
        self.linear = nn.Linear(features, 2)
        if engines_in == "init":
            self.trt = compiled_tree()
        self.seen: list[list[Any]] = []  # per predict_step: every engine's runtime_settings
        self.seen_modes: list[int] = []  # per predict_step: torch_tensorrt's CUDA-graphs mode
        self.seen_children: list[dict[str, nn.Module]] = []  # per predict_step: the module's children then
        # per step: (CPU autocast on, CPU autocast dtype, CUDA autocast on): what the precision plugin ran it under
        self.seen_autocast: list[tuple[bool, torch.dtype, bool]] = []

    def configure_model(self) -> None:
        if self.engines_in == "configure_model" and not hasattr(self, "trt"):
            self.trt = compiled_tree()

    def engines(self) -> list[nn.Module]:
        from lightning_trt_rtx import _backend

        return [m for m in self.modules() if _backend.is_trt_module(m)]

    def _record(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        from lightning_trt_rtx import _backend

        self.seen.append([e.runtime_settings for e in self.engines()])
        self.seen_modes.append(_backend.cudagraphs_mode())
        self.seen_children.append(dict(self.named_children()))
        self.seen_autocast.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cuda"))
        )
        if self.fail_at is not None and batch_idx == self.fail_at:
            assert self.error is not None
            raise self.error
        return self.linear(batch)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self._record(batch, batch_idx)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._record(batch, batch_idx)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._record(batch, batch_idx)

    # enough to fit one step and write a real Lightning checkpoint
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.linear(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.linear.parameters(), lr=0.1)


class SessionSpy(Callback):
    """Records the run's serving session (``serving_session(trainer)``: the callback's, else the plugin's)
    when each loop starts and at every batch, so a test can inspect it after the run dropped it."""

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    def _seen(self, trainer: Trainer) -> None:
        from lightning_trt_rtx.session import trainer_session as serving_session

        self.sessions.append(serving_session(trainer))

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen(trainer)

    def on_predict_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._seen(trainer)

    def on_validation_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._seen(trainer)

    def only(self) -> Any:
        """The one session the run had (every record the same object, not None)."""
        assert self.sessions and self.sessions[0] is not None, self.sessions
        assert all(s is self.sessions[0] for s in self.sessions), self.sessions
        return self.sessions[0]
