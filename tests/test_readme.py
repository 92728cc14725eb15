"""The README's Python snippets on a CPU host: the Quickstart says it needs a GPU (run as written by
``tests/gpu/test_readme_gpu.py``); every other snippet runs here as written, with the README's import
line and, where a snippet serves ``model`` and ``loader``, an fp32 CPU model without engines."""

from __future__ import annotations

import ast
import os
import re
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule

from tests.procs.lightning_models import make_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def snippets() -> list[tuple[str, str]]:
    """(the section heading above it, the code) for every ```python block."""
    found, heading = [], ""
    for part in re.split(r"(^#+ .*$)", readme(), flags=re.M):
        if part.startswith("#"):
            heading = part.lstrip("#").strip()
            continue
        found += [(heading, code) for code in re.findall(r"```python\n(.*?)```", part, re.S)]
    return found


def the_import_line() -> str:
    """The API section's ``from lightning_trt_rtx import ...`` line, which the snippets below it assume."""
    return " ".join(re.search(r"`(from lightning_trt_rtx import [^`]+)`", readme()).group(1).split())


def run(code: str, namespace: dict[str, Any]) -> Any:
    """Run ``code`` as a script; the value of a final expression is returned (as a REPL shows it)."""
    tree = ast.parse(code)
    last = tree.body[-1] if isinstance(tree.body[-1], ast.Expr) else None
    if last is not None:
        tree.body[-1] = ast.Assign(targets=[ast.Name("_result", ast.Store())], value=last.value)
        ast.fix_missing_locations(tree)
    exec(compile(tree, "README.md", "exec"), namespace)
    return namespace.get("_result")


class FloatModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch)


def test_the_quickstart_says_it_needs_a_gpu():
    section = readme().split("## Quickstart", 1)[1].split("```python", 1)[0]
    assert "needs an NVIDIA GPU" in section and "on a CPU host it stops" in section
    assert [heading for heading, _ in snippets()][0] == "Quickstart"


@pytest.mark.parametrize("index", range(1, len(snippets())))
def test_the_other_snippets_run_on_a_cpu_host_as_written(index, tmp_path, monkeypatch, messages):
    monkeypatch.chdir(tmp_path)
    heading, code = snippets()[index]
    model = FloatModel()
    loader = torch.utils.data.DataLoader(torch.randn(12, 128), batch_size=4)
    namespace: dict[str, Any] = {"model": model, "loader": loader}
    exec(the_import_line(), namespace)
    result = run(code, namespace)
    from lightning_trt_rtx import TRTRuntimeSettings

    if isinstance(result, TRTRuntimeSettings):  # a callback as the README builds it serves a CPU predict
        out = make_trainer(tmp_path, [result]).predict(model, loader)
        assert [o.shape for o in out] == [(4, 2)] * 3, heading
    if "ServingSession" in code:
        assert namespace["session"].figures.engines == 0 and namespace["session"].closed
    assert messages.matching("No TensorRT engines found under"), heading  # said, not silently nothing
