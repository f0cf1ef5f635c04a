"""DVC stage `sweep`: run the hyperparameter sweep of params.yaml (sweep.search, sweep.space, ...).

A thin wrapper around `pipeline.sweep`: the same code as ``python -m pipeline.sweep --config PARAMS``, with
every choice taken from the params file. Writes <sweep.results_dir>/trials.csv, summary.csv, metrics.json
and plots.csv; trials are tracked in MLflow (tracking.uri, or MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.sweep.__main__ import main as sweep_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="list the trials the stage would run, then exit")
    args = parser.parse_args(argv)
    return sweep_main(["--config", args.params, *(["--dry-run"] if args.dry_run else [])])


if __name__ == "__main__":
    sys.exit(main())
