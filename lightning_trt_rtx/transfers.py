"""Batches on the GPU before the engine asks for them, predictions back to the host without a stall.

From a CPU dataset, a plain predict loop uploads each batch on the engine's own stream when its step
starts; from pageable memory a large copy returns only once the GPU has finished the work queued before
it (on H200: a 4 MiB copy waited for the kernel before it, copies up to 1 MiB did not), so host and GPU
take turns (measured on H200: ResNet-50 fp16 batch 32, 19 MB a batch, ran at about half the engine's own
speed). :class:`UploadsAhead` keeps ``depth`` batches in flight instead: a thread reads
the source, stages each CPU tensor into pinned memory (tensors already pinned, as from a DataLoader
with ``pin_memory=True``, go up as they are), copies it to the GPU on a stream of its own and records
an event; the consumer's stream waits on exactly that event when the batch is handed over. Nothing
waits for the whole device. Small batches (under ``UploadsAhead.THREAD_MIN_BYTES``) are staged by the
loop itself and copied on its own stream (or by Lightning, in its step), behind the step before them:
there a side stream's calls cost the host more per batch than the copy costs the GPU. The smallest
(under ``UploadsAhead.DIRECT_MAX_BYTES``, 64 KiB) are copied from where they are: a copy that small from
pageable memory does not wait for the GPU, and staging it would cost the host as much.

Buffers come from PyTorch's caching allocators, so nothing is overwritten while it is still read:
a pinned staging block is reused only after its copy has finished (the host allocator records an
event on the copy), and a GPU batch is marked as used on the consumer's stream (``record_stream``),
so its memory is reused only after every kernel queued there before it was freed has run. Memory is
bounded by ``depth + 1`` batches ahead; the pinned blocks are given back when the uploads close.

:class:`HostCopies` is the way back: each prediction is copied into pinned host memory on the
stream that made it, without waiting; the copies are collected when the loop ends.

Every CUDA call goes through :class:`CudaOps`, the boundary the CPU tests replace.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
import logging
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_trt_rtx._messages import warn
from lightning_trt_rtx.settings import check_flag

log = logging.getLogger(__name__)

DEFAULT_DEPTH = 2
_END = object()  # the source is exhausted
_POLL_S = 0.1  # how often a blocked thread looks whether it should stop
# how long close() waits for a thread still reading the source (a read that blocks, e.g. a stream waiting
# for its next request) before it leaves the thread behind (a daemon; it stops after that read): while an
# error or Ctrl-C is raised, briefly (the error goes on); else long enough for a slow read to end, as the
# source (e.g. a DataLoader with persistent workers) may be read again next
CLOSE_WAIT_S = 2.0
END_WAIT_S = 30.0


class CudaOps:
    """The CUDA calls the uploads make (one place, so that CPU tests can record the protocol)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    @contextmanager
    def in_thread(self, stream: Any) -> Iterator[None]:
        """Context for the uploads' thread: this device, the uploads' stream current."""
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            yield

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def pinned_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(tensor, pin_memory=True)

    def device_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(tensor, device=self.device)

    def upload_here(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor (pinned, or under ``UploadsAhead.DIRECT_MAX_BYTES``) copied to the device on the
        caller's current stream, without waiting for the GPU."""
        return tensor.to(self.device, non_blocking=True)

    def record_event(self) -> Any:
        event = torch.cuda.Event()
        event.record()  # on the current stream: in the uploads' thread, the uploads' stream
        return event

    def hand_over(self, event: Any, tensors: list[torch.Tensor]) -> None:
        """The consumer's stream waits for ``event``; ``tensors`` are marked as used on it."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for tensor in tensors:
            tensor.record_stream(stream)

    def finish(self, stream: Any) -> None:
        stream.synchronize()
        torch._C._host_emptyCache()  # the pinned staging blocks (no public API in torch 2.14)


class StepGate:
    """Keeps the uploads' thread from calling CUDA while a step runs.

    TensorRT-RTX's whole-graph capture and ``enable_cudagraphs`` capture inside the step, in CUDA's global
    mode, where a CUDA call from another thread breaks the capture (on H200 a loaded ResNet-50 under
    whole-graph capture failed with "Event is not valid ... a graph capture that is no longer running"
    while a thread uploaded). The loop's thread calls :meth:`step_started` before each step and
    :meth:`step_ended` after it; the uploads' thread makes its CUDA calls (pinned and device memory, the
    copy, the event) inside :meth:`between_steps`, and reads and stages into pinned memory (host work)
    while the step runs.

    Only a step that may capture holds the thread back, and only while a gated thread is attached (the
    rest cost nothing): ``capture()``, asked at each such step's start, says whether a graph may be
    captured in it (e.g. not under ``"auto"`` while its engines run without graphs, where the thread
    copies while the step runs, as without a gate)."""

    def __init__(self, capture: Callable[[], bool] = lambda: True) -> None:
        self._capture = capture
        self._lock = threading.Lock()
        self._in_step = False  # read and written by the loop's thread only
        self.attached = False  # a gated uploads thread waits on this gate (set by UploadsAhead)

    @property
    def in_step(self) -> bool:
        """Whether the loop's thread is inside a step that holds the uploads' CUDA calls back (ask it
        from the loop's thread)."""
        return self._in_step

    def step_started(self) -> None:
        """A step starts: where it may capture, the thread's CUDA call in flight (if any) ends first, and
        the next waits for :meth:`step_ended`."""
        if self.attached and not self._in_step and self._capture():
            self._lock.acquire()
            self._in_step = True

    def step_ended(self) -> None:
        if self._in_step:
            self._in_step = False
            self._lock.release()

    @contextmanager
    def between_steps(self, stop: threading.Event) -> Iterator[None]:
        """Wait until no step runs (giving up once ``stop`` is set: a step that never ended)."""
        while not self._lock.acquire(timeout=_POLL_S):
            if stop.is_set():
                raise _Stopped
        try:
            yield
        finally:
            self._lock.release()


class _Stopped(Exception):
    """The uploads closed while their thread waited for a step to end."""


def _as_device(device: torch.device | str | int) -> torch.device:
    """``device`` as a torch.device (an int is a CUDA device number)."""
    if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
        raise TypeError(
            f"device must be a torch.device, a str such as 'cuda:0' or a CUDA device number, got {device!r}."
        )
    try:
        return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as err:  # e.g. "gpu", "cuda:x", a negative number
        raise ValueError(f"device {device!r} is not a device: use e.g. 'cuda', 'cuda:1', 1 or 'cpu' ({err}).") from None


def _cuda_device(device: torch.device | str | int, what: str) -> torch.device:
    device = _as_device(device)
    if device.type != "cuda":
        raise ValueError(f"{what} works with a CUDA device, got {device}.")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def why_not_on_cuda(device: torch.device | str | int | None) -> str | None:
    """Why batches cannot be uploaded to ``device`` (None: the current CUDA device); None when they can."""
    if device is not None and _as_device(device).type != "cuda":
        return f"the loop runs on {_as_device(device).type}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def check_depth(depth: Any) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth (batches uploaded ahead) must be an int >= 1, got {depth!r}.")
    return depth


def check_source(source: Any) -> None:
    """An iterable of batches (a string is not one: it would be read as characters)."""
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(f"batches must be an iterable of batches (a DataLoader, a list); got {source!r}.")


class UploadsAhead:
    """Iterate ``source`` with every CPU tensor of each batch already on ``device``.

    Batches of any structure (tensors in tuples, lists, dicts, dataclasses, namedtuples; other leaves,
    tensor subclasses and objects with their own ``.to()``, e.g. a tokenizer's ``BatchEncoding``, are left
    as they are, for Lightning to move), changing shapes and a smaller last batch work. Up to ``depth`` batches wait,
    uploaded, to be handed over, and the thread may hold one more it has uploaded until there is room:
    ``depth + 1`` batches ahead of the one handed over at most (measured so: 0.95 of the bare engine).
    Iterate once; :meth:`close` (also on exhaustion or on leaving a ``with`` block) stops the reading and
    gives the pinned memory back (a thread blocked in a read is left behind after ``CLOSE_WAIT_S`` while an
    error is raised, else after ``END_WAIT_S``)::

        with UploadsAhead(loader, torch.device("cuda", 0)) as batches:
            for batch in batches:
                model(batch)

    Who reads and stages, decided by the first batch: where it holds at least ``THREAD_MIN_BYTES`` of CPU
    tensors, a thread of its own (the copy into pinned memory and the reading run beside the loop:
    measured on H200, ResNet-50 batch 32 from a CPU dataset ran at 0.95 of the bare engine this way),
    ``depth`` batches ahead. Smaller batches are read and staged by the consumer itself when it takes
    them, and copied on its own current stream, queued behind the step before: no side stream, event or
    hand-over, whose calls cost the host more than such a copy costs the GPU (H200, the small compiled
    models of the graphs benchmark: our per-batch cost in ``Trainer.predict`` fell from 0.14-0.35 ms to
    0.04-0.06 ms). From pinned memory that copy never waits for the GPU, as a large pageable one would.
    ``small_on_host=True`` hands those small batches over staged in pinned host
    memory instead, for a consumer that moves them itself with ``non_blocking=True`` inside its step
    (Lightning's ``batch_to_device`` does): one batch is then on the GPU at a time, at the address the
    last one freed, so an engine's captured graph replays without a copy of its input. Of the batches the
    consumer reads itself (the first batch small), those under ``DIRECT_MAX_BYTES`` are not staged at
    all: copied to the GPU from where they are (with ``small_on_host``, handed over as they are, for the
    consumer to move).
    ``may_capture()`` (asked at the first batch) says whether a CUDA graph may be captured while the
    loop runs (see :class:`StepGate`): then the thread makes its CUDA calls only between steps, through
    ``gate``; without a gate the consumer reads and stages every batch itself (large ones still go up on
    the uploads' stream, each with its event).

    ``stats``: batches handed over, bytes staged through pinned memory, bytes that came pinned, batches
    copied from where they were (``direct_batches``), ``mode`` (``"thread"`` or ``"loop"``), and
    ``waited_s``: how long the consumer waited for the thread's batches (where it waits, the data path,
    not the step, sets the loop's pace).
    """

    THREAD_MIN_BYTES = 1 << 20
    # batches under this many bytes of CPU tensors are copied from where they are, in the loop: a copy this small
    # from pageable memory does not wait for the GPU and costs the host about what staging it would (H200, behind
    # a 20 ms kernel: pageable 0.066 ms at 64 KiB, 0.205 ms at 1 MiB, 20.6 ms at 4 MiB, where it waited; from
    # pinned memory 0.04-0.05 ms, plus the staging's allocation and host copy)
    DIRECT_MAX_BYTES = 64 << 10

    def __init__(
        self,
        source: Iterable[Any],
        device: torch.device | str | int,
        depth: int = DEFAULT_DEPTH,
        ops: CudaOps | None = None,
        may_capture: Callable[[], bool] | None = None,
        gate: StepGate | None = None,
        small_on_host: bool = False,
    ) -> None:
        self.depth = check_depth(depth)
        self.small_on_host = check_flag("small_on_host", small_on_host)
        self.may_capture = may_capture
        self.gate = gate
        self.gated = False  # the thread's CUDA calls wait for the gate (graphs may be captured)
        self._producer: int | None = None  # the uploads' thread
        check_source(source)
        self.device = _cuda_device(device, "UploadsAhead") if ops is None else _as_device(device)
        self.ops = ops if ops is not None else CudaOps(self.device)
        self.source = source
        self.stats: dict[str, Any] = {
            "batches": 0, "staged_bytes": 0, "pinned_bytes": 0, "direct_batches": 0, "mode": "", "waited_s": 0.0
        }  # fmt: skip
        self._source: Iterator[Any] | None = None
        self._ahead: deque[Any] = deque()  # read and uploaded, not handed over (the consumer's side)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.depth)  # the thread's side
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._closed = False
        self._small = True  # the first batch's CPU tensors are under THREAD_MIN_BYTES (set at the first batch)

    # --- the consumer's side (the loop's thread) ---------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self._source is not None or self._closed:
            raise RuntimeError("UploadsAhead iterates its source once: make a new one for another pass.")
        self._source = iter(self.source)
        self._stream = self.ops.new_stream()
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._source is None:
            iter(self)
        if not self.stats["mode"]:
            self._start()
        if self._ahead:
            item = self._ahead.popleft()
        elif self.stats["mode"] == "loop" and self._small:
            item = self._read(catch=Exception, here=True)
        elif self.stats["mode"] == "loop":  # large batches where no thread may call CUDA: a side stream still
            with self.ops.in_thread(self._stream):
                item = self._read(catch=Exception)
        else:
            began = time.perf_counter()
            item = self._take()
            self.stats["waited_s"] += time.perf_counter() - began
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        batch, event, uploaded = item
        if event is not None:  # the consumer's stream waits for this batch's copies, nothing else
            self.ops.hand_over(event, uploaded)
        self.stats["batches"] += 1
        return batch

    def _take(self) -> Any:
        """The thread's next item; a thread that ended without one is an error, not a wait forever."""
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    if self._queue.empty():
                        return _Failure(RuntimeError("The uploads' thread ended without handing over a batch."))
                if self.gated and self.gate is not None and self.gate.in_step:  # it waits for this step to end
                    return _Failure(
                        RuntimeError(
                            "A batch was taken from the uploads inside a step (between batch_started and"
                            " batch_ended), while the uploads' thread waits for the step to end: take each"
                            " batch before batch_started, as `for batch in uploads:` does."
                        )
                    )

    def _start(self) -> None:
        """Look at the first batch: a thread of its own reads and uploads if its CPU tensors are large,
        else the consumer does, every batch from this first one."""
        first = self._next(catch=Exception)
        capture = self.may_capture is not None and self.may_capture()
        large = not _is_last(first) and _cpu_bytes(first) >= self.THREAD_MIN_BYTES
        self._small = not large
        if _is_last(first):
            self._ahead.append(first)
        else:
            self._source = itertools.chain([first], self._source or ())
        if large and (not capture or self.gate is not None):
            self.stats["mode"] = "thread"
            self.gated = capture
            if capture and self.gate is not None:
                self.gate.attached = True
            self._thread = threading.Thread(target=self._produce, name="lightning-trt-rtx-uploads", daemon=True)
            self._thread.start()
        else:
            self.stats["mode"] = "loop"

    def close(self) -> None:
        """Stop reading (batches not yet handed over are dropped) and give the pinned memory back."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread, self._thread = self._thread, None
        raising = sys.exc_info()[0] is not None  # closed from a handler: the loop's error or Ctrl-C goes on
        wait_s = CLOSE_WAIT_S if raising else END_WAIT_S
        deadline = time.monotonic() + wait_s
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            try:  # unblock a producer waiting for room
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=_POLL_S)
        left_reading = thread is not None and thread.is_alive()
        if left_reading:
            warn(
                f"The uploads' thread was still reading the source {wait_s:g} s after the loop"
                f" {'raised' if raising else 'ended'} (a read that blocks): it is left behind and stops after that"
                " read, uploading nothing more."
            )
        if self.gated and self.gate is not None:
            self.gate.attached = False  # no thread waits on it any more: steps take no lock
        self._queue = queue.Queue(maxsize=self.depth)
        self._ahead.clear()
        if self._stream is not None and not left_reading:  # copies in flight finish, their staging given back
            stream, self._stream = self._stream, None
            self.ops.finish(stream)

    def __enter__(self) -> UploadsAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- reading and uploading (the consumer, or the uploads' thread) ----------------------------

    def _produce(self) -> None:
        self._producer = threading.get_ident()
        try:
            with self.ops.in_thread(self._stream):
                while not self._stop.is_set():
                    item = self._read(catch=BaseException)
                    self._put(item)
                    if _is_last(item):
                        return
        except _Stopped:
            return
        except BaseException as error:  # outside reading (the stream, the device): the consumer raises it
            self._put(_Failure(error))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _read(self, catch: type[BaseException], here: bool = False) -> Any:
        """The next batch uploaded, ``_END``, or the error reading it (raised at its turn). ``here``: on
        the consumer's current stream (else on the uploads' stream, with an event to wait on)."""
        batch = self._next(catch)
        if self._stop.is_set() and threading.get_ident() == self._producer:
            raise _Stopped  # closed while the thread read (a read that blocked): nothing more is uploaded
        if _is_last(batch):
            return batch
        try:
            return self._upload(batch, here)
        except _Stopped:
            raise
        except catch as error:
            return _Failure(error)

    def _next(self, catch: type[BaseException]) -> Any:
        """The source's next batch as it is, ``_END``, or the error reading it."""
        assert self._source is not None
        try:
            return next(self._source)
        except StopIteration:
            return _END
        except catch as error:
            return _Failure(error)

    def _upload(self, batch: Any, here: bool = False) -> tuple[Any, Any, list[torch.Tensor]]:
        uploaded: list[torch.Tensor] = []  # what the consumer's stream must wait for and mark as used
        # a small batch in the loop: copied from where it is (with small_on_host, left for the consumer to move)
        batch_bytes = _cpu_bytes(batch) if here else 0
        direct = here and batch_bytes < self.DIRECT_MAX_BYTES
        if direct and self.small_on_host:
            self.stats["direct_batches"] += 1 if batch_bytes else 0
            return batch, None, []

        cuda = self._cuda_calls

        def up(tensor: Any) -> Any:
            if type(tensor) is not torch.Tensor:  # a subclass, or an object with its own .to():
                return tensor  # Lightning's own transfer moves it (with .to(), which keeps what it carries)
            if tensor.device.type != "cpu":
                if not here and tensor.device == self.device:
                    uploaded.append(tensor)  # made on the uploads' stream by the source (read in the thread)
                return tensor  # already on a device: Lightning's own transfer decides
            if direct:
                on_gpu = self.ops.upload_here(tensor)
                uploaded.append(on_gpu)
                return on_gpu
            nbytes = tensor.numel() * tensor.element_size()
            with cuda():
                pinned = self.ops.is_pinned(tensor)
                staged = tensor if pinned else self.ops.pinned_like(tensor)
            if pinned:
                self.stats["pinned_bytes"] += nbytes
            else:
                staged.copy_(tensor)  # host memory to host memory: no CUDA call, also while a step runs
                self.stats["staged_bytes"] += nbytes
            if here and self.small_on_host:
                on_gpu = staged  # pinned: the consumer's own copy does not wait for the GPU
            elif here:
                on_gpu = self.ops.upload_here(staged)
            else:
                with cuda():
                    on_gpu = self.ops.device_like(tensor)
                    on_gpu.copy_(staged, non_blocking=True)
            uploaded.append(on_gpu)
            return on_gpu

        try:
            moved = apply_to_collection(batch, _MovesItself, up)
        except (ValueError, TypeError) as err:  # e.g. a frozen dataclass: Lightning's own transfer decides
            log.debug("A batch was left for Lightning to move: %s", err)
            return batch, None, []
        if direct and batch_bytes:
            self.stats["direct_batches"] += 1
        if not uploaded or here:  # on the consumer's stream: its step comes after the copy
            return moved, None, uploaded
        with cuda():
            return moved, self.ops.record_event(), uploaded

    def _cuda_calls(self) -> Any:
        """Where the uploads call CUDA: in a gated thread, only between steps."""
        if self.gated and self.gate is not None and threading.get_ident() == self._producer:
            return self.gate.between_steps(self._stop)
        return contextlib.nullcontext()


class _MovesItself(abc.ABC):  # noqa: B024 - a structural test, nothing to implement
    """Anything with a ``.to()`` (a tensor, a tokenizer's ``BatchEncoding``, a TensorDict), but a dataclass:
    the leaves Lightning moves by calling it (its ``_TransferableDataType``), so the uploads walk no further
    into them."""

    @classmethod
    def __subclasshook__(cls, subclass: Any) -> bool:
        # a dataclass is walked and rebuilt field by field (as Lightning's own walk does), its .to() or not
        return callable(getattr(subclass, "to", None)) and not dataclasses.is_dataclass(subclass)


def _cpu_bytes(batch: Any) -> int:
    """Bytes of the CPU tensors the uploads would stage in ``batch`` (0 where its structure cannot be walked)."""
    sizes: list[int] = []

    def count(tensor: Any) -> Any:
        if type(tensor) is torch.Tensor and tensor.device.type == "cpu":  # what the uploads stage
            sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    try:
        apply_to_collection(batch, _MovesItself, count)
    except (ValueError, TypeError):  # e.g. a frozen dataclass: Lightning's own transfer moves it
        return 0
    return sum(sizes)


def _is_last(item: Any) -> bool:
    return item is _END or isinstance(item, _Failure)


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class HostCopies:
    """Copy predictions to pinned host memory without a stall per batch; collect them at the end.

    :meth:`add` queues a copy of every tensor of a prediction on ``device`` into pinned host memory,
    on the current stream (so it follows the step that made the prediction and comes before anything
    that could overwrite it) without waiting; :meth:`collect` waits once and returns the host
    predictions in the order they were added. Host memory comes from pinned slabs carved into
    aligned pieces: one pinned allocation per slab, not per prediction. Other leaves are kept as
    they are.
    """

    SLAB_BYTES = 64 << 20
    _ALIGN = 256

    def __init__(self, device: torch.device | str | int) -> None:
        device = _as_device(device)
        self.device = _cuda_device(device, "HostCopies") if device.type == "cuda" else device
        self._items: list[Any] = []
        self._slab: torch.Tensor | None = None
        self._used = 0
        self._last: torch.cuda.Event | None = None

    def _host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        size = -(-nbytes // self._ALIGN) * self._ALIGN
        if self._slab is None or self._used + size > self._slab.numel():
            self._slab = torch.empty(max(self.SLAB_BYTES, size), dtype=torch.uint8, pin_memory=True)
            self._used = 0
        piece = self._slab[self._used : self._used + nbytes]
        self._used += size
        return piece.view(tensor.dtype).view(tensor.shape)

    def add(self, prediction: Any) -> None:
        if self.device.type != "cuda":  # a CPU loop: the predictions are on the host already
            self._items.append(prediction)
            return

        def down(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.device != self.device:
                return tensor
            host = self._host_like(tensor)
            host.copy_(tensor, non_blocking=True)
            return host

        with torch.cuda.device(self.device):
            self._items.append(apply_to_collection(prediction, torch.Tensor, down))
            self._last = torch.cuda.Event()
            self._last.record()

    def collect(self) -> list[Any]:
        """Every prediction added so far, on the host (waits once, for the last copy)."""
        if self._last is not None:
            self._last.synchronize()
        items, self._items, self._last = self._items, [], None
        self._slab, self._used = None, 0
        return items

    def __len__(self) -> int:
        return len(self._items)
