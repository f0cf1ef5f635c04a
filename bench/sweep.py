"""Benchmark the sweep's overhead per trial on the bundled demo: (sweep wall time - sum of trial training time) / trials.

Builds the demo's splits and feature cache in a work folder (the real prepare/features stages), runs the
sweep of the project's params.yaml there (paths redirected, tracking to a SQLite file in the folder) and
prints the figures. Wall time is measured twice: the whole `run_sweep` (params, feature loading, Ray
start, MLflow parent run, Tuner.fit, result tables) and `Tuner.fit` alone. Training time is each trial's
own `train_seconds` (the engine's timed loop), so the overhead covers worker start-up, backbone loading,
the object-store fetch, MLflow logging and artifacts, and Tune's scheduling.

    python bench/sweep.py                         # optuna, 8 trials, params.yaml's demo settings
    python bench/sweep.py --search grid --epochs 20
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # stages/ lives in the checkout

log = logging.getLogger("bench.sweep")


def prepare_workspace(params_file: Path, work: Path, epochs: int | None) -> Path:
    """params.yaml with every path inside `work`, and its splits + feature cache built there."""
    from stages.features import main as features_main
    from stages.prepare import main as prepare_main

    raw = yaml.safe_load(params_file.read_text()) or {}
    data = raw.setdefault("data", {})
    data["root"] = str((REPO / data.get("root", "data/demo")).resolve())
    data["splits_dir"] = str(work / "splits")
    raw.setdefault("features", {})["dir"] = str(work / "features")
    sweep = raw.setdefault("sweep", {})
    sweep.update(storage=str(work / "ray"), results_dir=str(work / "results"), name=None, address=None)
    raw.setdefault("tracking", {})["uri"] = f"sqlite:///{work}/mlflow.db"
    if epochs is not None:
        raw.setdefault("train", {})["epochs"] = epochs
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    start = time.perf_counter()
    for stage in (prepare_main, features_main):
        extra = ["--no-progress"] if stage is features_main else []
        if stage(["--params", str(path), *extra]) != 0:
            raise SystemExit(f"{stage.__module__} failed; see the log above")
    log.info("demo splits and features ready in %.1fs", time.perf_counter() - start)
    return path


def main() -> int:
    from pipeline.params import SEARCHES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file to sweep")
    parser.add_argument("--search", choices=SEARCHES, default="optuna")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--epochs", type=int, help="override train.epochs (default: the params file's)")
    parser.add_argument("--workdir", type=Path, help="keep the workspace here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    from pipeline.params import load_params
    from pipeline.sweep.tuner import SweepOptions, run_sweep

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        params_path = prepare_workspace(args.params, work, args.epochs)
        params = load_params(params_path)
        flags = {"search": args.search, "num_samples": args.num_samples, "max_concurrent": args.max_concurrent}
        params = replace(params, sweep=replace(params.sweep, **{k: v for k, v in flags.items() if v is not None}))
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        outcome = run_sweep(params, SweepOptions(verbose=0))
    records = outcome.records
    trained = [r for r in records if r.train_seconds is not None]
    n = len(records)
    train_sum = sum(r.train_seconds or 0.0 for r in trained)
    concurrency = params.sweep.max_concurrent
    print(f"machine: {os.cpu_count()} CPUs; search {args.search}, {n} trials "
          f"({outcome.counts.get('finished', 0)} finished), max {concurrency} concurrent, "
          f"{params.sweep.cpus_per_trial:g} CPU per trial")
    print(f"sweep wall time (run_sweep, incl. Ray start + features + MLflow): {outcome.wall_seconds:8.1f} s")
    print(f"Tuner.fit wall time:                                            {outcome.fit_seconds:8.1f} s")
    print(f"sum of the trials' training time:                               {train_sum:8.1f} s")
    print(f"overhead per trial = (sweep wall - sum training) / trials:      {(outcome.wall_seconds - train_sum) / n:8.2f} s")
    print(f"  same with Tuner.fit wall only:                                {(outcome.fit_seconds - train_sum) / n:8.2f} s")
    print(f"  per trial slot ({concurrency} concurrent: fit wall x {concurrency} - sum training) / trials: "
          f"{(outcome.fit_seconds * concurrency - train_sum) / n:8.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
