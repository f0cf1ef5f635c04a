"""DVC stage `baselines`: zero-shot CLIP (hand-crafted prompt, prompt ensemble) and the linear probe (once per
protocol in baselines.linear_probe_protocols: lpclip, the official one, and/or grid, ours) on the cached
features of every dataset x shots x seed, each an MLflow run, all in baselines/baselines.csv beside
sweep.results_dir. A thin wrapper around `pipeline.baselines_run` with every setting from the params file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.baselines_run import main as baselines_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.baselines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--probe-views", type=int, metavar="V",
                        help="cached views per image for the `grid` linear probe (default: all features.views)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    extra = (["--probe-views", str(args.probe_views)] if args.probe_views else []) + (
        ["--no-progress"] if args.no_progress else [])
    return baselines_main(["--params", args.params, *extra])


if __name__ == "__main__":
    sys.exit(main())
