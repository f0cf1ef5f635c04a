"""Zero-shot CLIP and the linear probe on the cached features, each an MLflow run (DVC stage `baselines`).

For every trainable dataset x shots x seed of the params file: zero-shot CLIP with the hand-crafted prompt
and with the prompt ensemble (once per dataset), and the linear probe once per protocol in
baselines.linear_probe_protocols (lpclip, the official one, and/or grid, ours). Rows go to
<report.baselines_dir>/baselines.csv; one parent MLflow run "baselines" with a child run per row.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import cli

if TYPE_CHECKING:
    from pipeline.params import Params


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m stages.baselines", __doc__, cli.WITH_DEVICE_NOTE)
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for baselines.csv (default: report.baselines_dir)")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="which baselines to run, of zero-shot, zero-shot-ensemble and linear-probe "
                        "(default: all three)")
    parser.add_argument("--probe-views", type=int, metavar="V",
                        help="cached views per training image the `grid` linear probe trains on (default: "
                        "all features.views; 1 keeps ImageNet-sized probes tractable on a CPU); lpclip uses "
                        "none")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else tracking.uri)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cli.add_device(parser, "the frozen CLIP")
    return parser


def run(args: argparse.Namespace, params: Params) -> None:
    from pipeline.evaluate.baselines import run_baselines
    from pipeline.evaluate.methods import METHODS

    params = cli.with_device(params, args.device)
    run_baselines(params, args.out or Path(params.report.baselines_dir), args.methods or METHODS, args.probe_views,
                  args.tracking_uri, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
