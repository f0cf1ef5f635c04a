"""Copy the learned contexts of finished trials from MLflow into ``<results_dir>/contexts/<trial_key>/``.

Trials upload their artifacts to the tracking server from whichever node they ran on; the driver brings
them together afterwards so the predict tool, the baselines and the report (and DVC, which tracks the
folder) find every context on local disk. Each trial's folder appears atomically (download into a temp
folder, then rename); folders of trials that are not in this sweep's table are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient
from tqdm import tqdm

from pipeline.sweep.results import TrialRecord

log = logging.getLogger(__name__)

ARTIFACTS = ("ctx.safetensors", "ctx.json", "nearest_words.json", "nearest_words.txt", "config.json")


def export_contexts(uri: str, records: Sequence[TrialRecord], folder: Path, progress: bool = True) -> int:
    """Download the artifacts of every FINISHED trial not yet exported; returns how many folders were written."""
    folder.mkdir(parents=True, exist_ok=True)
    keep = {r.trial_key for r in records if r.state == "FINISHED" and r.mlflow_run_id}
    for stale in folder.iterdir():
        if stale.is_dir() and stale.name not in keep:
            shutil.rmtree(stale, ignore_errors=True)
    todo = [r for r in records if r.trial_key in keep
            and not all((folder / r.trial_key / name).is_file() for name in ARTIFACTS)]
    if not todo:
        return 0
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per tiny file is noise
    client = MlflowClient(uri)
    written = 0
    for record in tqdm(todo, desc="contexts", disable=not progress or len(todo) < 10, leave=False):
        tmp = Path(tempfile.mkdtemp(prefix=f".{record.trial_key}.", dir=folder))
        try:
            for name in ARTIFACTS:
                client.download_artifacts(record.mlflow_run_id, name, str(tmp))
            target = folder / record.trial_key
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            written += 1
        except Exception as error:  # MLflow raises several types for a missing run or artifact
            log.warning("trial %s: could not fetch its context from MLflow run %s (%s)", record.trial_key,
                        record.mlflow_run_id, str(error)[:200])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return written
