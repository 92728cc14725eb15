"""Real models (``--real-models``): compile time, first batch cold / warm, time until steady, steady per batch.

Models, random weights (nothing downloaded), fp16 on the GPU:

* ``resnet50-b1`` / ``resnet50-b32``: torchvision ResNet-50, 224x224, batch 1 / 32 (static shapes);
* ``vit-b16-b8``: torchvision ViT-B/16, 224x224, batch 8;
* ``bert-b8``: the BERT-base-sized encoder of ``examples/_text_model.py`` (12 layers, width 768, vocab
  30522) compiled with a dynamic sequence dimension (16..512, batch 8), served here at 128 tokens.

ResNet-50 and ViT need torchvision (``pip install ".[bench]"``) and are skipped without it.

Per model, each step in fresh processes (``harness.Runner``):

1. ``real-prep``: compile once (``torch_tensorrt.compile``, timed: **compile time**), compare with eager on one
   input, save with ``torch_tensorrt.save``. Every later process only loads it (``load_program``).
2. ``real-serve``, per repetition a **cold** process (its cache directory emptied first) then a **warm** one
   (the file the cold one saved): ``Trainer.predict`` with ``TRTRuntimeSettings`` (default settings, this
   GPU's cache file under the model's own directory) over at least ``min_batches`` batches and
   ``min_seconds`` seconds, every batch timed (``harness.batch_times``: CUDA-synchronized at each batch's
   end). Figures: the **first batch** (the callback's ``first_batch_ms``), the **time until steady** and
   the batch it is reached at (``harness.steady_point``), and the **cache file's size** (saved bytes).
3. ``real-steady``, one process: per batch in ``Trainer.predict`` (``_model.BatchTimer``: the mean after
   the first batch, no per-batch sync) for **eager PyTorch** (the fp16 model, no TensorRT), **TensorRT-RTX
   default** and **whole-graph capture** (``cuda_graph_strategy="whole_graph_capture"``), interleaved, the
   order rotating every round, round 0 a warm-up left out; then the **bare engine** on one fixed input (no
   Lightning, 10 untimed calls first), default and with whole-graph capture.

**Until steady.** With a run's batch times t_0..t_{n-1}: the final median m is the median of the second
half (t_{n//2}..t_{n-1}); the steady index k is the first batch with t_k <= 1.2 m from which on the median
of every window of 5 consecutive batches (t_j..t_{j+4}, j >= k) is <= 1.2 m too; the time until steady is
t_0 + ... + t_{k-1} (the first batch and the slow ones after it: under TensorRT-RTX's default ``lazy``
kernel specialization a cold run keeps compiling faster kernels in the background after its first batch).
A run that never settles reports ``steady: false`` and its whole length.

One row per model; its value is the first batch warm / cold (median over repetitions), its display and
``details`` hold every other figure.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks import harness

# name: (architecture, batch size, input shape after the batch dimension)
MODELS: dict[str, tuple[str, int, tuple[int, ...]]] = {
    "resnet50-b1": ("resnet50", 1, (3, 224, 224)),
    "resnet50-b32": ("resnet50", 32, (3, 224, 224)),
    "vit-b16-b8": ("vit_b_16", 8, (3, 224, 224)),
    "bert-b8": ("text", 8, (128,)),
}
DRY_RUN_IMAGE = 32  # dry run (CPU): small images, the tiny text encoder
VARIANTS = ("eager", "default", "graphs")
POOL = 8  # distinct input tensors the loaders cycle through


def program_path(work: str, name: str) -> str:
    return os.path.join(work, f"{name}.ep")


def available_models() -> list[str]:
    """Every model whose builder is importable here (ResNet-50 and ViT need torchvision)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return [m for m, (arch, _, _) in MODELS.items() if arch == "text"]
    return list(MODELS)


# --- inside a task ----------------------------------------------------------------------------------


def _input_shape(name: str) -> tuple[int, ...]:
    arch, batch, shape = MODELS[name]
    if harness.dry_run() and arch != "text":
        shape = (3, DRY_RUN_IMAGE, DRY_RUN_IMAGE)
    return (batch, *shape)


def _build(name: str, seed: int = 0) -> Any:
    """The eager model, fp32 on CPU in eval mode (the tiny text encoder in a dry run)."""
    import torch

    arch = MODELS[name][0]
    if arch == "text":
        from _text_model import build_text_encoder

        return build_text_encoder("tiny" if harness.dry_run() else "base", seed)
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "vit_b_16":
            image = DRY_RUN_IMAGE if harness.dry_run() else 224
            net = torchvision.models.vit_b_16(weights=None, image_size=image)
        else:
            net = torchvision.models.resnet50(weights=None)
    return net.eval()


def _inputs(name: str, count: int = POOL, seed: int = 0) -> list[Any]:
    """``count`` seeded input batches on CPU: fp16 images on a GPU (fp32 in a dry run), int64 token ids."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shape = _input_shape(name)
    if MODELS[name][0] == "text":
        from _text_model import text_size

        vocab = text_size("tiny" if harness.dry_run() else "base").vocab
        return [torch.randint(1, vocab, shape, generator=generator, dtype=torch.int64) for _ in range(count)]
    dtype = torch.float32 if harness.dry_run() else torch.float16
    return [torch.randn(shape, generator=generator).to(dtype) for _ in range(count)]


def _served(net: Any) -> Any:
    """A LightningModule whose ``predict_step`` runs ``net`` on its batch."""
    from lightning.pytorch import LightningModule

    class Served(LightningModule):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> Any:
            return self.net(x)

        def predict_step(self, batch: Any, batch_idx: int) -> Any:
            return self.net(batch)

    return Served(net)


def _load(name: str, program: str) -> Any:
    """The saved program on the GPU (``load_program``); the eager model on CPU in a dry run."""
    if harness.dry_run():
        return _build(name)
    from lightning_trt_rtx import load_program

    return load_program(program).to(harness.device())


def _timed_loader(batches: list[Any], min_batches: int, min_seconds: float, max_batches: int) -> Any:
    """A loader cycling through ``batches`` until it gave ``min_batches`` and ``min_seconds`` passed since its
    first batch (at most ``max_batches``). Iterated in the main process, so the clock is the loop's."""
    from torch.utils.data import DataLoader, IterableDataset

    class Timed(IterableDataset):
        def __iter__(self):
            start = None
            for i in range(max_batches):
                if i >= min_batches and start is not None and time.perf_counter() - start >= min_seconds:
                    return
                yield batches[i % len(batches)]
                if start is None:
                    start = time.perf_counter()

    return DataLoader(Timed(), batch_size=None)


def task_prep(spec: dict) -> dict:
    """Compile one model once (timed), compare with eager, save it for every later process."""
    import torch

    name = spec["model"]
    if harness.dry_run():
        return {"model": name, "compile_s": 0.0, "program_bytes": 0, "max_abs_diff": 0.0, "dry_run": True}
    from lightning_trt_rtx import _backend

    _backend.torch_tensorrt()  # import outside the timed window
    gpu = harness.device()
    net = _build(name)
    x = _inputs(name, 1)[0].to(gpu)
    start = time.perf_counter()
    if MODELS[name][0] == "text":
        from _text_model import compile_text_encoder, save_text_program

        compiled = compile_text_encoder(net, gpu, batch_size=MODELS[name][1])
        compile_s = time.perf_counter() - start
        save_text_program(compiled, spec["program"], batch_size=MODELS[name][1])
        net = net.to(device=gpu, dtype=torch.float16)  # compile_text_encoder moved it already; explicit here
    else:
        from _model import compile_tensorrt, save_program
        from _text_model import no_mha_fastpath

        net = net.to(device=gpu, dtype=torch.float16)
        with no_mha_fastpath():  # ViT's nn.MultiheadAttention: the fused fast path has no TensorRT converter
            compiled = compile_tensorrt(net, x)
        compile_s = time.perf_counter() - start
        save_program(compiled, spec["program"], x)  # before anything runs it
    with torch.inference_mode():
        diff = (compiled(x).float() - net(x).float()).abs().max().item()
    from lightning_trt_rtx.engines import find_engines

    return {
        "model": name,
        "engines": len(find_engines(compiled)),  # 1 unless some op fell back to PyTorch
        "compile_s": compile_s,
        "program_bytes": os.path.getsize(spec["program"]),
        "max_abs_diff": diff,
        "input_shape": list(x.shape),
    }


def task_serve(spec: dict) -> dict:
    """One cold or warm process: load the program, ``Trainer.predict`` with every batch timed."""
    from lightning_trt_rtx import TRTRuntimeSettings

    cache_dir = harness.prepare_cache_dir(spec["cache_dir"], cold=spec["cold"])
    start = time.perf_counter()
    net = _load(spec["model"], spec["program"])
    load_s = time.perf_counter() - start
    settings = TRTRuntimeSettings(runtime_cache=os.path.join(cache_dir, "gpu-{gpu}.bin"), print_table=False)
    times = harness.batch_times()
    loader = _timed_loader(_inputs(spec["model"]), spec["min_batches"], spec["min_seconds"], spec["max_batches"])
    harness.trainer([settings, times]).predict(_served(net), loader, return_predictions=False)
    (fig,) = settings.figures
    return {
        "cold": spec["cold"],
        "times_ms": times.times_ms,
        "steady": harness.steady_point(times.times_ms),
        "batches": len(times.times_ms),
        **harness.served_figures(fig, cache_dir),
        "load_program_s": load_s,
    }


def task_steady(spec: dict) -> dict:
    """Per batch in Trainer.predict: eager / TensorRT-RTX default / whole-graph capture, interleaved; bare engine."""
    import torch
    from _model import BatchTimer
    from torch.utils.data import DataLoader

    from lightning_trt_rtx import TRTRuntimeSettings, TRTSettings

    name = spec["model"]
    template = os.path.join(spec["cache_dir"], "gpu-{gpu}.bin")
    os.makedirs(spec["cache_dir"], exist_ok=True)
    compiled = _served(_load(name, spec["program"]))
    eager_net = _build(name)
    if not harness.dry_run():
        eager_net = eager_net.to(device=harness.device(), dtype=torch.float16)
    eager = _served(eager_net)
    pool = _inputs(name)
    batches = [pool[i % len(pool)] for i in range(spec["batches"])]
    per_batch: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(spec["reps"] + 1):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        for variant in order:
            timer = BatchTimer()
            callbacks: list = [timer]
            if variant != "eager":
                strategy = "whole_graph_capture" if variant == "graphs" else "disabled"
                callbacks.insert(0, TRTRuntimeSettings(cuda_graph_strategy=strategy, runtime_cache=template,
                                                       print_table=False))  # fmt: skip
            module = eager if variant == "eager" else compiled
            harness.trainer(callbacks).predict(module, DataLoader(batches, batch_size=None), return_predictions=False)
            if rep > 0:  # round 0: warm-up (first contexts, JIT, captures)
                per_batch[variant].append(timer.per_batch_ms)
    x = pool[0].to(harness.device())
    bare = {
        s: harness.bare_engine_ms(compiled.net, x, TRTSettings(cuda_graph_strategy=s, runtime_cache=template),
                                  spec["batches"])
        for s in ("disabled", "whole_graph_capture")
    }  # fmt: skip
    return {"per_batch_ms": per_batch, "bare_ms": bare}


# --- in the parent ----------------------------------------------------------------------------------


def measure(runner: harness.Runner, cfg: dict) -> list[dict]:
    """One row per model (those available here): first batch warm / cold, and the rest in the display."""
    rows = []
    skipped = [m for m in MODELS if m not in available_models()]
    if skipped:
        print(f"    skipped {', '.join(skipped)}: torchvision is not installed (pip install '.[bench]')", flush=True)
    for name in available_models():
        if cfg.get("models") and name not in cfg["models"]:
            continue
        start = time.perf_counter()
        try:
            rows.append(_measure_model(runner, cfg, name))
        except Exception as err:  # one model failing keeps the others' rows
            rows.append({"key": f"real_{name}", "measurement": f"real model {name}", "value": None, "error": str(err)})
        if runner.verbose:
            print(f"    [{name}] {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _measure_model(runner: harness.Runner, cfg: dict, name: str) -> dict:
    program = program_path(runner.work, name)
    prep = runner.task("real-prep", {"model": name, "program": program})
    cache_dir = os.path.join(runner.work, f"cache-real-{name}")
    base = {
        "model": name,
        "program": program,
        "cache_dir": cache_dir,
        "min_batches": cfg["real_min_batches"],
        "min_seconds": cfg["real_min_seconds"],
        "max_batches": cfg["real_max_batches"],
    }
    cold, warm = [], []
    for _ in range(cfg["real_reps"]):
        cold.append(runner.task("real-serve", {**base, "cold": True}))
        warm.append(runner.task("real-serve", {**base, "cold": False}))
    steady = runner.task(
        "real-steady",
        {"model": name, "program": program, "cache_dir": cache_dir, "batches": cfg["real_batches"],
         "reps": cfg["real_reps"]},
    )  # fmt: skip
    return summarize(name, prep, cold, warm, steady)


def summarize(name: str, prep: dict, cold: list[dict], warm: list[dict], steady: dict) -> dict:
    """The row of one model from its tasks' figures (medians over repetitions)."""
    med = harness.median

    def both(figure: Any) -> dict[str, list]:
        return {"cold": [figure(r) for r in cold], "warm": [figure(r) for r in warm]}

    cold_first, warm_first = med([r["first_batch_ms"] for r in cold]), med([r["first_batch_ms"] for r in warm])
    cold_until = med([r["steady"]["until_ms"] for r in cold])
    warm_until = med([r["steady"]["until_ms"] for r in warm])
    per_batch = {v: med(steady["per_batch_ms"][v]) for v in VARIANTS}
    bare = steady["bare_ms"]
    cache_bytes = max((r["cache_file_bytes"] for r in cold + warm), default=0)
    arch, batch, shape = MODELS[name]
    what = f"{arch}, batch {batch}" + (", 128 tokens of 16..512" if arch == "text" else "")
    ratio = warm_first / cold_first if cold_first > 0 else None
    display = (
        f"first batch {cold_first:.1f} -> {warm_first:.1f} ms (cold -> warm"
        + (f", {ratio:.3f}" if ratio is not None else "")
        + f"); steady after {cold_until:.0f} ms cold / {warm_until:.0f} ms warm;"
        f" per batch eager {per_batch['eager']:.3f}, TRT-RTX {per_batch['default']:.3f},"
        f" graphs {per_batch['graphs']:.3f}, bare engine {bare['disabled']:.3f} / {bare['whole_graph_capture']:.3f} ms;"
        f" compile {prep['compile_s']:.1f} s; cache {cache_bytes / 2**20:.1f} MiB"
    )
    return {
        "key": f"real_{name}",
        "measurement": f"real model {name} ({what}, fp16): first batch in Trainer.predict, warm / cold",
        "value": ratio,
        "display": display,
        "pair": {"labels": ["cold cache", "warm cache"], "values": [cold_first, warm_first],
                 "unit": "ms (first batch)"},  # fmt: skip
        "details": {
            "compile_s": prep["compile_s"],
            "program_bytes": prep["program_bytes"],
            "max_abs_diff_vs_eager": prep["max_abs_diff"],
            "first_batch_ms": both(lambda r: r["first_batch_ms"]),
            "until_steady_ms": both(lambda r: r["steady"]["until_ms"]),
            "steady_index": both(lambda r: r["steady"]["index"]),
            "steady_reached": all(r["steady"]["steady"] for r in cold + warm),
            "final_median_ms": both(lambda r: r["steady"]["final_median_ms"]),
            "batches_per_run": both(lambda r: r["batches"]),
            "first_20_batches_ms": {"cold": cold[-1]["times_ms"][:20] if cold else [],
                                    "warm": warm[-1]["times_ms"][:20] if warm else []},  # fmt: skip
            "per_batch_ms": per_batch,
            "per_batch_ms_per_rep": steady["per_batch_ms"],
            "bare_engine_ms": bare,
            "cache_file_bytes": cache_bytes,
            "saved_bytes": both(lambda r: r["saved_bytes"]),
            "warm_cache_source": sorted({r["cache_source"] for r in warm}),
            "engines": cold[-1]["engines"] if cold else 0,
            "program_load_s": med([r["load_program_s"] for r in cold + warm]),
        },
    }
