"""Hyperparameter sweep of CoOp prompt learning on Ray Tune, tracked in MLflow (DVC stage `sweep`).

Every trial trains one CoOp context (dataset x shots x seed x prompt variant x lr/epochs/precision) on
cached CLIP features and logs to its own nested MLflow run. The search space comes from sweep.space in
the params file; word initialisations (ctx_init) fix n_ctx and rule out CSC, so no trial is spent on an
impossible or duplicate combination. Results: <sweep.results_dir>/trials.csv, summary.csv (mean +- std
over seeds, best configuration per dataset x shots chosen on validation accuracy), metrics/ (one file per dataset x shots) and
plots.csv.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import cli
from pipeline.params import ONLINE_VIEWS, SEARCHES, SWEEP_NAME, ParamsError

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger("stages.sweep")

EXIT_INTERRUPTED = 130  # as after Ctrl-C: the sweep saved its state; --resume continues it

EPILOG = """\
examples:
  python -m stages.sweep --dry-run                        # list the trials of params.yaml's grid
  python -m stages.sweep --search optuna --num-samples 8  # TPE over the same space
  python -m stages.sweep --address 10.0.0.1:6379 --tracking-uri http://10.0.0.1:5000
  python -m stages.sweep --name rn50-grid                 # a name of your own (a new one each time)
  python -m stages.sweep --resume                         # continue the latest interrupted sweep
  python -m pipeline.tools.sweeps                         # the sweeps so far: name, date, trials, state, best
(`python -m pipeline.sweep` and `coop-sweep` are the same command.)

exit status: 0 done (failed trials are listed in trials.csv), 2 bad configuration or unreachable cluster/tracking/features,
130 interrupted (resume with --resume).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m stages.sweep", __doc__, EPILOG)
    parser.add_argument(
        "--search", choices=SEARCHES,
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
    parser.add_argument(
        "--name", metavar="NAME",
        help="a name for this sweep: letters, digits, '.', '_', '-' (its folder under sweep.storage and its MLflow "
        "parent run; `python -m pipeline.tools.sweeps` lists them); a name already used needs --resume NAME "
        "(default: sweep.name, else <search>-<timestamp>)",
    )
    asha = parser.add_mutually_exclusive_group()
    asha.add_argument("--asha", dest="asha", action="store_true", default=None,
                      help="early-stop weak trials with ASHA on val_acc (needs train.eval_every > 0) (default: sweep.asha)")
    asha.add_argument("--no-asha", dest="asha", action="store_false", help="run every trial to its last epoch")
    parser.add_argument(
        "--bundle-size", type=_bundle_size, metavar="B|auto",
        help="CoOp configurations one trial trains together in one fused step, each with its own MLflow run and "
        "its own ASHA decisions (1: no bundles; auto: 1 on CPUs, by class count on GPUs) (default: "
        "sweep.bundle_size)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the trials the sweep would run (optuna: the configurations it may choose from), their "
        "count and cost (GPU-hours on an assumed H100 when sweep.gpus_per_trial > 0, else CPU core-hours at "
        "sweep.cpus_per_trial), then exit; starts nothing",
    )
    console = parser.add_mutually_exclusive_group()
    console.add_argument("--quiet", action="store_true",
                         help="no progress line or end table, warnings only (overrides --log-level)")
    console.add_argument("--ray-tables", action="store_true",
                         help="also print Ray Tune's own tables (each trial's config and result, status every 30 s) "
                         "besides the progress line")
    return parser


def _bundle_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


def with_flags(params: Params, args: argparse.Namespace) -> Params:
    """params with sweep.* replaced by the flags given on the command line (checked like params.yaml)."""
    from pipeline.params import override

    return override(params, sweep={"search": args.search, "num_samples": args.num_samples,
                                   "max_concurrent": args.max_concurrent, "address": args.address,
                                   "name": args.name, "asha": args.asha, "bundle_size": args.bundle_size})


def _terminate_like_interrupt(signum: int, frame: object) -> None:
    # Ray Tune saves its state and stops gracefully on SIGUSR1 (as on Ctrl-C); make SIGTERM do the same.
    os.kill(os.getpid(), signal.SIGUSR1)


def dry_run(params: Params) -> None:
    """Print the planned trials, the bundles sweep.bundle_size forms of them, and their cost on the resources the
    params ask for (GPU-hours or CPU core-hours; with bundles, also without them); start nothing."""
    from pipeline.sweep.estimate import estimate_sweep, sweep_trials
    from pipeline.sweep.plan import plan_sweep

    plan = plan_sweep(params)
    print(plan.describe())
    configs = plan.configs[: plan.num_samples] if plan.search == "optuna" else plan.configs
    trials = sweep_trials(params, configs)  # class counts from the split files or CoOp's statistics: no features read
    estimate = estimate_sweep(params, trials)
    bundled = len(trials) < len(configs)
    if bundled:
        print(f"sweep.bundle_size {params.sweep.bundle_size}: {estimate.count()}, each configuration with its own "
              "MLflow run")
    print(estimate.summary())
    if bundled:
        print(f"without bundles (--bundle-size 1): {estimate_sweep(params, configs).brief()}")
    if params.features.views == ONLINE_VIEWS:
        print(f"features.views = online: every trial crops and encodes its training images every epoch, "
              f"reading them from data.root ({params.data.root}), which every Ray worker must see.")


def params_file(args: argparse.Namespace) -> str:
    """The params file this command read (as pipeline.cli chooses it), for messages about its keys."""
    if args.params is not None:
        return str(args.params)
    return cli.DEFAULT_PARAMS if Path(cli.DEFAULT_PARAMS).is_file() else "the default params"


def run(args: argparse.Namespace, params: Params | None) -> int:
    assert params is not None
    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    params = with_flags(params, args)
    if args.resume not in (None, "latest") and not SWEEP_NAME.fullmatch(args.resume):
        raise ParamsError(f"--resume {args.resume!r} is not a sweep name (letters, digits, '.', '_', '-'); "
                          "`python -m pipeline.tools.sweeps` lists the sweeps")
    if args.num_samples is not None and params.sweep.search == "grid" and not args.resume:
        log.info("grid runs every distinct configuration once; --num-samples is ignored")
    from pipeline.sweep.space import SpaceError

    try:
        if args.dry_run:
            dry_run(params)
            return 0
        from pipeline.sweep.tuner import SweepOptions, run_sweep

        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGTERM, _terminate_like_interrupt)
        outcome = run_sweep(params, SweepOptions(resume=args.resume, tracking_uri=args.tracking_uri,
                                                 verbose=0 if args.quiet else 2 if args.ray_tables else 1))
    except SpaceError as error:  # sweep.space is checked only here, long after the params file was read: name it
        raise SpaceError(f"{params_file(args)}: {error}") from None
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    if outcome.counts.get("failed"):
        log.warning("%d trial(s) FAILED; their reasons are in trials.csv and MLflow (tag sweep.failure_reason)",
                    outcome.counts["failed"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
