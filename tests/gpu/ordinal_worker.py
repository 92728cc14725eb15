"""Fresh process: compile a ConvNet on ``cuda:ORDINAL``, open this run's cache, time the first execute, save.

    CUDA_VISIBLE_DEVICES=... python -m tests.gpu.ordinal_worker ORDINAL TEMPLATE
"""

from __future__ import annotations

import json
import sys
import time

import torch

from lightning_trt_rtx import cache
from lightning_trt_rtx.engines import EngineBinding
from lightning_trt_rtx.settings import TRTSettings
from tests.gpu.models import ConvNet, compile_trt


def main(ordinal: str, template: str) -> None:
    torch.cuda.set_device(int(ordinal))
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    compiled = compile_trt(ConvNet(), x)
    run = cache.RunCache(template, cache.Placement.current())
    EngineBinding(compiled).apply(TRTSettings(runtime_cache=template).to_runtime_settings(run.handle))
    torch.cuda.synchronize()
    start = time.perf_counter()
    compiled(x)
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    run.save()
    print("FIGURES " + json.dumps({"gpu": run.placement.gpu.id, "source": run.stats.source, "path": run.path,
                                   "first_ms": first_ms, "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
