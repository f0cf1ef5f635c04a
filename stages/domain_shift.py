"""Prompts learned on a source dataset (CoOp, CoCoOp, KgCoOp), evaluated on its shifted sets (DVC stage `domain_shift`).

The source is domain_shift.source (default ImageNet), the shifted sets those of domain_shift.targets (default
ImageNet-V2, -Sketch, -A and -R) that data.datasets lists. For every FINISHED source trial of the sweep at
the largest shot count (or --shots) that learned all its classes (protocol fewshot or xd, not base2new), its
learned model on the source's test set and on each shifted set, beside zero-shot CLIP (hand-crafted prompt
and prompt ensemble) on each. Rows go to
<report.baselines_dir>/domain_shift.csv (empty when data.datasets has no source, as in the demo); one
MLflow run "domain-shift" with the CSV and per-target means.
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
    parser = cli.parser("python -m stages.domain_shift", __doc__, cli.WITH_DEVICE_NOTE)
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for domain_shift.csv (default: report.baselines_dir)")
    parser.add_argument("--shots", type=int,
                        help="evaluate the source's contexts trained with this many shots (default: the "
                        "largest)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI holding the sweep's runs (default: MLFLOW_TRACKING_URI, "
                        "else tracking.uri)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cli.add_device(parser, "the frozen CLIP")
    return parser


def run(args: argparse.Namespace, params: Params) -> None:
    from pipeline.evaluate.domain_shift import run_domain_shift

    params = cli.with_device(params, args.device)
    run_domain_shift(params, args.out or Path(params.report.baselines_dir), args.shots, args.tracking_uri,
                     progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
