"""Integration overhead [goal <= 2%]: the ``TRTRuntimeSettings`` callback vs the same settings applied by hand.

One compiled 8x1024 MLP (batch 8) serves three variants in one process, in rotating order (every
variant takes every place in turn; the first round is a warm-up left out); only the way the settings
are applied differs:

- ``callback``: ``Trainer(callbacks=[TRTRuntimeSettings(...)])``, the module untouched;
- ``manual`` (the baseline): upstream's API alone in the LightningModule: ``setup`` gives every
  ``TorchTensorRTModule`` ``RuntimeSettings`` holding one shared ``RuntimeCache``, ``on_predict_end``
  saves it;
- ``core``: this package's ``ServingSession`` driven by hand in the LightningModule (no callback), to
  tell a cost of the callback's hooks from one of the settings and cache themselves.

The figure is the median over rounds of callback / manual - 1 (each pair from the same round, so a
drift of the host's speed cancels), with twice the repetitions and batches of the other benchmarks.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks import harness

VARIANTS = ("callback", "manual", "core")


# --- the "core" variant: the package's public ServingSession API, by hand (the one place to adjust) ---


def open_core_session(module: Any, cuda_graph_strategy: str, cache_dir: str) -> Any:
    """A ServingSession for one run, serving every engine under ``module``: opens this GPU's cache, applies settings."""
    from lightning_trt_rtx import ServingSession, TRTSettings

    settings = TRTSettings(cuda_graph_strategy=cuda_graph_strategy, runtime_cache=os.path.join(cache_dir, "core.bin"))
    session = ServingSession(settings=settings)  # ranks from torch.distributed when initialised, else 0 of 1
    session.serve(module)
    return session


def close_core_session(session: Any) -> None:
    session.close()  # closes graph scopes, saves the cache, restores the engines; never raises


# --- the LightningModule of all three variants ----------------------------------------------------

_PREDICTOR: Any = None  # the class below, defined on first use: importing Lightning is slow


def predictor_class() -> Any:
    global _PREDICTOR
    if _PREDICTOR is not None:
        return _PREDICTOR
    from _model import CompiledPredictor

    from lightning_trt_rtx import _backend

    class ManualSettingsPredictor(CompiledPredictor):
        """The same settings applied in the LightningModule, without the callback.

        ``by_hand="manual"``: what one would write with upstream's API alone: ``setup`` gives every
        TorchTensorRTModule ``RuntimeSettings`` holding one ``RuntimeCache`` (loaded from
        ``cache_dir``/manual.bin); ``on_predict_end`` saves it. ``by_hand="core"``: the package's own
        ``ServingSession`` (what the callback drives) opened in ``setup`` and closed in
        ``on_predict_end``, without the callback's per-batch hooks. ``by_hand=None``: a plain
        CompiledPredictor (the callback's variant).
        """

        def __init__(self, model_name: str, batch_size: int, cache_dir: str, cuda_graph_strategy: str) -> None:
            super().__init__(model_name, batch_size)
            self.cache_dir = cache_dir
            self.cuda_graph_strategy = cuda_graph_strategy
            self.by_hand: str | None = "manual"
            self.runtime_cache: Any = None
            self.session: Any = None

        def setup(self, stage: str) -> None:
            super().setup(stage)
            if self.by_hand == "manual":
                runtime = _backend.torch_tensorrt().runtime
                if self.runtime_cache is None:
                    self.runtime_cache = runtime.RuntimeCache(path=os.path.join(self.cache_dir, "manual.bin"))
                    self.runtime_cache.load()
                settings = runtime.RuntimeSettings(
                    cuda_graph_strategy=self.cuda_graph_strategy, runtime_cache=self.runtime_cache
                )
                for module in self.net.modules():
                    if isinstance(module, runtime.TorchTensorRTModule):
                        module.runtime_settings = settings
            elif self.by_hand == "core":
                self.session = open_core_session(self, self.cuda_graph_strategy, self.cache_dir)

        def on_predict_end(self) -> None:
            if self.by_hand == "manual":
                self.runtime_cache.save()
            elif self.by_hand == "core" and self.session is not None:
                session, self.session = self.session, None
                close_core_session(session)

    _PREDICTOR = ManualSettingsPredictor
    return _PREDICTOR


# --- task and measurement -------------------------------------------------------------------------


def task(spec: dict) -> dict:
    """Per-batch latency: the callback vs the same settings applied by hand, interleaved, one engine."""
    from _model import BatchTimer, SyntheticDataModule

    from lightning_trt_rtx import TRTRuntimeSettings

    strategy = spec["strategy"]
    template = os.path.join(spec["cache_dir"], "callback", "gpu-{gpu}.bin")
    # one compiled module for every variant: only the way of applying the settings differs
    model = predictor_class()(spec["model"], spec["batch_size"], spec["cache_dir"], strategy)
    data = SyntheticDataModule(spec["model"], spec["batch_size"], spec["batches"])
    out: dict[str, list] = {variant: [] for variant in VARIANTS}
    for rep in range(spec["reps"] + 1):
        shift = rep % len(VARIANTS)  # every variant takes every place in the order in turn
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            timer = BatchTimer()
            model.by_hand = None if variant == "callback" else variant
            callbacks: list = [timer]
            if variant == "callback":
                settings = TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template, print_table=False)
                callbacks.insert(0, settings)
            harness.predict(model, data, callbacks)
            if rep:
                out[variant].append(timer.per_batch_ms)
    return {"reps": out}


def measure(runner: harness.Runner, cfg: dict) -> dict:
    spec = {"model": "mlp", "batch_size": 8, "batches": 2 * cfg["batches"], "reps": 2 * cfg["reps"]}
    spec.update(strategy="disabled", cache_dir=os.path.join(runner.work, "cache-overhead"))
    result = runner.task("overhead", spec)["reps"]
    callback, manual = harness.median(result["callback"]), harness.median(result["manual"])
    # paired: the variants of one round ran within seconds of each other, so a drift of the host's speed cancels
    pairs = harness.paired_pct(result["callback"], result["manual"])
    core_pairs = harness.paired_pct(result["core"], result["manual"])
    pct = harness.median(pairs) if pairs else None
    slower = sum(p > 0 for p in pairs)
    return {
        "key": "integration_overhead",
        "measurement": "integration overhead: TRTRuntimeSettings callback vs the same settings applied by hand"
        " (8x1024 MLP, batch 8, per batch; median of paired repetitions)",
        "value": pct,
        "display": f"{pct:+.2f}% (callback slower in {slower} of {len(pairs)} pairs, {min(pairs):+.1f}% to"
        f" {max(pairs):+.1f}%; medians {callback * 1e3:.0f} us vs {manual * 1e3:.0f} us per batch)"
        if pct is not None
        else "n/a",
        "pair": {"labels": ["by hand", "callback"], "values": [manual * 1e3, callback * 1e3], "unit": "us per batch"},
        "details": {
            "per_batch_ms": result,
            "paired_pct_callback_vs_manual": pairs,
            # the package's ServingSession driven in the module: the settings' cost without the callback's hooks
            "paired_pct_core_vs_manual": core_pairs,
            "median_pct_core_vs_manual": harness.median(core_pairs) if core_pairs else None,
        },
    }
