"""The one place that imports ``torch_tensorrt`` and knows its private paths.

Everything else in the package asks this module. Importing ``lightning_trt_rtx`` never imports
``torch_tensorrt`` (slow, and it raises on a host without an NVIDIA driver); :func:`torch_tensorrt`
imports it on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning_utilities.core.imports import RequirementCache
from packaging.version import Version

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lightning-trt-rtx[rtx]'"
MIN_VERSION = Version("2.13")
_RTX_DISTRIBUTION = "torch-tensorrt-rtx"
_TRT_DISTRIBUTION = "torch-tensorrt"
_ENGINE_TYPE = "__torch__.torch.classes.tensorrt.Engine"

# Integer codes the C++ engine's ``update_runtime_settings`` takes (mirrors upstream's private maps).
KERNEL_STRATEGY_CODES = {"lazy": 0, "eager": 1, "none": 2}
CUDA_GRAPH_STRATEGY_CODES = {"disabled": 0, "whole_graph_capture": 1}
# Indices into an engine's serialized info (torch_tensorrt.dynamo.runtime._serialized_engine_layout, ABI 10).
_DEVICE_IDX, _HW_COMPATIBLE_IDX, _ALIASED_IO_IDX = 2, 6, 12
_REQUIRES_OUTPUT_ALLOCATOR_IDX, _REQUIRES_NATIVE_MULTIDEVICE_IDX = 9, 11


def installed_distribution() -> str | None:
    """Name of the installed torch-tensorrt distribution, without importing it (None if absent).

    Lightning's ``RequirementCache`` on the distribution name reads package metadata only; given a
    module name it would import ``torch_tensorrt``, which raises on a host without a driver.
    """
    for name in (_RTX_DISTRIBUTION, _TRT_DISTRIBUTION):
        if RequirementCache(name):
            return name
    return None


def installed_version() -> Version | None:
    dist = installed_distribution()
    return Version(importlib.metadata.version(dist)) if dist else None


def is_available() -> bool:
    """True when a torch-tensorrt distribution is installed (checked without importing it)."""
    return installed_distribution() is not None


def is_imported() -> bool:
    return "torch_tensorrt" in sys.modules


def is_rtx_build() -> bool:
    """Whether the installed build is TensorRT-RTX, the only one that honours the runtime settings."""
    if is_imported():
        return bool(sys.modules["torch_tensorrt"].ENABLED_FEATURES.tensorrt_rtx)
    return installed_distribution() == _RTX_DISTRIBUTION


@contextmanager
def _answer_cuda_queries_without_cuda() -> Iterator[None]:
    # torch_tensorrt 2.14 asks CUDA for the device capability (``_utils.is_tegra_platform``) and the
    # current device (``dynamo/_defaults.default_device``) while it is being imported, which raises on
    # a host without an NVIDIA driver. Upstream PR #4504 (open) fixes this. Until it lands we answer
    # those two queries, only while importing and only when no CUDA device exists, so the pure-Python
    # objects (RuntimeSettings, RuntimeCache, engine-less TorchTensorRTModule) work on CPU hosts.
    if torch.cuda.is_available():
        yield
        return
    capability, current = torch.cuda.get_device_capability, torch.cuda.current_device
    torch.cuda.get_device_capability = lambda *args, **kwargs: (0, 0)
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.get_device_capability, torch.cuda.current_device = capability, current


@functools.cache
def torch_tensorrt() -> Any:
    """Import and return ``torch_tensorrt``, with errors that say what to do."""
    dist = installed_distribution()
    if dist is None:
        raise ModuleNotFoundError(
            f"torch-tensorrt is not installed. TensorRT-RTX runtime settings need it: `{INSTALL_HINT}`."
        )
    version = installed_version()
    if version is not None and version.release < MIN_VERSION.release:
        raise ImportError(
            f"{dist} {version} is installed, but the runtime-settings API needs torch-tensorrt >= {MIN_VERSION}"
            f" (RuntimeSettings, runtime_cache, enable_cudagraphs(cuda_graph_strategy=)). Upgrade: `{INSTALL_HINT}`."
        )
    with _answer_cuda_queries_without_cuda():
        module = importlib.import_module("torch_tensorrt")
    if not hasattr(module, "runtime") or not hasattr(module.runtime, "RuntimeSettings"):
        raise ImportError(
            f"torch_tensorrt {getattr(module, '__version__', '?')} has no runtime-settings API;"
            f" torch-tensorrt >= {MIN_VERSION} is required: `{INSTALL_HINT}`."
        )
    return module


# ``GraphModule.meta`` key: the user inputs the ExportedProgram's signature says its graph writes into
PROGRAM_INPUTS_MUTATED = "lightning_trt_rtx.user_inputs_to_mutate"


def load_program(path: str) -> torch.nn.Module:
    """``torch_tensorrt.load(path).module()``, made servable by Lightning.

    ``ExportedProgram.module()`` replaces ``train``/``eval`` with methods that raise, and Lightning
    calls ``eval()`` on the whole LightningModule before predicting. A compiled program has no
    train/eval behaviour to switch, so the plain ``nn.Module`` methods are put back. The inputs its
    signature records as written (``user_inputs_to_mutate``) are kept in the module's ``meta``
    (:data:`PROGRAM_INPUTS_MUTATED`): the graph of ``.module()`` no longer carries the signature.
    """
    exported = torch_tensorrt().load(path)
    program = exported.module()
    signature = getattr(exported, "graph_signature", None)
    if isinstance(getattr(program, "meta", None), dict) and signature is not None:
        program.meta[PROGRAM_INPUTS_MUTATED] = tuple(sorted(set(signature.user_inputs_to_mutate.values())))
    for name in ("train", "eval"):
        program.__dict__.pop(name, None)
    return program


def runtime_settings_class() -> Any:
    return torch_tensorrt().runtime.RuntimeSettings


def new_cache_handle() -> Any:
    """A fresh ``RuntimeCache`` with no path: this package does all file I/O itself."""
    return torch_tensorrt().runtime.RuntimeCache(path="", autosave_on_del=False)


def enable_cudagraphs(module: torch.nn.Module, cuda_graph_strategy: str | None) -> Any:
    return torch_tensorrt().runtime.enable_cudagraphs(module, cuda_graph_strategy=cuda_graph_strategy)


def has_graph_breaks(module: Any) -> bool:
    """Whether ``enable_cudagraphs`` will wrap ``module`` in a whole-module graph (upstream's own test:
    a child named ``_run_on_gpu*``, i.e. PyTorch ops between TensorRT engines)."""
    if is_mutable_module(module):
        module = module.gm
    if not isinstance(module, torch.nn.Module):
        return False
    return any("_run_on_gpu" in name for name, _ in module.named_children())


# torch_tensorrt.runtime._cudagraphs.CudaGraphsMode: no graphs; each engine captures its own (read by
# the engines at every call); the whole-module wrapper captures (read by its forward at every call)
STANDARD, SUBGRAPH, WHOLE_GRAPH = 0, 1, 2
CUDAGRAPHS_MODE_NAMES = {STANDARD: "standard", SUBGRAPH: "subgraph", WHOLE_GRAPH: "whole-graph"}


def cudagraphs_mode() -> int:
    """torch_tensorrt's process-global CUDA-graphs mode as its Python side holds it (what
    ``get_cudagraphs_mode()``, ``get_whole_cudagraphs_mode()`` and the whole-module wrapper read)."""
    if not is_imported():
        return 0
    return int(sys.modules["torch_tensorrt.runtime._cudagraphs"]._PY_RT_CUDAGRAPHS)


def engine_cudagraphs_mode() -> int:
    """The mode the engines read when they run: the C++ runtime's own copy (the Python runtime's
    engines read the Python side)."""
    if is_imported() and sys.modules["torch_tensorrt"].ENABLED_FEATURES.torch_tensorrt_runtime:
        return int(torch.ops.tensorrt.get_cudagraphs_mode())
    return cudagraphs_mode()


def restore_cudagraphs_mode(mode: int) -> None:
    """Set torch_tensorrt's process-global CUDA-graphs mode to ``mode`` (Python and C++ sides).

    ``enable_cudagraphs``'s ``__enter__`` changes the mode before it builds its wrapper; if building
    fails, its ``__exit__`` never runs and the mode would stay changed for the rest of the process.
    Upstream's own ``set_cudagraphs_mode`` takes a bool and cannot set the whole-graph mode.
    """
    if not is_imported():
        return
    vars(sys.modules["torch_tensorrt.runtime._cudagraphs"])["_PY_RT_CUDAGRAPHS"] = mode
    if sys.modules["torch_tensorrt"].ENABLED_FEATURES.torch_tensorrt_runtime:
        torch.ops.tensorrt.set_cudagraphs_mode(mode)


def is_whole_module_graph(obj: Any) -> bool:
    """A ``CudaGraphsTorchTensorRTModule``: ``enable_cudagraphs``' wrapper for a module with graph breaks."""
    if not is_imported():
        return False
    from torch_tensorrt.dynamo.runtime._CudaGraphsTorchTensorRTModule import CudaGraphsTorchTensorRTModule

    return isinstance(obj, CudaGraphsTorchTensorRTModule)


def trt_version() -> str | None:
    """The TensorRT(-RTX) library version, read from package metadata (no import)."""
    for name in ("tensorrt-rtx", "tensorrt_rtx", "tensorrt"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


# --- recognising engines, without importing torch_tensorrt --------------------------------------


def is_trt_module(obj: Any) -> bool:
    """A ``TorchTensorRTModule`` (only possible once torch_tensorrt has been imported)."""
    if not is_imported():
        return False
    from torch_tensorrt.dynamo.runtime._TorchTensorRTModule import TorchTensorRTModule

    return isinstance(obj, TorchTensorRTModule)


def is_bare_engine(obj: Any) -> bool:
    """A torchbind ``tensorrt.Engine`` held as a plain attribute (programs from ``torch_tensorrt.load``)."""
    return isinstance(obj, torch.ScriptObject) and obj._type().qualified_name() == _ENGINE_TYPE


def is_mutable_module(obj: Any) -> bool:
    """A ``MutableTorchTensorRTModule``: its engines live in ``.gm``, outside ``named_modules()``."""
    if not is_imported():
        return False
    return isinstance(obj, sys.modules["torch_tensorrt"].MutableTorchTensorRTModule)


def set_trt_module_settings(module: Any, settings: Any) -> None:
    """Give a TorchTensorRTModule settings; one without an engine yet keeps them exactly as given.

    The public setter would turn a path string into a fresh implicit cache handle and read the
    per-user default file; for an engine that does not exist yet, the stash is what upstream's
    ``setup_engine`` applies at the first context creation, so restoring it is exact.
    """
    if module.engine is None:
        module._runtime_settings = settings
    else:
        module.runtime_settings = settings


@contextmanager
def settings_at_engine_setup(settings: Any) -> Iterator[None]:
    """Every TorchTensorRTModule set up inside the block starts with ``settings``.

    ``torch_tensorrt.compile`` sets each engine up before it returns; engines with native NCCL
    collectives may create their execution context there, collectively, and any later settings
    change costs every rank a second one. Stashing the settings just before upstream's
    ``setup_engine`` applies its stash makes that first context the right one.
    """
    from torch_tensorrt.dynamo.runtime._TorchTensorRTModule import TorchTensorRTModule

    original = TorchTensorRTModule.setup_engine

    def setup_engine(module: Any) -> None:
        if module.engine is None:
            module._runtime_settings = settings
        original(module)

    TorchTensorRTModule.setup_engine = setup_engine
    try:
        yield
    finally:
        TorchTensorRTModule.setup_engine = original


# Bare engines have no settings getter: remember what was last given to each (settings are never
# serialized, so an engine we have not touched holds upstream's post-load default). An entry lives
# exactly as long as its engine: the weak reference's callback removes it, with the cache handle it holds.
_bare_engine_settings: dict[int, tuple[weakref.ref[Any], Any]] = {}


def bare_engine_settings(engine: Any) -> Any:
    entry = _bare_engine_settings.get(id(engine))
    if entry is not None and entry[0]() is engine:
        return entry[1]
    return runtime_settings_class()(runtime_cache=None)


def set_bare_engine_settings(engine: Any, settings: Any) -> None:
    from torch_tensorrt.runtime._runtime_cache import _to_torchbind_handle

    engine.update_runtime_settings(
        KERNEL_STRATEGY_CODES[settings.dynamic_shapes_kernel_specialization_strategy],
        CUDA_GRAPH_STRATEGY_CODES[settings.cuda_graph_strategy],
        _to_torchbind_handle(settings.runtime_cache),
    )
    key = id(engine)

    def forget(_: weakref.ref[Any]) -> None:  # runs while the engine is freed, before its id is reused
        _bare_engine_settings.pop(key, None)

    _bare_engine_settings[key] = (weakref.ref(engine, forget), settings)


def _engine_object(obj: Any) -> Any:
    """The torchbind engine: a TorchTensorRTModule's (None before setup), or a bare engine itself."""
    return obj.engine if is_trt_module(obj) else obj


def output_holding(obj: Any) -> tuple[bool, bool]:
    """``(use_pre_allocated_outputs, output tensors unowned)`` of an engine; ``(False, False)`` before setup."""
    engine = _engine_object(obj)
    if engine is None:
        return False, False
    return bool(getattr(engine, "use_pre_allocated_outputs", False)), bool(engine.are_output_tensors_unowned())


def set_output_holding(obj: Any, state: tuple[bool, bool]) -> None:
    """Set what :func:`output_holding` reads. ``(True, False)`` makes the engine write every call at the
    same input shapes into the same output tensors, which it returns to the caller.

    ``use_pre_allocated_outputs`` alone is not enough: ``torch_tensorrt.compile`` marks the engines
    that produce the model's outputs "unowned", and those allocate new outputs after every call (so
    a caller keeping an output is safe), which moves the output address every call.
    """
    engine = _engine_object(obj)
    if engine is None:
        raise RuntimeError("the engine is not set up yet")
    engine.use_pre_allocated_outputs = state[0]
    engine.set_output_tensors_as_unowned(state[1])


def kept_output_addresses(obj: Any) -> tuple[int, ...]:
    """The addresses of the outputs an engine keeps (``pre_allocated_outputs``); ``()`` for none."""
    engine = _engine_object(obj)
    if engine is None:
        return ()
    return tuple(t.data_ptr() for t in getattr(engine, "pre_allocated_outputs", None) or [])


def graph_capture_blocker(obj: Any, stream: Any) -> str:
    """Why an engine cannot run inside a CUDA graph that torch captures on ``stream`` (``""``: it can):
    not set up, output shapes that depend on the input data (the output allocator allocates at run time),
    collectives, or TensorRT-RTX's own check of its context (lazy kernel specialization of a dynamic
    input shape swaps kernels at run time; only torch-tensorrt's Python runtime asks it). Read from the
    compiled module's flags, the Python runtime's engine, or a torchbind engine's serialized info."""
    engine = _engine_object(obj)
    if engine is None:
        return "the engine is not set up yet"
    allocator = _flag(obj, "requires_output_allocator") or _flag(engine, "requires_output_allocator")
    collectives = any(
        _flag(holder, name) for holder in (obj, engine) for name in ("requires_native_multidevice", "_has_nccl_ops")
    )
    if is_bare_engine(engine) and not is_trt_module(obj):  # a loaded program's: the flags are in what it serializes
        info = _serialized_info(engine)
        if info is None:
            return "its serialized info could not be read (output allocator, collectives)"
        allocator = allocator or _info_flag(info, _REQUIRES_OUTPUT_ALLOCATOR_IDX)
        collectives = collectives or _info_flag(info, _REQUIRES_NATIVE_MULTIDEVICE_IDX)
    if allocator:
        return "its output shapes depend on its input data (the output allocator allocates at run time)"
    if collectives:
        return "it runs collectives (NCCL)"
    check = getattr(engine, "_is_monolithic_capturable", None)
    if check is not None and not check(stream):
        return (
            "TensorRT-RTX says its context cannot be captured (lazy kernel specialization of a dynamic input"
            " shape: use dynamic_shapes_kernel_specialization_strategy='eager' or 'none')"
        )
    return ""


def _flag(holder: Any, name: str) -> bool:
    try:
        return getattr(holder, name, False) is True
    except Exception:  # a torchbind object may raise its own error for an attribute it lacks
        return False


def _info_flag(info: list[Any], index: int) -> bool:
    return len(info) > index and str(info[index]).strip() == "1"


def _serialized_info(engine: Any) -> list[Any] | None:
    """A torchbind engine's serialized info: ``__getstate__()[0]``, what ``torch_tensorrt.save`` writes,
    with fields at the ``_*_IDX`` indices (the whole engine is serialized to read it); None if unreadable."""
    try:
        return list(engine.__getstate__()[0])
    except Exception as err:
        log.debug("Could not read the serialized info of engine %r: %s", engine, err)
        return None


def bare_engine_aliases_io(engine: Any) -> bool | None:
    """Whether a bare engine writes an output through an input's storage (e.g. a KV-cache update);
    None when that cannot be read. Only its serialized info says (the field is empty when nothing is
    aliased). A TorchTensorRTModule has ``aliased_io``.
    """
    info = _serialized_info(engine)
    if info is None or len(info) <= _ALIASED_IO_IDX:
        return None
    return bool(str(info[_ALIASED_IO_IDX]).strip())


def contexts_created(engine: Any) -> int:
    """How many execution contexts a torchbind engine has created (for tests and figures)."""
    return int(engine.num_execution_contexts_created())


# --- the GPU a program was built for, the device a command runs on (prewarm) --------------------


@dataclass(frozen=True)
class EngineTarget:
    """The GPU an engine was built on, as its serialized device info records it."""

    sm: str  # e.g. "sm90"
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    hardware_compatible: bool  # built to run on any Ampere or newer GPU


def engine_target(obj: Any) -> EngineTarget | None:
    """What a TorchTensorRTModule's or bare engine's serialized info says it was built for (None: unknown).

    The info is ``ScriptObject.__getstate__()[0]`` (what ``torch_tensorrt.save`` writes); its device
    field is ``gpu_id%major%minor%device_type%name`` on the C++ and the Python runtime alike.
    """
    engine = _engine_object(obj)
    info = _serialized_info(engine) if engine is not None else None
    if info is None:
        return None
    try:
        device = str(info[_DEVICE_IDX]).split("%")
        major, minor, name = int(device[1]), int(device[2]), device[4]
        hardware_compatible = str(info[_HW_COMPATIBLE_IDX]).strip() == "1"
    except (TypeError, ValueError, IndexError, RuntimeError) as err:
        log.debug("Could not read the target device of engine %r: %s", engine, err)
        return None
    return EngineTarget(sm=f"sm{major}{minor}", name=name, hardware_compatible=hardware_compatible)


def engine_device(obj: Any) -> int | None:
    """The CUDA device number a TorchTensorRTModule's or bare engine's execution context runs on; None
    when unknown (a module with no engine to run, an unreadable engine).

    A set-up engine says it in its serialized device info (``gpu_id%...``), read with
    ``serialize_metadata_only`` (members only, not the engine's bytes) where the runtime has it; a
    Python-runtime engine has ``target_device_id``. A module not set up yet (lazy init) runs where its
    compilation settings put it (``target_device``).
    """
    engine = _engine_object(obj)
    try:
        if engine is None:
            if is_trt_module(obj) and obj.serialized_engine:
                return int(obj.target_device.index or 0)
            return None
        if getattr(engine, "target_device_id", None) is not None:  # the Python runtime's TRTEngine
            return int(engine.target_device_id)
        reader = getattr(engine, "serialize_metadata_only", None)
        info = list(reader()) if reader is not None else _serialized_info(engine)
        return int(str(info[_DEVICE_IDX]).split("%")[0]) if info else None
    except Exception as err:  # an engine we cannot read leaves the current device in charge
        log.debug("Could not read the device of engine %r: %s", obj, err)
        return None


def cuda_device(ordinal: int) -> torch.device | None:
    """``cuda:ordinal``, made this process's current device; None on a host without CUDA.

    IndexError naming the valid device numbers when ``ordinal`` is not one of them.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return None
    if not 0 <= ordinal < count:
        raise IndexError(f"device {ordinal} does not exist: this process sees {count} CUDA device(s), 0..{count - 1}.")
    torch.cuda.set_device(ordinal)
    return torch.device("cuda", ordinal)
