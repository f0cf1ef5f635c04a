"""CoOp's test accuracy with the official online augmentation against V = 1, 4 and 16 cached views, on the demo.

What docs/fidelity.md reports for the cached-views deviation: the shipped world CLIP (params.yaml's backbone),
the demo's trainable world tasks at 16 shots, seeds 1-3, CoOp's paper default (M=16, unified, end) with the
demo's train.* settings. Every mode trains on the same split files; only how training images are augmented
differs (online: a fresh random-resized crop + flip of every image every epoch; V views: V such crops cached
per image, one drawn per epoch; V=1: the test transform, no augmentation).

    python bench/augmentation.py [--params params.yaml] [--shots 16] [--seeds 1 2 3] [--tasks ...]
        [--out bench/results/augmentation.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.atomic import write_text_atomic
from pipeline.data.datasets import load_dataset
from pipeline.data.fewshot import split_path, write_dataset_splits
from pipeline.data.synthetic.tasks import get_task, write_world
from pipeline.engine.backbone import load_backbone
from pipeline.engine.prompt import PromptConfig
from pipeline.engine.train import default_epochs, train_coop
from pipeline.features.assemble import load_fewshot_features
from pipeline.features.build import build_dataset_features
from pipeline.features.cache import FeatureConfig
from pipeline.params import load_params, override
from pipeline.sweep.trial import train_config

log = logging.getLogger("bench.augmentation")
MODES: tuple[int | str, ...] = ("online", 1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tasks", nargs="+", help="world tasks (default: the trainable ones in data.datasets)")
    parser.add_argument("--out", default="bench/results/augmentation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)

    params = load_params(args.params)
    backbone = load_backbone(params.backbone.arch, params.backbone.pretrained)
    tasks = args.tasks or [d for d in params.data.datasets if not get_task(d).test_only]
    prompt = PromptConfig(n_ctx=16, ctx_init="", csc=False, class_token_position="end")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(root / "data", [get_task(name) for name in tasks])
        for name in tasks:
            write_dataset_splits(load_dataset(name, root / "data"), root / "splits", [args.shots], args.seeds,
                                 params.data.fewshot_repeat)
        for mode in MODES:
            features = override(params, features={"views": mode}).features
            config = FeatureConfig.from_params(backbone, features)
            for name in tasks:
                cache = root / f"cache-{mode}"
                build_dataset_features(cache, root / "data", root / "splits", name, [args.shots], args.seeds,
                                       backbone, views=mode, progress=False,
                                       views_per_seed=features.views_per_seed, augment_seed=features.seed)
                for seed in args.seeds:
                    data = load_fewshot_features(cache, split_path(root / "splits", name, args.shots, seed), config,
                                                 data_root=root / "data")
                    cfg = train_config(params.train, {"lr": params.train.lr, "epochs": default_epochs(name, args.shots),
                                                      "precision": "fp32", "seed": seed})
                    start = time.perf_counter()
                    result = train_coop(backbone, data, prompt, cfg, progress=False)
                    rows.append({"views": mode, "dataset": name, "seed": seed, "test_acc": result.test_acc,
                                 "seconds": round(time.perf_counter() - start, 1)})
                    log.info("%s views=%s seed %d: %.2f%% (%.0f s)", name, mode, seed, result.test_acc,
                             rows[-1]["seconds"])
    table = summarize(rows, tasks)
    print(table)
    write_text_atomic(Path(args.out), json.dumps({"params": args.params, "shots": args.shots, "seeds": args.seeds,
                                                  "rows": rows, "table": table}, indent=1) + "\n")


def summarize(rows: list[dict], tasks: list[str]) -> str:
    """A markdown table: mean ± std over seeds per task and mode, the tasks' average, and seconds per trial."""
    lines = ["| views | " + " | ".join(tasks) + " | average | s / trial |", "|---" * (len(tasks) + 3) + "|"]
    for mode in MODES:
        cells, means = [], []
        for name in tasks:
            accs = [r["test_acc"] for r in rows if r["views"] == mode and r["dataset"] == name]
            means.append(statistics.mean(accs))
            cells.append(f"{means[-1]:.1f} ± {statistics.stdev(accs) if len(accs) > 1 else 0.0:.1f}")
        seconds = statistics.mean(r["seconds"] for r in rows if r["views"] == mode)
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {statistics.mean(means):.1f} | {seconds:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
