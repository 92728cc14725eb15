"""The validated, immutable description of TensorRT-RTX's three runtime knobs.

Plain data: built from keyword arguments, a dict or YAML, compared and printed without importing
``torch_tensorrt``; turned into ``torch_tensorrt.runtime.RuntimeSettings`` only when applied::

    settings = TRTSettings(cuda_graph_strategy="whole_graph_capture")
    settings = TRTSettings.from_yaml("cuda_graph_strategy: whole_graph_capture\\nruntime_cache: null")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from lightning_trt_rtx import cache

# The one place the valid choices are spelled: typed arguments (LightningCLI) and the checks use these.
CudaGraphStrategy = Literal["disabled", "whole_graph_capture", "auto"]
KernelStrategy = Literal["lazy", "eager", "none"]
CUDA_GRAPH_STRATEGIES: tuple[str, ...] = get_args(CudaGraphStrategy)
KERNEL_STRATEGIES: tuple[str, ...] = get_args(KernelStrategy)
DEFAULT_CACHE = "default"  # runtime_cache="default": one file per physical GPU under the default cache directory


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is True or False (``"yes"`` or ``1`` is an error naming both choices)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}.")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    valid = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {valid}; got {type(value).__name__} {value!r}.")
    if value not in choices:
        close = difflib.get_close_matches(value.lower(), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Invalid {name} {value!r}. Valid choices: {valid}.{hint}")


def _check_not_a_keyword(runtime_cache: Any) -> None:
    """``"DEFAULT"``, ``"None"``, ``"null"``: a bare name that spells a choice in another form would be a
    file of that name in the working directory, surely not what was meant."""
    if not isinstance(runtime_cache, (str, os.PathLike)):
        return
    text = os.fspath(runtime_cache)
    if isinstance(text, str) and text != DEFAULT_CACHE and text.strip().lower() in (DEFAULT_CACHE, "none", "null"):
        raise ValueError(
            f"Invalid runtime_cache {text!r}: that would be a file named {text.strip()!r} in the working directory."
            f" Valid choices: {DEFAULT_CACHE!r} (one file per GPU under the default cache directory), None (YAML:"
            " null) for no cache, or a path template (e.g. './kernels/{gpu}.bin')."
        )


@dataclass(frozen=True)
class TRTSettings:
    """TensorRT-RTX runtime settings for every engine of a model.

    Args:
        cuda_graph_strategy: ``"disabled"``, ``"whole_graph_capture"`` (TensorRT-RTX captures and
            replays each engine internally; fastest for launch-bound models) or ``"auto"`` (the serving
            session times both, and whole-graph capture with held addresses, on the run's first
            batches and keeps the fastest: see :mod:`lightning_trt_rtx.auto`; engines start ``"disabled"``).
        dynamic_shapes_kernel_specialization_strategy: ``"lazy"``, ``"eager"`` or ``"none"``: when
            kernels for dynamic shapes are JIT-compiled.
        runtime_cache: a path template for the on-disk kernel cache, or ``None`` for none. The
            placeholders are ``{gpu}`` (the GPU, from its UUID, and its device number), ``{rank}``,
            ``{local_rank}``, ``{node_rank}``, ``{world_size}``, ``{sm}``, ``{trt}``, ``{cuda}`` and ``{host}``;
            the default gives each GPU its own file under a directory keyed by GPU architecture and
            TensorRT-RTX/CUDA versions. An fsspec URL (``s3://...``) works too. ``"default"`` names
            the default template (exactly: ``"DEFAULT"``, ``"None"`` or ``"null"`` are rejected, not
            taken as file names).
    """

    cuda_graph_strategy: CudaGraphStrategy = "disabled"
    dynamic_shapes_kernel_specialization_strategy: KernelStrategy = "lazy"
    runtime_cache: str | None = field(default_factory=cache.default_template)

    def __post_init__(self) -> None:
        _check_choice("cuda_graph_strategy", self.cuda_graph_strategy, CUDA_GRAPH_STRATEGIES)
        _check_choice(
            "dynamic_shapes_kernel_specialization_strategy",
            self.dynamic_shapes_kernel_specialization_strategy,
            KERNEL_STRATEGIES,
        )
        _check_not_a_keyword(self.runtime_cache)
        if isinstance(self.runtime_cache, (str, os.PathLike)) and os.fspath(self.runtime_cache) == DEFAULT_CACHE:
            # resolved at construction, so LIGHTNING_TRT_RTX_CACHE_DIR set after import still counts
            object.__setattr__(self, "runtime_cache", cache.default_template())
        if isinstance(self.runtime_cache, os.PathLike):
            object.__setattr__(self, "runtime_cache", os.fspath(self.runtime_cache))
        if self.runtime_cache is not None:
            if not isinstance(self.runtime_cache, str):
                raise TypeError(
                    "runtime_cache must be a path template (str) or None;"
                    f" got {type(self.runtime_cache).__name__} {self.runtime_cache!r}."
                )
            cache.template_fields(self.runtime_cache)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TRTSettings:
        """Build from a mapping; unknown keys raise TypeError naming the valid keys."""
        if not isinstance(values, Mapping):
            raise TypeError(f"TRTSettings.from_dict takes a mapping, got {type(values).__name__}.")
        unknown = sorted(str(k) for k in values if k not in cls.keys())
        if unknown:
            raise TypeError(f"Unknown TRTSettings key(s) {unknown}. Valid keys: {list(cls.keys())}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, source: str | os.PathLike) -> TRTSettings:
        """Build from YAML text or a YAML file holding a mapping of the three keys."""
        import yaml

        if not isinstance(source, (str, bytes, os.PathLike)):
            raise TypeError(f"TRTSettings.from_yaml takes YAML text or a file path, got {type(source).__name__}.")
        is_file_name = isinstance(source, str) and "\n" not in source and os.path.isfile(source)
        if isinstance(source, os.PathLike) or is_file_name:
            with open(source, encoding="utf-8") as f:
                text: str | bytes = f.read()
        else:
            text = source
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"Invalid TRTSettings YAML ({err}). Valid keys: {list(cls.keys())}.") from None
        if values is None:
            values = {}
        if isinstance(values, str) and "\n" not in values and values.endswith((".yaml", ".yml")):
            raise ValueError(
                f"No YAML file {values!r}: pass YAML text or an existing file. Valid keys: {list(cls.keys())}."
            )
        if not isinstance(values, Mapping):  # e.g. a missing file's name, or "key=value"
            raise TypeError(
                f"TRTSettings YAML must hold a mapping (e.g. 'cuda_graph_strategy: auto') or name an existing file;"
                f" got {source!r}. Valid keys: {list(cls.keys())}."
            )
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_runtime_settings(self, cache_handle: Any = None, **overrides: Any) -> Any:
        """``torch_tensorrt.runtime.RuntimeSettings`` with ``cache_handle`` (a shared ``RuntimeCache``)."""
        from lightning_trt_rtx import _backend

        values = dict(
            cuda_graph_strategy=self.cuda_graph_strategy,
            dynamic_shapes_kernel_specialization_strategy=self.dynamic_shapes_kernel_specialization_strategy,
            runtime_cache=cache_handle,
        )
        values.update(overrides)
        if values["cuda_graph_strategy"] == "auto":  # the session decides; until it has, no graphs
            values["cuda_graph_strategy"] = "disabled"
        return _backend.runtime_settings_class()(**values)
