"""Training-step cost of CoOp, KgCoOp and CoCoOp on the demo's 20-class task, and CoCoOp's official per-image loop.

CoCoOp encodes images x classes prompts per step. Ours runs them as one batch through the exact shared-prefix
and packed text path; the official code loops over the batch's images, each through all 77 tokens of its C
prompts (`official_cocoop_step`, built from `pipeline.engine.reference`). Steps on cached image features.

    python bench/methods.py                          # CPU, the demo's coop-tiny-rn, WorldPastel's 20 classes
    python bench/methods.py --arch ViT-B-16          # CoCoOp's paper backbone (random weights cost the same)
    python bench/methods.py --threads 1 --out bench/results/methods_cpu.json

Absolute times on a shared machine drift; compare figures of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.synthetic.tasks import get_task  # noqa: E402
from pipeline.engine.backbone import Backbone, load_backbone  # noqa: E402
from pipeline.engine.methods import MethodConfig, build_method_model  # noqa: E402
from pipeline.engine.prompt import PromptConfig  # noqa: E402
from pipeline.engine.reference import official_prompts, official_text_features  # noqa: E402
from pipeline.engine.train import TrainConfig, TrainStep  # noqa: E402

log = logging.getLogger("bench.methods")

DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "coop-tiny-world.safetensors"
PROMPT = PromptConfig(n_ctx=4, ctx_init="a photo of a")  # the official init of CoCoOp and KgCoOp


def median_seconds(step: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def our_step(backbone: Backbone, names: list[str], method: MethodConfig, batch: int) -> Callable[[], None]:
    """One TrainStep of `method` (our exact text path) on a batch of random normalised image features."""
    model = build_method_model(backbone, names, PROMPT, method, generator=torch.Generator().manual_seed(0))
    step = TrainStep(model, TrainConfig())
    images = F.normalize(torch.randn(batch, backbone.embed_dim), dim=-1).to(backbone.device)
    labels = torch.randint(len(names), (batch,)).to(backbone.device)
    return lambda: step(images, labels)


def official_cocoop_step(backbone: Backbone, names: list[str], batch: int) -> Callable[[], None]:
    """CoCoOp's official forward and SGD step: per image, its shifted context in all C prompts of 77 tokens."""
    model = build_method_model(backbone, names, PROMPT, MethodConfig("cocoop"))
    params = model.trained_parameters()
    ctx, net = model.prompt_learner.ctx, model.meta_net
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    images = F.normalize(torch.randn(batch, backbone.embed_dim), dim=-1).to(backbone.device)
    labels = torch.randint(len(names), (batch,)).to(backbone.device)

    def step() -> None:
        rows = []
        for image in images:
            shifted = (ctx + net(image)).unsqueeze(0).expand(len(names), -1, -1)
            prompts, eos = official_prompts(backbone, names, shifted, "end", PROMPT.ctx_init)
            text = F.normalize(official_text_features(backbone, prompts, eos), dim=-1)
            rows.append(backbone.logit_scale * image @ text.t())
        loss = F.cross_entropy(torch.stack(rows), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="coop-tiny-rn", help="open_clip architecture (default: the demo's)")
    parser.add_argument("--task", default="WorldPastel", help="world task whose class names are used (20 classes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per measurement; median reported")
    parser.add_argument("--batches", default="1,4,32", help="CoCoOp batch sizes to time (comma-separated)")
    parser.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = str(DEMO_WEIGHTS) if args.arch == "coop-tiny-rn" and DEMO_WEIGHTS.is_file() else None
    backbone = load_backbone(args.arch, weights, torch.device(args.device))
    names = get_task(args.task).classnames
    batches = [int(b) for b in args.batches.split(",")]

    rows = []

    def record(method: str, batch: int, seconds: float, official: float | None = None) -> None:
        row = {"method": method, "batch": batch, "step_ms": 1e3 * seconds, "ms_per_image": 1e3 * seconds / batch}
        if official is not None:
            row.update(official_step_ms=1e3 * official, speedup=official / seconds)
        rows.append(row)
        log.info("%-8s %6d %10.2f %12.2f%s", method, batch, row["step_ms"], row["ms_per_image"],
                 f" {row['official_step_ms']:12.1f} {row['speedup']:8.1f}x" if official is not None else "")

    log.info("%s, %d classes (%s), %s, %d thread(s)", args.arch, len(names), args.task, args.device,
             torch.get_num_threads())
    log.info("%-8s %6s %10s %12s %12s %9s", "method", "batch", "step ms", "ms / image", "official ms", "speed-up")
    for method in ("coop", "kgcoop"):
        record(method, 32, median_seconds(our_step(backbone, names, MethodConfig(method), 32), args.repeats))
    for batch in batches:
        ours = median_seconds(our_step(backbone, names, MethodConfig("cocoop"), batch), args.repeats)
        official = median_seconds(official_cocoop_step(backbone, names, batch), max(3, args.repeats // 4), warmup=1)
        record("cocoop", batch, ours, official)
    if args.out:
        args.out.write_text(json.dumps({"arch": args.arch, "task": args.task, "classes": len(names),
                                        "device": args.device, "threads": torch.get_num_threads(), "rows": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
