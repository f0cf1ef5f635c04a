"""DVC stage `features`: encode the images of a dataset's few-shot splits and test list into the feature cache.

Reads the files written by `stages.prepare` (``<splits dir>/<Dataset>/shot<K>_seed<S>.json`` for the given
shots x seeds, plus ``test.json``) and brings ``<out>/<Dataset>/<arch>__<pretrained>/`` up to date: train
images in --views augmented views (per split seed unless --no-views-per-seed), and val/test/train images in
one test-transform view. With ``--views online`` no train views are cached: training crops the images
afresh every epoch. Only images missing from a valid cache are encoded, so a rerun with unchanged inputs
encodes nothing; a cache built with another backbone, transform, views or dtype is rebuilt. (Declare the
cache folder ``persist: true`` in dvc.yaml so DVC does not delete it before a rerun.)

Settings come from --params (params.yaml); a flag overrides its key: ``data.datasets``, ``data.root``,
``data.splits_dir``, ``data.shots``, ``data.seeds``, ``backbone.arch``, ``backbone.pretrained``,
``features.dir``, ``features.views``, ``features.views_per_seed``, ``features.dtype``, ``features.seed``,
``features.batch_size``, ``train.device``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import cli
from pipeline.params import ONLINE_VIEWS, ParamsError, check_views

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger("stages.features")


def _views(text: str) -> int | str:
    """--views: a positive number of views, or 'online' (the rule: params.check_views)."""
    try:
        views: int | str = int(text)
    except ValueError:
        views = text
    try:
        return check_views(views)
    except ParamsError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m stages.features", __doc__)
    parser.add_argument(
        "--dataset",
        action="append",
        help="dataset to encode (as given to stages.prepare); repeatable (params: data.datasets)",
    )
    parser.add_argument("--data-root", help="folder holding the dataset folders (params: data.root)")
    parser.add_argument("--splits-dir", help="folder written by stages.prepare (params: data.splits_dir)")
    parser.add_argument("--shots", type=int, nargs="+", help="which split files to cover (params: data.shots)")
    parser.add_argument("--seeds", type=int, nargs="+", help="which split files to cover (params: data.seeds)")
    parser.add_argument("--out", help="feature cache root (params: features.dir)")
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
        help=f"augmented views cached per train image; 1 = test transform only; '{ONLINE_VIEWS}' = none, training "
        "crops the images every epoch (params: features.views)",
    )
    parser.add_argument(
        "--views-per-seed",
        action=argparse.BooleanOptionalAction,
        help="key cached train views by image and split seed, so seeds see different views "
        "(params: features.views_per_seed)",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp16", "fp32"),
        help="storage dtype of cached features (params: features.dtype)",
    )
    parser.add_argument(
        "--augment-seed", type=int, help="base seed of the per-view augmentation (params: features.seed)"
    )
    parser.add_argument("--batch-size", type=int, help="images per encoder batch (params: features.batch_size)")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="image-decoding worker processes, 0 = in process (default 0)"
    )
    cli.add_device(parser, "the image encoder (when not given: train.device)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def with_flags(params: Params, args: argparse.Namespace) -> Params:
    """`params` with the keys given as flags replaced by the flags' values (checked like params.yaml)."""
    from pipeline.params import override

    return override(
        cli.with_device(params, args.device),
        data={"datasets": args.dataset, "root": args.data_root, "splits_dir": args.splits_dir, "shots": args.shots,
              "seeds": args.seeds},
        backbone={"arch": args.arch, "pretrained": args.pretrained},
        features={"dir": args.out, "views": args.views, "views_per_seed": args.views_per_seed, "dtype": args.dtype,
                  "seed": args.augment_seed, "batch_size": args.batch_size},
    )


def run(args: argparse.Namespace, params: Params) -> None:
    """Bring every dataset's feature cache up to date for its split files."""
    from pipeline.data.datasets import dataset_folder
    from pipeline.engine.backbone import load_backbone, resolve_device
    from pipeline.features.build import build_dataset_features

    params = with_flags(params, args)
    features = params.features
    backbone = load_backbone(params.backbone.arch, params.backbone.pretrained,
                             device=resolve_device(params.train.device))
    for dataset in params.data.datasets:
        build_dataset_features(
            cache_root=features.dir,
            data_root=params.data.root,
            splits_dir=params.data.splits_dir,
            dataset=dataset_folder(dataset),
            shots=params.data.shots,
            seeds=params.data.seeds,
            backbone=backbone,
            views=features.views,
            views_per_seed=features.views_per_seed,
            dtype=features.dtype,
            augment_seed=features.seed,
            batch_size=features.batch_size,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
