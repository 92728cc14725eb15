"""LightningCLI for the example predictor: TensorRT-RTX runtime settings configured in YAML.

    python examples/cli.py predict --config examples/cli.yaml
    python examples/cli.py predict --config examples/cli.yaml --data.model_name mlp --data.batches 50

``cli.yaml`` adds ``lightning_trt_rtx.TRTRuntimeSettings`` to ``trainer.callbacks`` and
``lightning_trt_rtx.TRTRuntimePrecision`` to ``trainer.plugins`` (``class_path`` + ``init_args``). The
two share one serving session (one cache file per physical GPU, one figures table), so their
settings must agree. The data module's model name and
batch size are linked into the model, so the compiled shape always matches the batches.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _model import CompiledPredictor, SyntheticDataModule  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402


class PredictCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        parser.link_arguments("data.model_name", "model.model_name")
        parser.link_arguments("data.batch_size", "model.batch_size")
        parser.link_arguments("data.half", "model.half")


def main() -> None:
    PredictCLI(CompiledPredictor, SyntheticDataModule, save_config_callback=None)


if __name__ == "__main__":
    main()
