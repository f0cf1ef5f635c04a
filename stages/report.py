"""DVC stage `report`: write the HTML report (report.dir/index.html) from the sweep and baselines results.

A thin wrapper around `pipeline.report` (console script ``coop-report``) with every setting from the
params file; the page is also logged to MLflow as the artifact of a "report" run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.report import main as report_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the page to MLflow")
    args = parser.parse_args(argv)
    return report_main(["--params", args.params, *(["--no-mlflow"] if args.no_mlflow else [])])


if __name__ == "__main__":
    sys.exit(main())
