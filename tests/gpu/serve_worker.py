"""One fresh process serving a saved program through Trainer.predict; prints its figures as JSON.

    python -m tests.gpu.serve_worker PROGRAM TEMPLATE [--strategy S] [--batches N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import lightning as L
import torch

from lightning_trt_rtx import TRTRuntimeSettings, _backend, load_program


class Served(L.LightningModule):
    def __init__(self, program_path: str) -> None:
        super().__init__()
        self.program = load_program(program_path)
        self.contexts: list[int] = []

    def predict_step(self, batch, batch_idx):
        return self.program(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("program")
    parser.add_argument("template")
    parser.add_argument("--strategy", default="disabled")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--shape", default="4,3,16,16")
    args = parser.parse_args()
    shape = [int(s) for s in args.shape.split(",")]
    data = [torch.randn(*shape[1:]) for _ in range(shape[0] * args.batches)]
    loader = torch.utils.data.DataLoader(data, batch_size=shape[0])
    model = Served(args.program)
    callback = TRTRuntimeSettings(cuda_graph_strategy=args.strategy, runtime_cache=args.template, print_table=False)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(model, loader)
    engines = [v for m in model.program.modules() for v in vars(m).values() if _backend.is_bare_engine(v)]
    figures = callback.figures[0]
    row = dataclasses.asdict(figures) | {
        "cache_source": figures.cache_source,
        "cache_bytes": figures.cache_bytes,
        "saved_bytes": figures.saved_bytes,
        "applies": figures.cache.applies if figures.cache else "-",
        "contexts": [_backend.contexts_created(e) for e in engines],
        "device": torch.cuda.get_device_name(),
    }
    print("FIGURES " + json.dumps(row))


if __name__ == "__main__":
    main()
