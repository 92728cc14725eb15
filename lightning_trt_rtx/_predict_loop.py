"""The package's one private seam into Lightning: the predict loop's batch iterator.

Lightning 2.6 has no public hook that sees the next batch while the current one runs: the predict
loop creates its data fetcher (``trainer.predict_loop._data_fetcher``) and the fetcher's iterator
before ``on_predict_start``, and then takes one batch per step from ``fetcher.iterator``. Uploading
ahead wraps that iterator once, at the loop's start. Everything Lightning does per batch
afterwards (precision ``convert_input``, ``batch_to_device``, which leaves a batch already on the
device as it is, the hooks, the step) runs as before. Tested against Lightning 2.6 in
``tests/test_transfers.py``; where the seam is not there (another Lightning version, a
``dataloader_iter`` step) the uploads stay off and say why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from lightning.pytorch.core.hooks import DataHooks
from lightning.pytorch.utilities.model_helpers import is_overridden

log = logging.getLogger(__name__)

# hooks that see a batch on the host before Lightning moves it: a batch already on the GPU would change them
_HOST_SIDE_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device")


def why_not_upload(trainer: Any) -> str | None:
    """Why batches of this Trainer's predict loop cannot be uploaded ahead; None when they can."""
    device = trainer.strategy.root_device
    if device.type != "cuda":
        return f"the loop runs on {device.type}"
    return why_not_wrap(trainer)


def why_not_wrap(trainer: Any) -> str | None:
    """Why this Trainer's predict loop cannot take its batches through a wrapper; None when it can."""
    fetcher = getattr(trainer.predict_loop, "_data_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "iterator") or fetcher.iterator is None:
        return "this Lightning version's predict loop has no batch iterator to wrap (tested with 2.6)"
    if type(fetcher).__name__ != "_PrefetchDataFetcher":
        return "predict_step takes dataloader_iter: it moves batches itself"
    for owner in (trainer.lightning_module, trainer.datamodule):
        if owner is None:
            continue
        for hook in _HOST_SIDE_HOOKS:
            if is_overridden(hook, owner, parent=DataHooks):
                return f"{type(owner).__name__} overrides {hook}, which expects batches on the host"
    return None


def upload_batches(trainer: Any, session: Any, wanted: bool) -> None:
    """Route the predict loop's batches through ``session.upload_ahead`` where that is safe, else
    record in the session's figures why not."""
    if not wanted:
        session.uploads_off("upload_ahead=False")
        return
    reason = why_not_upload(trainer)
    if reason is not None:
        session.uploads_off(reason)
        log.debug("Batches are not uploaded ahead: %s.", reason)
        return
    device = trainer.strategy.root_device
    # the callbacks and the plugin call batch_started / batch_ended around every step; Lightning's
    # batch_to_device moves a small batch (staged in pinned memory, or under 64 KiB as it is) inside its step
    # without waiting
    wrap_batches(
        trainer, lambda batches: session.upload_ahead(batches, device, steps_marked=True, small_on_host=True)
    )


def wrap_batches(trainer: Any, wrap: Callable[[Any], Any]) -> None:
    """Route the predict loop's remaining batches through ``wrap(batches)`` (call after ``why_not_upload``).

    ``batches`` continues the iterator Lightning already made (its ``CombinedLoader``): calling
    ``iter()`` on that loader would start every DataLoader over (and start their workers again).
    """
    fetcher = trainer.predict_loop._data_fetcher
    fetcher.iterator = iter(wrap(_Remaining(fetcher.iterator)))


class _Remaining:
    """The batches an already started iterator has left (``iter()`` does not start it over)."""

    def __init__(self, started: Any) -> None:
        self.started = started

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield next(self.started)
            except StopIteration:
                return


_BATCH_COUNTS = {
    "predict": "num_predict_batches",
    "validate": "num_val_batches",
    "test": "num_test_batches",
    "sanity_check": "num_sanity_val_batches",
}


def start_loop(session: Any, trainer: Any) -> None:
    """``session.loop_started`` for the Trainer's running loop: whether it runs on a GPU, and its batch count."""
    session.loop_started(trainer.strategy.root_device.type == "cuda", loop_batches(trainer))


def loop_batches(trainer: Any) -> float:
    """How many batches the running loop serves, over its dataloaders (Lightning's own counts, public;
    ``inf`` when a dataloader has no length or the stage has no count)."""
    stage = getattr(getattr(trainer, "state", None), "stage", None)
    name = _BATCH_COUNTS.get(getattr(stage, "value", ""), "")
    try:
        counts = getattr(trainer, name) if name else None
        return float(sum(counts)) if counts else float("inf")
    except (TypeError, ValueError, AttributeError):
        return float("inf")
