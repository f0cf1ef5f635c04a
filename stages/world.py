"""DVC stage `world`: write the generated world's few-shot tasks and shifted test sets as dataset folders.

Renders every task of pipeline/data/synthetic/tasks.py (or those named with --task) into
``<out>/<Task>/images/...`` + ``<out>/<Task>/split_<Task>.json``, the layout the generic dataset reader takes:
point data.root at <out> and list the tasks in data.datasets. The files depend on --seed and the code alone
(the same seed writes the same images), so the folder is a DVC output, not committed.
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

DEFAULT_OUT = Path("data/world")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m stages.world", __doc__, params=False)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help="data root to write the task folders into (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of every image (default: tasks.WORLD_SEED, what data/world is built with)")
    parser.add_argument("--task", action="append", metavar="NAME",
                        help="write only this task (repeatable; default: all of them)")
    return parser


def run(args: argparse.Namespace, params: Params | None) -> None:
    from pipeline.data.synthetic.tasks import TASKS, WORLD_SEED, get_task, write_world

    tasks = [get_task(name) for name in args.task] if args.task else list(TASKS)
    write_world(args.out, tasks, WORLD_SEED if args.seed is None else args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
