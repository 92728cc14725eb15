"""TRTRuntimeSettings, TRTCudaGraphs and TRTRuntimePrecision built by LightningCLI from YAML."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_trt_rtx import TRTCudaGraphs, TRTRuntimePrecision, TRTRuntimeSettings
from lightning_trt_rtx.settings import TRTSettings
from tests.procs.lightning_models import EngineModel, predict_loader

DATA = os.path.join(os.path.dirname(__file__), "data")
VALID = os.path.join(DATA, "lightning_cli.yaml")
INVALID = os.path.join(DATA, "lightning_cli_invalid.yaml")
EXPECTED = TRTSettings(
    cuda_graph_strategy="whole_graph_capture",
    dynamic_shapes_kernel_specialization_strategy="eager",
    runtime_cache="kernels/{sm}/rank{rank}-of-{world_size}.bin",
)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when both ``args`` and ``sys.argv`` hold arguments: hide pytest's."""
    monkeypatch.setattr(sys, "argv", ["trainer.py"])


def build(config: str, *extra: str) -> LightningCLI:
    return LightningCLI(EngineModel, run=False, args=["--config", config, *extra], save_config_callback=None)


def test_yaml_builds_callbacks_and_plugin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML's cache template is relative
    cli = build(VALID, f"--trainer.default_root_dir={tmp_path}")
    settings_cb, graphs_cb = cli.trainer.callbacks[:2]
    assert isinstance(settings_cb, TRTRuntimeSettings)
    assert settings_cb.settings == EXPECTED
    assert settings_cb.loops == ("predict", "test")
    assert settings_cb.print_table is False
    assert isinstance(graphs_cb, TRTCudaGraphs)
    assert graphs_cb.targets == ["trt"] and graphs_cb.loops == ("predict",)

    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, TRTRuntimePrecision)
    assert plugin.settings == EXPECTED
    assert plugin.precision == "bf16-mixed" and cli.trainer.precision == "bf16-mixed"

    # the objects it built serve a run: plugin and callback agree, graphs open, bf16 autocast runs
    model = cli.model
    out = cli.trainer.predict(model, predict_loader(batches=2))
    assert out[0].dtype == torch.bfloat16
    seen = model.seen[0]
    assert len(seen) == 3
    assert all(rs.cuda_graph_strategy == "whole_graph_capture" for rs in seen)
    assert all(rs.dynamic_shapes_kernel_specialization_strategy == "eager" for rs in seen)
    assert len({id(rs.runtime_cache) for rs in seen}) == 1
    assert model.seen_modes == [1, 1]
    (figures,) = settings_cb.figures
    assert figures.cache_path == os.path.join("kernels", "cpu", "rank0-of-1.bin")


def test_invalid_choice_fails_parsing(capsys):
    with pytest.raises(SystemExit) as excinfo:
        build(INVALID)
    assert excinfo.value.code != 0
    err = capsys.readouterr().err
    assert "cuda_graph_strategy" in err
    assert "'disabled', 'whole_graph_capture'" in err and "whole_graph" in err


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("loops: [predict, test]", "loops: [predict, fit]", ["loops", "'validate'"]),
        ("precision: bf16-mixed", "precision: 64-true", ["precision", "'bf16-mixed'"]),
        (
            "dynamic_shapes_kernel_specialization_strategy: eager\n        runtime_cache",
            "dynamic_shapes_kernel_specialization_strategy: eagerly\n        runtime_cache",
            ["dynamic_shapes_kernel_specialization_strategy", "'lazy', 'eager', 'none'"],
        ),
    ],
)
def test_invalid_values_fail_parsing(tmp_path, capsys, old, new, names):
    with open(VALID) as f:
        text = f.read()
    assert old in text
    config = tmp_path / "config.yaml"
    config.write_text(text.replace(old, new, 1))
    with pytest.raises(SystemExit) as excinfo:
        build(str(config))
    assert excinfo.value.code != 0
    err = capsys.readouterr().err
    for name in names:
        assert name in err


def test_invalid_template_fails_when_instantiated(tmp_path):
    with open(VALID) as f:
        text = f.read()
    config = tmp_path / "config.yaml"
    config.write_text(text.replace("kernels/{sm}/rank{rank}", "kernels/{device}/rank{rank}", 1))
    # types pass parsing; the constructor's ValueError comes back from jsonargparse's instantiation
    with pytest.raises(ValueError) as excinfo:
        build(str(config))
    assert "Unknown placeholder {device}" in str(excinfo.value)
    assert "Valid placeholders: {gpu}, {rank}" in str(excinfo.value)
