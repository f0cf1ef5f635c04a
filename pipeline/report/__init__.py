"""The report stage's library: one self-contained HTML page from the sweep's, baselines' and domain-shift results."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.atomic import write_text_atomic
from pipeline.params import Params
from pipeline.report.collect import collect
from pipeline.report.html import render

log = logging.getLogger(__name__)


def write_report(params: Params, tracking_uri: str | None = None, mlflow: bool = True) -> Path:
    """Build the page and write ``<report.dir>/index.html`` atomically; log it to MLflow unless `mlflow` is off.

    `tracking_uri` (else MLFLOW_TRACKING_URI, else tracking.uri) is where trials' artifacts and the run are.
    """
    data = collect(params, tracking_uri)
    page = render(data)
    path = Path(params.report.dir) / "index.html"
    run = None
    if mlflow:
        from pipeline.tracking import StageRun

        # Opened before the page is written: a store that cannot take the run (another project's mlflow.db,
        # an unreachable server) stops the stage with nothing written.
        run = StageRun.start(params, "report", "report", {"results_dir": str(data.results_dir),
                                                          "baselines_dir": str(data.baselines_dir),
                                                          "trials": len(data.trial_rows)}, tracking_uri)
    try:
        write_text_atomic(path, page)
    except BaseException:
        if run is not None:
            run.finish("FAILED")
        raise
    log.info("report: %s (%d KiB, %d finished trials)", path, len(page) // 1024, len(data.finished_trials))
    if run is not None:
        run.finish("FINISHED", [path], {"finished_trials": len(data.finished_trials)})
    return path
