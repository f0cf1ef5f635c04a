"""DVC stage `report` (console script ``coop-report``): one self-contained HTML page from the results.

Reads ``<sweep.results_dir>/trials.csv`` (FINISHED trials; learned contexts' nearest words from each
trial's artifacts) and ``transfer.csv`` (cross-dataset trials on their targets), ``baselines.csv`` and ``domain_shift.csv`` (in ``report.baselines_dir``) and the
published numbers (``pipeline/data/published.json``), and writes ``<report.dir>/index.html`` atomically.
Figures are inline PNGs (base64 ``data:`` URIs): the page needs no other file. Sections:

1. test accuracy per dataset as the papers print it (rows: zero-shot CLIP, prompt ensemble, linear probe per
   protocol, CoOp variants and the best configuration by val; columns: datasets and their average), the
   largest shot count first, each number mean ± std over seeds with the 95% CI of CoOp's
   ``parse_test_res.py --ci95`` (1.96 x population std / sqrt(seeds)); the configuration selected per dataset x
   shots; accuracy against shots per dataset (and averaged, with several), the paper's main figure;
2. our 16-shot CoOp (M=16, end, unified) and zero-shot results next to the published ones; when the sweep
   has such trials, base-to-new generalisation (Base, New and H per method and dataset, the configuration
   selected on the base classes' val accuracy) and cross-dataset transfer (source and targets), each beside
   the published CoCoOp/KgCoOp tables (ViT-B/16: reference points, not comparable numbers);
3. domain generalisation: the source's contexts (domain_shift.source, e.g. ImageNet) on its shifted test
   sets (e.g. ImageNet-V2/-Sketch/-A/-R), beside zero-shot CLIP; without results, what is missing;
4. the nearest vocabulary words of each dataset's best learned context by val, and of its best unified one
   when the best is class-specific;
5. the sweep's view: matched comparisons (trials differing in one hyperparameter only, same dataset, shots
   and seed) per shot count, and parameter importances (fANOVA over an Optuna study rebuilt from the grid or
   random-search trials of trials.csv; not from TPE trials, which do not cover the space).

Selection: per dataset x shots, the configuration with the best validation accuracy averaged over seeds
(among those finished on the most seeds), over all configurations and, for each CoOp variant row, among that
variant's (e.g. over lr); test accuracy never selects anything. A section without data says so in one line.
The page is also logged to MLflow as the artifact of a "report" run.
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
    parser = cli.parser("python -m stages.report", __doc__)
    parser.add_argument("--out", type=Path, metavar="DIR", help="folder for index.html (default: report.dir)")
    parser.add_argument("--results-dir", type=Path, metavar="DIR",
                        help="the sweep's results folder (default: sweep.results_dir)")
    parser.add_argument("--baselines-dir", type=Path, metavar="DIR",
                        help="folder with baselines.csv and domain_shift.csv (default: report.baselines_dir)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI, for the trials' artifacts and the report run (default: "
                        "MLFLOW_TRACKING_URI, else tracking.uri)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the page to MLflow")
    return parser


def with_flags(params: Params, args: argparse.Namespace) -> Params:
    """params with the folders given on the command line: report.dir, report.baselines_dir, sweep.results_dir."""
    from pipeline.params import override

    return override(params, report={"dir": args.out, "baselines_dir": args.baselines_dir},
                    sweep={"results_dir": args.results_dir})


def run(args: argparse.Namespace, params: Params) -> None:
    from pipeline.report import write_report

    write_report(with_flags(params, args), args.tracking_uri, mlflow=not args.no_mlflow)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
