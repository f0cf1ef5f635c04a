"""DVC stage `prepare`: read a dataset and write its official CoOp few-shot splits and test list as JSON.

Writes, per dataset, ``<out>/<Dataset>/shot<K>_seed<S>.json`` for every K in --shots and S in --seeds
(``shotall`` for K < 1) and ``<out>/<Dataset>/test.json``. <Dataset> is the canonical registry name
(e.g. ``--dataset Flowers102`` writes ``OxfordFlowers/``); a generic dataset keeps its folder name.
Test-only datasets (ImageNetV2/Sketch/A/R) get only ``test.json``.

Settings come from CLI flags, else from --params (params.yaml), else defaults. Keys read from params:
``data.root``, ``data.datasets``, ``data.splits_dir``, ``data.shots``, ``data.seeds``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.datasets import DatasetError, load_dataset
from pipeline.data.fewshot import (
    eval_list_path,
    make_eval_list,
    make_fewshot_split,
    split_path,
    write_eval_list,
    write_fewshot_split,
)

log = logging.getLogger("stages.prepare")

DEFAULT_SPLITS_DIR = "outputs/splits"
DEFAULT_SHOTS = [1, 2, 4, 8, 16]
DEFAULT_SEEDS = [1, 2, 3]


def read_params(path: Path | None) -> dict[str, Any]:
    """params.yaml as a plain dict: the project's validated loader when available, else plain YAML."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Params file {path} does not exist; pass --params PATH or give every setting as a flag."
        )
    try:
        from pipeline.params import load_params  # the lead's validated loader, when present
    except ImportError:
        load_params = None
    if load_params is not None:
        params = load_params(path)
        if hasattr(params, "model_dump"):
            params = params.model_dump()
        elif hasattr(params, "to_dict"):
            params = params.to_dict()
        return dict(params)
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Params file {path} must hold a YAML mapping at the top level.")
    return data


def param(params: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """params['a']['b'] for 'a.b', or `default` when any level is missing."""
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def pick(cli_value: Any, params: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """CLI flag if given, else the params value, else the default."""
    return cli_value if cli_value is not None else param(params, dotted, default)


def as_int_list(value: Any, name: str) -> list[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of integers, got {value!r}.") from None


def as_str_list(value: Any, name: str) -> list[str]:
    if value is None:
        raise ValueError(
            f"No {name} given: pass --dataset NAME (repeatable) or set data.datasets in params.yaml."
        )
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        action="append",
        help="dataset to prepare, registry name (e.g. OxfordPets, ImageNet, FashionMNIST) or a folder name under "
        "the data root holding split_*.json; repeatable (params: data.datasets)",
    )
    parser.add_argument("--params", type=Path, help="params.yaml to read settings from (flags override it)")
    parser.add_argument(
        "--data-root", type=Path, help="folder holding the dataset folders (params: data.root)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"splits folder to write into (params: data.splits_dir; default {DEFAULT_SPLITS_DIR})",
    )
    parser.add_argument(
        "--shots",
        type=int,
        nargs="+",
        help=f"shots per class K; K < 1 = all images (params: data.shots; default {DEFAULT_SHOTS})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help=f"random seeds of the draws (params: data.seeds; default {DEFAULT_SEEDS})",
    )
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
        "(params: data.fewshot_repeat; default false: keep all their images, today's Dassl rule)",
    )
    return parser


def prepare(
    dataset: str,
    data_root: Path,
    out: Path,
    shots: Sequence[int],
    seeds: Sequence[int],
    check_files: bool = True,
    repeat: bool = False,
) -> list[Path]:
    """Write one dataset's few-shot split files and test list; returns the files written."""
    splits = load_dataset(dataset, data_root, check_files=check_files)
    written = [eval_list_path(out, splits.name)]
    write_eval_list(make_eval_list(splits), written[0])
    if splits.test_only:
        log.info("%s is test-only: wrote only %s", splits.name, written[0])
        return written
    for k in shots:
        for seed in seeds:
            split = make_fewshot_split(splits, k, seed, repeat)
            path = split_path(out, splits.name, k, seed)
            write_fewshot_split(split, path)
            written.append(path)
            log.info(
                "%s: %d-shot seed %d -> %d train / %d val images",
                splits.name,
                k,
                seed,
                len(split.train),
                len(split.val),
            )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        params = read_params(args.params)
        datasets = as_str_list(pick(args.dataset, params, "data.datasets"), "datasets")
        data_root = pick(args.data_root, params, "data.root")
        if data_root is None:
            raise ValueError("No data root given: pass --data-root DIR or set data.root in params.yaml.")
        out = Path(pick(args.out, params, "data.splits_dir", DEFAULT_SPLITS_DIR))
        shots = as_int_list(pick(args.shots, params, "data.shots", DEFAULT_SHOTS), "shots")
        seeds = as_int_list(pick(args.seeds, params, "data.seeds", DEFAULT_SEEDS), "seeds")
        repeat = pick(args.repeat, params, "data.fewshot_repeat", False)
        if not isinstance(repeat, bool):
            raise ValueError(f"data.fewshot_repeat must be true or false, got {repeat!r}.")
        for dataset in datasets:
            prepare(dataset, Path(data_root), out, shots, seeds, check_files=not args.no_check_files, repeat=repeat)
    except (DatasetError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
