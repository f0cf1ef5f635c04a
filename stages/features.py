"""DVC stage `features`: encode the images of a dataset's few-shot splits and test list into the feature cache.

Reads the files written by `stages.prepare` (``<splits dir>/<Dataset>/shot<K>_seed<S>.json`` for the given
shots x seeds, plus ``test.json``) and brings ``<out>/<Dataset>/<arch>__<pretrained>/`` up to date: train
images in --views augmented views (per split seed unless --no-views-per-seed), and val/test/train images in
one test-transform view. With ``--views online`` no train views are cached: training crops the images
afresh every epoch. Only images missing from a valid cache are encoded, so a rerun with unchanged inputs
encodes nothing; a cache built with another backbone, transform, views or dtype is rebuilt. (Declare the
cache folder ``persist: true`` in dvc.yaml so DVC does not delete it before a rerun.)

Settings come from CLI flags, else from --params (params.yaml), else defaults. Keys read from params:
``data.root``, ``data.datasets``, ``data.splits_dir``, ``data.shots``, ``data.seeds``,
``backbone.arch``, ``backbone.pretrained``, ``features.dir``, ``features.views``, ``features.views_per_seed``,
``features.dtype``, ``features.seed``, ``features.batch_size``, ``train.device`` (``auto`` = cuda when available).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.datasets import DatasetError, resolve_name
from pipeline.engine.backbone import WeightsUnavailableError, load_backbone, resolve_device
from pipeline.features import (
    DTYPE_ALIASES,
    DTYPES,
    ONLINE,
    FeatureCacheError,
    build_dataset_features,
    canonical_dtype,
    check_views,
)
from stages.prepare import (
    DEFAULT_SEEDS,
    DEFAULT_SHOTS,
    DEFAULT_SPLITS_DIR,
    as_int_list,
    as_str_list,
    pick,
    read_params,
    setup_logging,
)

log = logging.getLogger("stages.features")

DEFAULT_CACHE_DIR = "outputs/features"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stages.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        action="append",
        help="dataset to encode (as given to stages.prepare); repeatable (params: data.datasets)",
    )
    parser.add_argument("--params", type=Path, help="params.yaml to read settings from (flags override it)")
    parser.add_argument(
        "--data-root", type=Path, help="folder holding the dataset folders (params: data.root)"
    )
    parser.add_argument(
        "--splits-dir",
        type=Path,
        help=f"folder written by stages.prepare (params: data.splits_dir; default {DEFAULT_SPLITS_DIR})",
    )
    parser.add_argument(
        "--shots",
        type=int,
        nargs="+",
        help=f"which split files to cover (params: data.shots; default {DEFAULT_SHOTS})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help=f"which split files to cover (params: data.seeds; default {DEFAULT_SEEDS})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"feature cache root (params: features.dir; default {DEFAULT_CACHE_DIR})",
    )
    parser.add_argument(
        "--arch", help="open_clip architecture, e.g. RN50, ViT-B-16, coop-tiny (params: backbone.arch)"
    )
    parser.add_argument(
        "--pretrained",
        help="open_clip weights tag (e.g. openai), a local checkpoint file, or 'none' for random weights "
        "(params: backbone.pretrained)",
    )
    parser.add_argument(
        "--views",
        type=_views,
        help=f"augmented views cached per train image; 1 = test transform only; '{ONLINE}' = none, training "
        "crops the images every epoch (params: features.views; default 1)",
    )
    parser.add_argument(
        "--views-per-seed",
        action=argparse.BooleanOptionalAction,
        help="key cached train views by image and split seed, so seeds see different views "
        "(params: features.views_per_seed; default on)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted([*DTYPES, *DTYPE_ALIASES]),
        help="storage dtype of cached features (params: features.dtype; default fp16)",
    )
    parser.add_argument(
        "--augment-seed",
        type=int,
        help="base seed of the per-view augmentation (params: features.seed; default 0)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per encoder batch (params: features.batch_size; default 64)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        help="image-decoding worker processes, 0 = in process (default 0)",
    )
    parser.add_argument(
        "--device",
        help="torch device for the encoder: auto, cpu, cuda, cuda:N (params: train.device; default auto)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _views(text: str) -> int | str:
    """--views: a positive number of views, or 'online'."""
    if text == ONLINE:
        return ONLINE
    try:
        views = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or {ONLINE!r}, got {text!r}") from None
    if views < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or {ONLINE!r}, got {views}")
    return views


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        params = read_params(args.params)
        datasets = as_str_list(pick(args.dataset, params, "data.datasets"), "datasets")
        data_root = pick(args.data_root, params, "data.root")
        arch = pick(args.arch, params, "backbone.arch")
        if data_root is None or arch is None:
            raise ValueError(
                "Need a data root and a backbone: pass --data-root and --arch (or set data.root, backbone.arch)."
            )
        pretrained = pick(args.pretrained, params, "backbone.pretrained")
        views = pick(args.views, params, "features.views", 1)
        check_views(views)
        dtype = canonical_dtype(str(pick(args.dtype, params, "features.dtype", "fp16")))
        device = resolve_device(str(pick(args.device, params, "train.device", "auto")))
        backbone = load_backbone(str(arch), pretrained, device=device)
        for dataset in datasets:
            info = resolve_name(dataset)
            build_dataset_features(
                cache_root=Path(pick(args.out, params, "features.dir", DEFAULT_CACHE_DIR)),
                data_root=Path(data_root),
                splits_dir=Path(pick(args.splits_dir, params, "data.splits_dir", DEFAULT_SPLITS_DIR)),
                dataset=info.name if info else dataset,
                shots=as_int_list(pick(args.shots, params, "data.shots", DEFAULT_SHOTS), "shots"),
                seeds=as_int_list(pick(args.seeds, params, "data.seeds", DEFAULT_SEEDS), "seeds"),
                backbone=backbone,
                views=views,
                views_per_seed=bool(pick(args.views_per_seed, params, "features.views_per_seed", True)),
                dtype=dtype,
                augment_seed=int(pick(args.augment_seed, params, "features.seed", 0)),
                batch_size=int(pick(args.batch_size, params, "features.batch_size", 64)),
                num_workers=int(args.num_workers or 0),
                progress=not args.no_progress,
            )
    except (DatasetError, FeatureCacheError, WeightsUnavailableError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
