"""DVC stage `prepare`: read a dataset and write its official CoOp few-shot splits and test list as JSON.

Writes, per dataset, ``<out>/<Dataset>/shot<K>_seed<S>.json`` for every K in --shots and S in --seeds
(``shotall`` for K < 1) and ``<out>/<Dataset>/test.json``. <Dataset> is the canonical registry name
(e.g. ``--dataset Flowers102`` writes ``OxfordFlowers/``); a generic dataset keeps its folder name.
Test-only datasets (ImageNetV2/Sketch/A/R) get only ``test.json``.

Settings come from --params (params.yaml); a flag overrides its key: ``data.datasets``, ``data.root``,
``data.splits_dir``, ``data.shots``, ``data.seeds``, ``data.fewshot_repeat``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import cli

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger("stages.prepare")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m stages.prepare", __doc__)
    parser.add_argument(
        "--dataset",
        action="append",
        help="dataset to prepare, registry name (e.g. OxfordPets, ImageNet, FashionMNIST) or a folder name under "
        "the data root holding split_*.json; repeatable (params: data.datasets)",
    )
    parser.add_argument("--data-root", help="folder holding the dataset folders (params: data.root)")
    parser.add_argument("--out", help="splits folder to write into (params: data.splits_dir)")
    parser.add_argument(
        "--shots", type=int, nargs="+", help="shots per class K; K < 1 = all images (params: data.shots)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", help="random seeds of the draws (params: data.seeds)")
    parser.add_argument(
        "--no-check-files",
        action="store_true",
        help="skip checking that every listed image exists (faster on huge datasets whose images are known present)",
    )
    parser.add_argument(
        "--repeat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw classes with fewer than K images with replacement up to K, as Dassl did before October 2021 "
        "(params: data.fewshot_repeat; false: keep all their images, today's Dassl rule)",
    )
    return parser


def with_flags(params: Params, args: argparse.Namespace) -> Params:
    """`params` with the `data` keys given as flags replaced by the flags' values (checked like params.yaml)."""
    from pipeline.params import override

    return override(params, data={"datasets": args.dataset, "root": args.data_root, "splits_dir": args.out,
                                  "shots": args.shots, "seeds": args.seeds, "fewshot_repeat": args.repeat})


def run(args: argparse.Namespace, params: Params) -> None:
    """Write the split files and test list of every dataset."""
    from pathlib import Path

    from pipeline.data.datasets import load_dataset
    from pipeline.data.fewshot import eval_list_path, write_dataset_splits

    data = with_flags(params, args).data
    out = Path(data.splits_dir)
    for dataset in data.datasets:
        splits = load_dataset(dataset, Path(data.root), check_files=not args.no_check_files)
        written = write_dataset_splits(splits, out, data.shots, data.seeds, data.fewshot_repeat)
        if splits.test_only:
            log.info("%s is test-only: wrote only %s", splits.name, eval_list_path(out, splits.name))
        for k, seed, split in written:
            log.info("%s: %d-shot seed %d -> %d train / %d val images", splits.name, k, seed,
                     len(split.train), len(split.val))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
