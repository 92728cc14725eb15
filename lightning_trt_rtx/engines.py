"""Find every TensorRT engine under a module tree, apply settings to all of them, restore them.

Three places hold engines, and upstream's context managers reach only the first:

* ``TorchTensorRTModule`` submodules, including ones whose engine is not set up yet (the setter
  stashes settings for the first context creation; ``runtime_config`` skips those);
* bare torchbind ``Engine`` attributes of programs loaded with ``torch_tensorrt.load(...).module()``;
* ``MutableTorchTensorRTModule`` objects, whose engines live in ``.gm`` (outside ``named_modules()``),
  which appears at the first forward and is replaced by a recompile. Unverified on GPU: TensorRT-RTX
  1.6.1 cannot build their (refittable) engines on H200, and their GPU test is a strict xfail. The
  tracking is fenced to models that hold one: without, :meth:`EngineBinding.refresh` (called before
  every batch) tests one empty dict.

Usage::

    bound = EngineBinding(model)
    bound.apply(runtime_settings)   # snapshot what was there, then set; equal settings are skipped
    ...
    bound.refresh()                 # picks up a replaced/new ``.gm`` of mutable modules (none: a no-op)
    bound.restore()                 # exactly what was there before
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_trt_rtx import _backend
from lightning_trt_rtx._messages import warn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    """One engine found under a module: ``kind`` is ``"module"`` (a TorchTensorRTModule) or ``"bare"``;
    ``owner`` is the module whose attribute holds a bare engine; ``runner`` the program graph (an
    ``fx.GraphModule`` under the root) whose graph reads it with ``get_attr``, i.e. whose forward runs
    it: the owner itself for programs from the legacy exporter, the graph above it for programs
    re-traced by ``torch_tensorrt.save`` (``.module()`` puts ``_run_on_acc_0.engine`` on an empty
    ``_run_on_acc_0`` container); None when no graph under the root reads it (a module of your own)."""

    name: str
    kind: str
    obj: Any
    owner: Any = field(default=None, compare=False, repr=False)
    runner: Any = field(default=None, compare=False, repr=False)

    def get(self) -> Any:
        if self.kind == "module":
            return self.obj.runtime_settings
        return _backend.bare_engine_settings(self.obj)

    def set(self, settings: Any) -> None:
        if self.kind == "module":
            _backend.set_trt_module_settings(self.obj, settings)
        else:
            _backend.set_bare_engine_settings(self.obj, settings)


def _children(root: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if _backend.is_mutable_module(root):
        yield from _children(root.gm, f"{prefix}.gm" if prefix else "gm") if root.gm is not None else ()
        return
    if not isinstance(root, torch.nn.Module):
        return
    for name, module in root.named_modules(prefix=prefix):
        if _backend.is_trt_module(module):
            yield name, Engine(name, "module", module)
            continue
        if _backend.is_mutable_module(module):
            # it subclasses the wrapped model's class, so ``self.model = Mutable...(...)`` registers it
            # as a submodule: its engines live in ``.gm``, not in ``named_modules()``
            yield name, module
            continue
        for attr, value in vars(module).items():
            full = f"{name}.{attr}" if name else attr
            if _backend.is_bare_engine(value):
                yield full, Engine(full, "bare", value, owner=module)
            elif _backend.is_mutable_module(value):
                yield full, value


def find_engines(root: Any) -> list[Engine]:
    """Every engine under ``root`` (an ``nn.Module`` or a ``MutableTorchTensorRTModule``), each once."""
    engines, seen = [], set()
    stack = [("", root)]
    while stack:
        prefix, node = stack.pop()
        for name, found in _children(node, prefix):
            if isinstance(found, Engine):
                if id(found.obj) not in seen:
                    seen.add(id(found.obj))
                    engines.append(found)
            else:
                stack.append((name, found))
    if any(e.kind == "bare" for e in engines):
        runners = _program_graphs(root)
        engines = [replace(e, runner=runners.get(id(e.obj))) if e.kind == "bare" else e for e in engines]
    return engines


def _program_graphs(root: Any) -> dict[int, torch.fx.GraphModule]:
    """``id(engine)`` -> the ``fx.GraphModule`` under ``root`` whose graph reads that bare engine."""
    runners: dict[int, torch.fx.GraphModule] = {}
    if not isinstance(root, torch.nn.Module):
        return runners
    for module in root.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.find_nodes(op="get_attr"):
            value: Any = module
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if _backend.is_bare_engine(value):
                runners.setdefault(id(value), module)
    return runners


def created_with(settings: Any) -> Any:
    """Context manager: engines compiled (set up) inside it start with ``settings``.

    For engines whose first execution context is created while compiling (native NCCL
    collectives), so applying settings afterwards would cost every rank a second one::

        with created_with(TRTSettings().to_runtime_settings(shared.handle)):
            compiled = torch_tensorrt.dynamo.compile(exported, inputs=[x], use_distributed_mode_trace=True)
    """
    return _backend.settings_at_engine_setup(settings)


def find_mutable_modules(root: Any) -> list[Any]:
    """The ``MutableTorchTensorRTModule`` objects under ``root`` (they change engines on recompile)."""
    found = [root] if _backend.is_mutable_module(root) else []
    if isinstance(root, torch.nn.Module):
        for module in root.modules():
            if module is not root and _backend.is_mutable_module(module):
                found.append(module)  # registered as a submodule
            found.extend(v for v in vars(module).values() if _backend.is_mutable_module(v))
    return found


class EngineBinding:
    """Settings applied to every engine under one root, with a snapshot to restore."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.engines: list[Engine] = []
        self._prior: dict[int, tuple[Engine, Any]] = {}
        self._settings: Any | None = None
        self._mutable_gms: dict[int, Any] = {}

    def apply(self, settings: Any) -> int:
        """Give ``settings`` to every engine, remembering each one's prior settings on first touch.

        Engines that already hold equal settings are left alone (no new execution context).
        Returns how many engines were changed.
        """
        self._settings = settings
        self.engines = find_engines(self.root)
        self._mutable_gms = {id(m): m.gm for m in find_mutable_modules(self.root)}
        # engines a recompile replaced are gone from the model: forget them and the memory they hold
        present = {id(engine.obj) for engine in self.engines}
        self._prior = {key: entry for key, entry in self._prior.items() if key in present}
        changed = 0
        for engine in self.engines:
            current = engine.get()
            self._prior.setdefault(id(engine.obj), (engine, current))
            if current != settings:
                engine.set(settings)
                changed += 1
        log.debug("Applied %s to %d of %d engines", settings, changed, len(self.engines))
        return changed

    def refresh(self) -> int:
        """Re-apply if a mutable module's ``.gm`` appeared or was replaced (unverified on GPU: see the
        module docs).

        Without mutable modules (found at :meth:`apply`) this returns at once; with them it walks the
        module tree once.
        """
        if self._settings is None or not self._mutable_gms:
            return 0
        mutables = find_mutable_modules(self.root)
        if all(self._mutable_gms.get(id(m)) is m.gm for m in mutables):
            return 0
        return self.apply(self._settings)

    def restore(self) -> None:
        """Put back exactly the settings each engine had before the first :meth:`apply`."""
        for engine, prior in self._prior.values():
            try:
                if engine.get() != prior:
                    engine.set(prior)
            except Exception as err:  # one engine's failure must not stop the others' restore
                warn(f"Could not restore the runtime settings of engine {engine.name}: {err}", logger=log.name)
        self._prior.clear()
        self._settings = None
