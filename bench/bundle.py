"""Fused trial bundles: configurations·steps per second of B CoOp configurations bundled against one at a time.

Bundled: one `BundleStep` trains B configurations in one batched text pass (engine/bundle.py). One at a time:
the same B configurations, each its own `TrainStep` (CUDA-graphed on a GPU, as trials run), called in turn.
Both on cached image features, 100 classes with CIFAR-100's names (bench/step.py), batch 32, interleaved
in one run. Configurations differ in seed and learning rate (`uniform`: end, unified, M = 16, CoOp's default)
or also in variant (`mixed`: unified/CSC, end/middle/front, M = 16 or "a photo of a").

    python bench/bundle.py                                  # CPU, coop-tiny and RN50's text tower, B = 1, 4, 16, 64
    python bench/bundle.py --device cuda --precision bf16   # on a GPU
    python bench/bundle.py --archs coop-tiny --variants uniform,mixed --out bench/results/bundle_cpu.json

A bundle size whose one-at-a-time round is predicted (linearly from the last one measured) to exceed
--budget-s per measurement is skipped and says so. Absolute times on a shared machine drift; compare the
ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import classnames, sync  # noqa: E402

from pipeline.engine.backbone import Backbone, load_backbone  # noqa: E402
from pipeline.engine.bundle import BundleStep  # noqa: E402
from pipeline.engine.prompt import CoOp, PromptConfig  # noqa: E402
from pipeline.engine.train import TrainConfig, TrainStep, build_model  # noqa: E402

log = logging.getLogger("bench.bundle")

UNIFORM = [PromptConfig(16, "", False, "end")]
MIXED = [
    PromptConfig(16, "", False, "end"),
    PromptConfig(16, "", True, "end"),
    PromptConfig(16, "", False, "middle"),
    PromptConfig(4, "a photo of a", False, "end"),
    PromptConfig(16, "", False, "front"),
    PromptConfig(16, "", True, "middle"),
]
LEARNING_RATES = (0.002, 0.02)


def configurations(variants: list[PromptConfig], size: int, precision: str) -> list[tuple[PromptConfig, TrainConfig]]:
    """`size` configurations: variants in turn, seeds 1, 2, 3, ..., the two learning rates alternating."""
    return [(variants[i % len(variants)], TrainConfig(lr=LEARNING_RATES[i % 2], seed=i + 1, precision=precision))
            for i in range(size)]


def round_seconds(bb: Backbone, names: list[str], configs: list[tuple[PromptConfig, TrainConfig]], batch: int,
                  repeats: int) -> tuple[float, float]:
    """(median seconds of one bundled step of every configuration, of one step of each configuration in turn)."""
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(len(configs), batch, bb.embed_dim, generator=g), dim=-1).to(bb.device)  # (B, n, E)
    y = torch.randint(len(names), (len(configs), batch), generator=g).to(bb.device)  # (B, n)
    models = [CoOp(bb, names, prompt, cfg.precision, cfg.shared_prefix, torch.Generator().manual_seed(cfg.seed),
                   cfg.pack_tokens) for prompt, cfg in configs]
    bundle = BundleStep(bb, models, [cfg for _, cfg in configs])
    singles = [TrainStep(build_model(bb, names, prompt, cfg, torch.Generator().manual_seed(cfg.seed)), cfg)
               for prompt, cfg in configs]

    def bundled() -> None:
        bundle(x, y)

    def one_at_a_time() -> None:
        for i, step in enumerate(singles):
            step(x[i], y[i])

    for _ in range(2):  # warm-up (and the bundle's CUDA-graph capture)
        bundled()
        one_at_a_time()
    sync(bb.device)
    times: dict[str, list[float]] = {"bundled": [], "singles": []}
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, fn in (("bundled", bundled), ("singles", one_at_a_time)):
            start = time.perf_counter()
            fn()
            sync(bb.device)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["bundled"]), statistics.median(times["singles"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    parser.add_argument("--archs", default="coop-tiny,RN50", help="open_clip architectures (random weights)")
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or bf16 (native on GPUs)")
    parser.add_argument("--classes", type=int, default=100, help="classes (default 100)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    parser.add_argument("--bundles", default="1,4,16,64", help="bundle sizes B (default 1,4,16,64)")
    parser.add_argument("--variants", default="uniform", help="uniform and/or mixed, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement; median reported")
    parser.add_argument("--budget-s", type=float, default=30.0,
                        help="skip a B whose one-at-a-time round would take longer than this (default 30 s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(message)s")  # quiets open_clip's random-weights notice
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = classnames(args.classes)
    on_gpu = device.type == "cuda"
    results: dict = {
        "device": torch.cuda.get_device_name() if on_gpu else torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision,
        "classes": args.classes, "batch": args.batch, "rows": [],
    }
    log.info("%s, %d threads, %s, %d classes, batch %d", results["device"], results["threads"], args.precision,
             args.classes, args.batch)
    log.info("%-10s %-8s %4s %12s %12s %14s %14s %8s", "arch", "variants", "B", "bundled ms", "one by one ms",
             "bundled cfg/s", "one by one", "ratio")
    for arch in args.archs.split(","):
        bb = load_backbone(arch, None, device)
        for kind in args.variants.split(","):
            variants = {"uniform": UNIFORM, "mixed": MIXED}[kind]
            per_config = None  # seconds of one configuration's step, from the last B measured
            for size in [int(b) for b in args.bundles.split(",")]:
                if per_config is not None and per_config * size > args.budget_s:
                    log.info("%-10s %-8s %4d   skipped: one round would take ~%.0f s (--budget-s %.0f)", arch, kind,
                             size, per_config * size, args.budget_s)
                    continue
                configs = configurations(variants, size, args.precision)
                t_bundled, t_singles = round_seconds(bb, names, configs, args.batch, args.repeats)
                per_config = t_singles / size
                row = {"arch": arch, "variants": kind, "bundle": size, "bundled_ms": 1e3 * t_bundled,
                       "singles_ms": 1e3 * t_singles, "bundled_cfg_steps_s": size / t_bundled,
                       "singles_cfg_steps_s": size / t_singles, "ratio": t_singles / t_bundled}
                results["rows"].append(row)
                log.info("%-10s %-8s %4d %12.1f %12.1f %14.1f %14.1f %7.2fx", arch, kind, size, row["bundled_ms"],
                         row["singles_ms"], row["bundled_cfg_steps_s"], row["singles_cfg_steps_s"], row["ratio"])
        del bb
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
