"""A BERT-sized text encoder, variable-length token batches and a LightningModule, for the dynamic-shape
example (``text_predict.py``) and benchmarks (``benchmarks/real_models.py``, ``benchmarks/dynamic_shapes.py``).

* :class:`TextEncoder`: ``nn.Embedding(vocab, width)`` + ``nn.TransformerEncoder`` (post-norm layers, GELU,
  ``batch_first``, ``enable_nested_tensor=False``) over int64 token ids ``(batch, seq)``, returning the hidden
  states ``(batch, seq, width)``. ``base``: vocab 30522, width 768, 12 layers, 12 heads, feed-forward 3072
  (BERT-base's sizes, random weights, no position embeddings); ``tiny``: the same layers, small (CPU tests).
* :func:`compile_text_encoder`: fp16 on the GPU, ``torch_tensorrt.compile(ir="dynamo")`` with a dynamic
  sequence dimension (:func:`input_spec`: batch fixed, sequence ``min_seq..max_seq``, optimized for ``opt_seq``).
* :func:`sample_lengths`: a seeded, long-tailed (log-normal) stream of lengths clipped to 16..512;
  :func:`bucket_length`: the next of a few sizes (32, 64, 128, 256, 512), so a job sees at most five shapes.
* :class:`TextDataModule` and :class:`TextPredictor`: variable-length text in ``Trainer.predict``.

Nothing is downloaded; every tensor comes from a fixed seed. Padding is token id 0 and is not masked in the
encoder (one input, so one dynamic shape): the predictor pools over each sequence's real tokens only.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_trt_rtx
from lightning_trt_rtx import _backend

BATCH_SIZE = 8
MIN_SEQ, OPT_SEQ, MAX_SEQ = 16, 128, 512
BUCKETS = (32, 64, 128, 256, 512)
# the stream's lengths: log-normal with median LENGTH_MEDIAN tokens and log-space deviation LENGTH_SIGMA,
# clipped to MIN_SEQ..MAX_SEQ (about half the draws under 64 tokens, a few percent above 256)
LENGTH_MEDIAN, LENGTH_SIGMA = 64.0, 0.9


@dataclass(frozen=True)
class TextSize:
    vocab: int
    width: int
    layers: int
    heads: int
    ff: int


SIZES: dict[str, TextSize] = {
    "base": TextSize(vocab=30522, width=768, layers=12, heads=12, ff=3072),  # BERT-base's sizes
    "tiny": TextSize(vocab=1000, width=64, layers=2, heads=4, ff=128),  # CPU tests and dry runs
}


def text_size(name: str) -> TextSize:
    if name not in SIZES:
        raise ValueError(f"Unknown text encoder size {name!r}. Valid choices: {sorted(SIZES)}.")
    return SIZES[name]


# --- the model ------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Token ids ``(batch, seq)`` (int64) -> hidden states ``(batch, seq, width)``."""

    def __init__(self, size: str = "base") -> None:
        super().__init__()
        s = text_size(size)
        self.size = size
        self.embed = nn.Embedding(s.vocab, s.width)
        layer = nn.TransformerEncoderLayer(
            s.width, s.heads, dim_feedforward=s.ff, dropout=0.0, activation="gelu", batch_first=True
        )
        # enable_nested_tensor=False: no nested-tensor conversion (it needs a padding mask anyway)
        self.encoder = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids))


def build_text_encoder(size: str = "base", seed: int = 0) -> TextEncoder:
    """The eager encoder with weights from ``seed``, in eval mode, on CPU, fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextEncoder(size)
    return model.eval()


@contextlib.contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """PyTorch's fused transformer fast path off (process-global, restored on exit).

    In eval mode ``nn.TransformerEncoderLayer`` may run one fused op (``_transformer_encoder_layer_fwd``),
    which torch.export would record and TensorRT has no converter for; with the fast path off the export
    records the plain ops (linear, scaled_dot_product_attention, layer_norm, gelu). Eager serving keeps it.
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def input_spec(batch_size: int = BATCH_SIZE, min_seq: int = MIN_SEQ, opt_seq: int = OPT_SEQ, max_seq: int = MAX_SEQ):
    """The ``torch_tensorrt.Input`` of the token ids: batch fixed, sequence dynamic in ``min_seq..max_seq``."""
    trt = _backend.torch_tensorrt()
    return trt.Input(
        min_shape=(batch_size, min_seq),
        opt_shape=(batch_size, opt_seq),
        max_shape=(batch_size, max_seq),
        dtype=torch.int64,
        name="ids",
    )


def compile_text_encoder(
    net: nn.Module,
    device: Any,
    batch_size: int = BATCH_SIZE,
    min_seq: int = MIN_SEQ,
    opt_seq: int = OPT_SEQ,
    max_seq: int = MAX_SEQ,
) -> nn.Module:
    """``net`` in fp16 on ``device``, compiled with torch_tensorrt (dynamo) for ids ``(batch_size, min..max_seq)``.

    The dtypes come from the model (fp16 weights, int64 ids): torch-tensorrt 2.14 types explicitly.
    """
    trt = _backend.torch_tensorrt()
    device = torch.device(device)
    net = net.to(device=device, dtype=torch.float16).eval()
    spec = input_spec(batch_size, min_seq, opt_seq, max_seq)
    with torch.cuda.device(device), no_mha_fastpath():
        return trt.compile(net, ir="dynamo", inputs=[spec], min_block_size=1)


def save_text_program(
    compiled: nn.Module,
    path: str,
    batch_size: int = BATCH_SIZE,
    min_seq: int = MIN_SEQ,
    opt_seq: int = OPT_SEQ,
    max_seq: int = MAX_SEQ,
) -> None:
    """Save a compiled encoder with its dynamic sequence dimension (``torch_tensorrt.save``, exported program)."""
    trt = _backend.torch_tensorrt()
    trt.save(compiled, path, arg_inputs=[input_spec(batch_size, min_seq, opt_seq, max_seq)])


# --- lengths and token batches --------------------------------------------------------------------


def sample_lengths(
    count: int,
    seed: int = 0,
    low: int = MIN_SEQ,
    high: int = MAX_SEQ,
    median: float = LENGTH_MEDIAN,
    sigma: float = LENGTH_SIGMA,
) -> list[int]:
    """``count`` lengths from a log-normal (median ``median``, log-space deviation ``sigma``) clipped to
    ``low..high``, from ``random.Random(seed)``: the same stream on every host and Python version."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [min(high, max(low, round(rng.lognormvariate(mu, sigma)))) for _ in range(count)]


def bucket_length(length: int, buckets: Sequence[int] | None = BUCKETS) -> int:
    """The smallest bucket that holds ``length`` (``length`` itself without buckets or above the largest)."""
    if not buckets:
        return length
    return next((b for b in sorted(buckets) if b >= length), length)


def token_ids(batch_size: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids in ``1..vocab-1`` (0 is padding), int64 ``(batch_size, length)``."""
    return torch.randint(1, vocab, (batch_size, length), generator=generator, dtype=torch.int64)


class TextBatches(Dataset):
    """``batches`` batches of ``batch_size`` sequences, each of its own seeded length (16..512).

    A batch is ``(ids, lengths)``: ids padded with 0 to the batch's longest sequence, rounded up to the
    next bucket (``buckets=None``: not rounded), and each sequence's real length. Built once, up front.
    """

    def __init__(
        self, batches: int, batch_size: int = BATCH_SIZE, vocab: int = 30522,
        buckets: Sequence[int] | None = BUCKETS, seed: int = 0,
    ) -> None:  # fmt: skip
        lengths = sample_lengths(batches * batch_size, seed)
        generator = torch.Generator().manual_seed(seed)
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(batches):
            own = lengths[i * batch_size : (i + 1) * batch_size]
            padded = bucket_length(max(own), buckets)
            ids = token_ids(batch_size, padded, vocab, generator)
            for row, n in enumerate(own):
                ids[row, n:] = 0
            self.items.append((ids, torch.tensor(own, dtype=torch.int64)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[index]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(ids.shape) for ids, _ in self.items]


class TextDataModule(LightningDataModule):
    """Variable-length token batches (see :class:`TextBatches`); one batch per loader step."""

    def __init__(
        self, batches: int = 64, batch_size: int = BATCH_SIZE, size: str = "base",
        buckets: Sequence[int] | None = BUCKETS, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}.")
        self.dataset = TextBatches(batches, batch_size, text_size(size).vocab, buckets, seed)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, shuffle=False)


# --- the LightningModule --------------------------------------------------------------------------


class TextPredictor(LightningModule):
    """Sentence embeddings from the encoder: compiled with torch_tensorrt on a GPU, eager on CPU.

    The encoder is built in ``__init__`` (eager, CPU) and compiled in ``setup`` once the Trainer has
    picked the device: fp16, a dynamic sequence dimension (``MIN_SEQ..MAX_SEQ``) and a fixed batch of
    ``batch_size``. ``program`` loads a program saved with :func:`save_text_program` instead;
    ``save_to`` saves the freshly compiled one there (before it runs). ``predict_step`` returns each
    sequence's mean hidden state over its real tokens, ``(batch, width)`` in fp32.
    """

    def __init__(
        self,
        size: str = "base",
        batch_size: int = BATCH_SIZE,
        use_tensorrt: bool | None = None,
        program: str | None = None,
        save_to: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.use_tensorrt = use_tensorrt
        self.program = program
        self.save_to = save_to
        self.encoder: nn.Module = build_text_encoder(size, seed)
        self.compiled = False
        self.compile_s = 0.0  # seconds spent compiling (or loading the program)

    def setup(self, stage: str) -> None:
        if self.compiled:
            return
        device = self.trainer.strategy.root_device
        if device.type != "cuda":
            return  # CPU: eager, fp32
        use_tensorrt = _backend.is_available() if self.use_tensorrt is None else self.use_tensorrt
        start = time.perf_counter()
        if self.program is not None:
            self.encoder = lightning_trt_rtx.load_program(self.program).to(device)
            self.compiled = True
        elif use_tensorrt:
            self.encoder = compile_text_encoder(self.encoder, device, self.batch_size)
            self.compiled = True
            if self.save_to:
                save_text_program(self.encoder, self.save_to, self.batch_size)
        else:
            rank_zero_warn(f"torch-tensorrt is not installed: serving the text encoder eagerly on {device}.")
            self.encoder = self.encoder.to(device=device, dtype=torch.float16)
        self.compile_s = time.perf_counter() - start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, lengths = batch
        hidden = self.encoder(ids).float()
        real = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        return (hidden * real).sum(1) / lengths[:, None].clamp(min=1)
