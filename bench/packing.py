"""What token packing and torch.compile give on our step: the same model with one switch flipped, side by side.

Packing (`train.pack_tokens`) runs each prompt's real tokens only, skipping the padding up to the longest
class name; how much it saves depends on how unequal the names are, so it is measured on CIFAR-100's
names (100 classes) and on ImageNet's (1000 classes: 2.2 tokens on average, 12 at most). `--compile`
also times the packed step with the text path compiled by torch.compile (inductor), and the compile time.

    python bench/packing.py [--device cuda] [--compile] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: E402
from step import classnames, timed  # noqa: E402

from pipeline.engine.backbone import Backbone, load_backbone  # noqa: E402
from pipeline.engine.prompt import PromptConfig  # noqa: E402
from pipeline.engine.train import TrainConfig, TrainStep, build_model  # noqa: E402

log = logging.getLogger("bench.packing")


def step_seconds(bb: Backbone, names: list[str], prompt: PromptConfig, pack: bool, repeats: int,
                 compile_text: bool = False) -> tuple[float, float, float]:
    """(median seconds of one training step, seconds spent compiling, share of the per-class pass's
    positions that are padding) for our model with packing on/off."""
    cfg = TrainConfig(pack_tokens=pack, cuda_graph=not compile_text)
    model = build_model(bb, names, prompt, cfg)
    compile_seconds = 0.0
    if compile_text:
        model._encode = torch.compile(model._encode, dynamic=False)  # type: ignore[method-assign]
    step = TrainStep(model, cfg)
    features = F.normalize(torch.randn(32, bb.embed_dim, device=bb.device), dim=-1)
    labels = torch.randint(len(names), (32,), device=bb.device)
    if compile_text:
        start = time.perf_counter()
        step(features, labels)
        compile_seconds = time.perf_counter() - start
    real, padded = model.per_class_tokens
    return timed(lambda: step(features, labels), bb.device, repeats), compile_seconds, 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    parser.add_argument("--arch", default="RN50", help="open_clip architecture; random weights cost the same")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement; median reported")
    parser.add_argument("--compile", action="store_true", help="also time the packed step under torch.compile")
    parser.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    bb = load_backbone(args.arch, None, torch.device(args.device))
    cases = [
        ("CIFAR-100", classnames(100), PromptConfig(16, "", False, "end")),
        ("CIFAR-100", classnames(100), PromptConfig(16, "", True, "front")),
        ("ImageNet", list(IMAGENET_CLASSNAMES), PromptConfig(16, "", False, "end")),
    ]
    rows = []
    log.info("%-10s %6s %-14s %9s %10s %10s %8s", "names", "classes", "variant", "pad %", "padded ms", "packed ms",
             "speed-up")
    for label, names, prompt in cases:
        padded, _, padding = step_seconds(bb, names, prompt, False, args.repeats)
        packed, _, _ = step_seconds(bb, names, prompt, True, args.repeats)
        variant = f"{prompt.class_token_position}/{'csc' if prompt.csc else 'unified'}"
        row = {"names": label, "classes": len(names), "variant": variant, "padding": padding,
               "padded_ms": 1e3 * padded, "packed_ms": 1e3 * packed, "speedup": padded / packed}
        if args.compile:
            compiled, compile_seconds, _ = step_seconds(bb, names, prompt, True, args.repeats, compile_text=True)
            row.update(compiled_ms=1e3 * compiled, compile_s=compile_seconds)
        rows.append(row)
        log.info("%-10s %6d %-14s %8.0f%% %10.1f %10.1f %7.2fx%s", label, len(names), variant, 100 * padding,
                 row["padded_ms"], row["packed_ms"], row["speedup"],
                 f"  compiled {row['compiled_ms']:.1f} ms after {row['compile_s']:.0f} s" if args.compile else "")
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "arch": args.arch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
