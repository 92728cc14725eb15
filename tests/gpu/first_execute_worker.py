"""Fresh process: load a program, open this run's cache, time the first execute, save."""

from __future__ import annotations

import json
import sys
import time

import torch

from lightning_trt_rtx import cache, load_program
from lightning_trt_rtx.engines import EngineBinding
from lightning_trt_rtx.settings import TRTSettings


def main(program_path: str, template: str) -> None:
    program = load_program(program_path)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    shared = cache.RunCache(template, cache.Placement.current())
    EngineBinding(program).apply(TRTSettings(runtime_cache=template).to_runtime_settings(shared.handle))
    torch.cuda.synchronize()
    start = time.perf_counter()
    program(x)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    shared.save()
    print(json.dumps({"source": shared.stats.source, "first_execute_s": elapsed, "bytes": shared.stats.save_bytes}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
