"""Two-process CPU DDP predict with TRTRuntimeSettings; Lightning launches rank 1 by re-running this script.

    python tests/procs/lightning_ddp.py OUT_DIR MODE      MODE: ok | fail_rank1 | fail_both

Each rank writes ``OUT_DIR/rank{r}.json``: what its engines held at every predict_step (handle ids,
strategies), the session's resolved cache path, the settings after the run, the gathered figures,
and the error it saw (if any). The kernel cache template is ``OUT_DIR/cache/rank{rank}.bin``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lightning.pytorch import Trainer  # noqa: E402

from lightning_trt_rtx import TRTRuntimeSettings  # noqa: E402
from lightning_trt_rtx.session import ServingSession  # noqa: E402
from tests.procs.lightning_models import EngineModel, predict_loader  # noqa: E402


class RankFailure(ValueError):
    pass


def main(out_dir: str, mode: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning for the process it launches
    fails = mode == "fail_both" or (mode == "fail_rank1" and rank == 1)
    error = RankFailure(f"rank {rank} fails in predict_step")
    model = EngineModel(fail_at=1 if fails else None, error=error)
    prior = [e.runtime_settings for e in model.engines()]
    callback = TRTRuntimeSettings(
        cuda_graph_strategy="whole_graph_capture",
        runtime_cache=os.path.join(out_dir, "cache", "rank{rank}.bin"),
        print_table=False,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
        callbacks=[callback],
    )
    seen_error, predictions = None, None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            predictions = trainer.predict(model, predict_loader(batches=6), return_predictions=True)
        except RankFailure as err:
            seen_error = {"same_object": err is error, "message": str(err)}
        except BaseException as err:  # noqa: BLE001 - reported to the test
            tb = traceback.format_exc()
            seen_error = {"same_object": False, "message": f"{type(err).__name__}: {err}", "tb": tb}
    session = ServingSession.of(model)
    shared = session.shared_cache
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
        "shared_handle_id": id(shared.handle) if shared is not None else None,
        "cache_path": shared.path if shared is not None else None,
        "cache_source": shared.stats.source if shared is not None else None,
        "saved": shared.stats.saved if shared is not None else None,
        "restored": all(a is b for a, b in zip([e.runtime_settings for e in model.engines()], prior)),
        "active": session.active,
        "figures": [vars(f) for f in callback.figures],
        "error": seen_error,
        "predictions": len(predictions) if predictions is not None else None,
        "warnings": [str(w.message) for w in record],
    }
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: after a peer died, torch's gloo process group can abort in its
    # destructor ("terminate called without an active exception"), which says nothing about this run
    os._exit(3 if seen_error is not None else 0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
