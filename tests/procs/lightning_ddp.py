"""Two-process CPU DDP predicts; Lightning launches rank 1 by re-running this script (same arguments).

    python tests/procs/lightning_ddp.py CASES_JSON

``CASES_JSON``: a list of cases, run in turn by both ranks in one process group (each a new Trainer),
each ``{"dir": OUT_DIR, "mode": MODE, ...options}``. ``MODE``: ``ok`` | ``fail_rank1`` | ``fail_both``
(``predict_step`` raises at batch 1 on those ranks; the exception is caught and the next case runs).
Options (all optional):

* ``server``: ``"callback"`` (default: ``TRTRuntimeSettings``), ``"plugin"`` (``TRTRuntimePrecision``) or
  ``"both"`` (equal settings);
* ``engines``: ``true`` (default) or ``false`` (a model without TensorRT engines);
* ``template``: the kernel-cache template (default ``OUT_DIR/cache/rank{rank}.bin``), ``"default"``
  for the package's default (under ``cache_dir``), or ``null`` for none;
* ``cache_dir``: ``$LIGHTNING_TRT_RTX_CACHE_DIR`` for this case;
* ``fake_gpu``: ``true`` runs both ranks "on" ``tests.conftest.FAKE_GPU`` (``cache.current_gpu`` faked
  at the package's boundary, as the ``fake_gpu`` fixture does), so saves record it and seeding works;
* ``print_table``: the callback's ``print_table`` (default ``false``).

Each rank writes ``OUT_DIR/rank{r}.json``: what its engines held at every predict_step (handle ids,
strategies), the run's session (found with ``serving_session(trainer)`` while the loop ran): its
cache handle, path and source, whether it is closed, its own figures; the callback's figures
(every rank's on rank zero, handed over at teardown), the settings after the run, the error it saw
(if any), how long ``trainer.predict`` took, and the package's messages of this case (warnings and
infos such as the table, which also reach stderr, as in any run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lightning.pytorch import Trainer  # noqa: E402

from lightning_trt_rtx import TRTRuntimePrecision, TRTRuntimeSettings, _messages, cache  # noqa: E402
from tests.procs.lightning_models import EngineModel, SessionSpy, predict_loader  # noqa: E402

SERVERS = ("callback", "plugin", "both")


class RankFailure(ValueError):
    pass


class Messages(logging.Handler):
    """The package's messages (logger ``lightning_trt_rtx``); its own handler still prints them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.warnings: list[str] = []
        self.infos: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        (self.warnings if record.levelno >= logging.WARNING else self.infos).append(record.getMessage())


def figures_dict(figures) -> dict:
    """A RankFigures as JSON: its fields (the cache stats nested) and its read-only properties."""
    return dict(
        dataclasses.asdict(figures),
        cache_source=figures.cache_source,
        cache_path=figures.cache_path,
        cache_bytes=figures.cache_bytes,
        saved_bytes=figures.saved_bytes,
        warm=figures.warm,
        applies=figures.cache.applies if figures.cache is not None else "-",
    )


REAL_GPU = cache.current_gpu


def run_case(out_dir: str, mode: str, options: dict) -> bool:
    """One Trainer.predict over both ranks; writes this rank's report; returns whether it raised."""
    server = options.get("server", "callback")
    if server not in SERVERS:
        raise SystemExit(f"unknown server {server!r}; valid: {SERVERS}")
    if options.get("fake_gpu"):
        from tests.conftest import FAKE_GPU

        cache.current_gpu = lambda: FAKE_GPU
    else:
        cache.current_gpu = REAL_GPU
    if options.get("cache_dir"):
        os.environ[cache.CACHE_DIR_ENV] = options["cache_dir"]
    _messages._said.clear()  # one-time messages: once per case, as in a process of its own
    template = options.get("template", os.path.join(out_dir, "cache", "rank{rank}.bin"))
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning for the process it launches
    fails = mode == "fail_both" or (mode == "fail_rank1" and rank == 1)
    error = RankFailure(f"rank {rank} fails in predict_step")
    model = EngineModel(engines_in="init" if options.get("engines", True) else "none",
                        fail_at=1 if fails else None, error=error)
    prior = [e.runtime_settings for e in model.engines()]
    settings = dict(cuda_graph_strategy="whole_graph_capture", runtime_cache=template)
    callback = TRTRuntimeSettings(**settings, print_table=options.get("print_table", False))
    spy = SessionSpy()
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
        callbacks=[callback, spy] if server in ("callback", "both") else [spy],
        plugins=[TRTRuntimePrecision(**settings)] if server in ("plugin", "both") else None,
    )
    messages = Messages()
    logging.getLogger("lightning_trt_rtx").addHandler(messages)
    seen_error, predictions = None, None
    start = time.monotonic()
    try:
        predictions = trainer.predict(model, predict_loader(batches=6), return_predictions=True)
    except RankFailure as err:
        seen_error = {"same_object": err is error, "message": str(err)}
    except BaseException as err:  # noqa: BLE001 - reported to the test
        tb = traceback.format_exc()
        seen_error = {"same_object": False, "message": f"{type(err).__name__}: {err}", "tb": tb}
    seconds = time.monotonic() - start
    logging.getLogger("lightning_trt_rtx").removeHandler(messages)
    sessions = {id(s) for s in spy.sessions}
    session = spy.sessions[0] if spy.sessions else None
    run_cache = session.cache if session is not None else None
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "backend": trainer.strategy._process_group_backend,
        "steps": [
            {
                "handle_ids": [id(rs.runtime_cache) for rs in step],
                "handle_is_none": [rs.runtime_cache is None for rs in step],
                "cuda_graph_strategy": [rs.cuda_graph_strategy for rs in step],
            }
            for step in model.seen
        ],
        "sessions": len(sessions),  # one session served the whole run
        "run_handle_id": id(run_cache.handle) if run_cache is not None else None,
        "cache_path": run_cache.path if run_cache is not None else None,
        "cache_source": run_cache.stats.source if run_cache is not None else None,
        "saved": run_cache.stats.saved if run_cache is not None else None,
        "restored": all(a is b for a, b in zip([e.runtime_settings for e in model.engines()], prior)),
        "closed": session.closed if session is not None else None,
        "own_figures": figures_dict(session.figures) if session is not None else None,
        "figures": [figures_dict(f) for f in callback.figures],
        "error": seen_error,
        "predictions": len(predictions) if predictions is not None else None,
        "warnings": messages.warnings,
        "infos": messages.infos,
        "seconds": seconds,
    }
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    return seen_error is not None


def main(cases: list[dict]) -> None:
    failed = False
    for case in cases:
        case = dict(case)
        failed = run_case(case.pop("dir"), case.pop("mode", "ok"), case) or failed
        # the next Trainer joins this process group: Lightning launches rank 1 only once (it looks for LOCAL_RANK)
        os.environ.setdefault("LOCAL_RANK", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: after a peer died, torch's gloo process group can abort in its
    # destructor ("terminate called without an active exception"), which says nothing about this run
    os._exit(3 if failed else 0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
