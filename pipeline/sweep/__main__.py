"""Command line of the sweep (`python -m pipeline.sweep`, console script `coop-sweep`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from pipeline.costmodel import estimate_gpu_hours
from pipeline.params import ParamsError, load_params

log = logging.getLogger("pipeline.sweep")

DESCRIPTION = """\
Hyperparameter sweep of CoOp prompt learning on Ray Tune, tracked in MLflow.

Every trial trains one CoOp context (dataset x shots x seed x prompt variant x lr/epochs/precision) on
cached CLIP features and logs to its own nested MLflow run. The search space comes from sweep.space in
the params file; word initialisations (ctx_init) fix n_ctx and rule out CSC, so no trial is spent on an
impossible or duplicate combination. Results: <sweep.results_dir>/trials.csv, summary.csv (mean +- std
over seeds, best configuration per dataset x shots chosen on validation accuracy), metrics.json and
plots.csv.
"""

EPILOG = """\
examples:
  python -m pipeline.sweep --dry-run                        # list the trials of params.yaml's grid
  python -m pipeline.sweep --search optuna --num-samples 8  # TPE over the same space
  python -m pipeline.sweep --address 10.0.0.1:6379 --tracking-uri http://10.0.0.1:5000
  python -m pipeline.sweep --resume                         # continue the latest interrupted sweep

exit status: 0 done (failed trials are listed in trials.csv), 2 bad configuration or unreachable cluster/tracking/features,
130 interrupted (resume with --resume).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default="params.yaml", metavar="PATH",
        help="params file with the data, backbone, features, train, sweep and tracking sections (default: %(default)s)",
    )
    parser.add_argument(
        "--search", choices=("grid", "random", "optuna"),
        help="grid: every distinct valid combination once; random: a seeded draw of --num-samples distinct "
        "combinations; optuna: TPE (seeded by sweep.optuna_seed) over the conditional space, --num-samples trials "
        "(default: sweep.search)",
    )
    parser.add_argument(
        "--num-samples", type=int, metavar="N",
        help="trials for random/optuna, capped at the number of distinct valid combinations; ignored by grid "
        "(default: sweep.num_samples)",
    )
    parser.add_argument(
        "--max-concurrent", type=int, metavar="N",
        help="trials running at the same time; each also takes sweep.cpus_per_trial CPUs and sweep.gpus_per_trial "
        "GPUs (fractions share a GPU) (default: sweep.max_concurrent)",
    )
    parser.add_argument(
        "--address", metavar="HOST:PORT",
        help="address of a running Ray cluster (`ray start --head` prints it; 'auto' finds one on this machine); "
        "an address that does not answer fails within seconds (default: sweep.address, else RAY_ADDRESS, else a "
        "new local Ray instance)",
    )
    parser.add_argument(
        "--resume", nargs="?", const="latest", metavar="NAME",
        help="continue an interrupted sweep (the latest one under sweep.storage, or the one named NAME): only "
        "unfinished trials run, trials already FINISHED in MLflow are not retrained and get no second run",
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow tracking URI, e.g. http://host:5000 or sqlite:///mlflow.db (relative SQLite paths are made "
        "absolute) (default: MLFLOW_TRACKING_URI, else tracking.uri)",
    )
    parser.add_argument("--name", help="Ray Tune experiment name (default: sweep.name, else <search>-<timestamp>)")
    asha = parser.add_mutually_exclusive_group()
    asha.add_argument("--asha", dest="asha", action="store_true", default=None,
                      help="early-stop weak trials with ASHA on val_acc (needs train.eval_every > 0) (default: sweep.asha)")
    asha.add_argument("--no-asha", dest="asha", action="store_false", help="run every trial to its last epoch")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the trials the sweep would run (optuna: the configurations it may choose from) and their "
        "count, then exit; starts nothing",
    )
    parser.add_argument("--quiet", action="store_true", help="no Ray Tune progress table, warnings only")
    return parser


def _quiet_root_info(record: logging.LogRecord) -> bool:
    # open_clip logs its model-loading chatter at INFO on the root logger itself.
    return record.name != "root" or record.levelno >= logging.WARNING


def _terminate_like_interrupt(signum: int, frame: object) -> None:
    # Ray Tune saves its state and stops gracefully on SIGUSR1 (as on Ctrl-C); make SIGTERM do the same.
    os.kill(os.getpid(), signal.SIGUSR1)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_root_info)
    from pipeline.sweep.inputs import MissingInputsError
    from pipeline.sweep.runner import SweepError, SweepOptions, plan_sweep, run_sweep
    from pipeline.sweep.space import SpaceError

    options = SweepOptions(
        search=args.search, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        address=args.address, resume=args.resume, tracking_uri=args.tracking_uri, name=args.name,
        asha=args.asha, dry_run=args.dry_run, verbose=0 if args.quiet else 1,
    )
    try:
        params = load_params(args.config)
        if args.dry_run:
            plan = plan_sweep(params, options)
            print(plan.describe())
            configs = plan.configs[: plan.num_samples] if plan.search == "optuna" else plan.configs
            print(estimate_gpu_hours(params, configs).summary())
            if params.features.views == "online":
                print(f"features.views = online: every trial crops and encodes its training images every epoch, "
                      f"reading them from data.root ({params.data.root}), which every Ray worker must see.")
            return 0
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGTERM, _terminate_like_interrupt)
        outcome = run_sweep(params, options)
    except (ParamsError, SpaceError, SweepError) as error:
        log.error("%s", error)
        return 2
    except MissingInputsError as error:
        log.error("%s", error)
        return 2
    if outcome.interrupted:
        return 130
    if outcome.counts.get("failed"):
        log.warning("%d trial(s) FAILED; their reasons are in trials.csv and MLflow (tag sweep.failure_reason)",
                    outcome.counts["failed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
