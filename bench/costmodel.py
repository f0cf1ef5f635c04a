"""The cost model against real steps: CoOp step times measured on this machine next to the model's FLOPs.

For each prompt variant (M=16, end; unified and class-specific contexts) it times our engine's step on
each path it can run (the shared prefix where it applies, and the truncated path) and the official step
(fp16 CLIP on a GPU, 77-token prompts, the batch's images through the image encoder), with random weights
(same shapes, same cost) and ImageNet's class names (numbered beyond 1000), and prints one JSON line per
step with the FLOPs pipeline.engine.flops counts for it. Our text path replays as a CUDA graph on a GPU,
as train_coop runs it (train.cuda_graph; never with amp); the official step runs eagerly. The achieved
TFLOP/s are what pipeline.sweep.estimate.GPUS's utilisation and per-step floors are fitted to
(docs/reproduce.md has the H100 table).

    python bench/costmodel.py                                  # RN50, 1000 classes, fp16, on a GPU if any
    python bench/costmodel.py --arch ViT-B-16 --classes 10 100 1000 --precision bf16 --out h100.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: E402
from step import timed  # noqa: E402

from pipeline import cli  # noqa: E402
from pipeline.engine.backbone import Backbone, count_tokens, load_backbone, resolve_device  # noqa: E402
from pipeline.engine.flops import (  # noqa: E402
    OFFICIAL_TOKENS,
    image_encoder_gflops,
    prompt_layout,
    step_flops,
    tower_shape,
)
from pipeline.engine.prompt import PromptConfig  # noqa: E402
from pipeline.engine.reference import official_train_step  # noqa: E402
from pipeline.engine.train import TrainConfig, TrainStep, build_model  # noqa: E402

log = logging.getLogger("bench.costmodel")

WARMUP_STEPS = 3  # CUDA-graph capture and allocator warm-up happen in the first steps
Variant = tuple[int, bool, str]  # (n_ctx, csc, class token position)


def imagenet_classnames(n: int) -> list[str]:
    """n class names: ImageNet's (open_clip's CLIP list, duplicates included), numbered beyond 1000."""
    return [IMAGENET_CLASSNAMES[i % 1000] + ("" if i < 1000 else f" {i // 1000}") for i in range(n)]


def engine_step(backbone: Backbone, names: list[str], n_ctx: int, csc: bool, position: str, precision: str,
                path: str, image_features: torch.Tensor, labels: torch.Tensor,
                graph: bool) -> tuple[Callable[[], None], bool]:
    """(one step of pipeline.engine.train's inner loop on `path`, whether the engine packs its tokens)."""
    cfg = TrainConfig(precision=precision, shared_prefix=path == "shared", cuda_graph=graph)
    model = build_model(backbone, names, PromptConfig(n_ctx=n_ctx, csc=csc, class_token_position=position), cfg)
    train_step = TrainStep(model, cfg)

    def step() -> None:
        train_step(image_features, labels)

    return step, model.pack_tokens


def measure(
    arch: str = "RN50",
    n_classes: int = 1000,
    device: torch.device | None = None,
    precision: str = "fp16",
    repeats: int = 20,
    batch: int = 32,
    variants: Sequence[Variant] = ((16, False, "end"), (16, True, "end")),
    graph: bool = True,
) -> list[dict[str, Any]]:
    """Rows of measured seconds per step beside the model's FLOPs, per variant and path (module docstring)."""
    device = device or resolve_device("auto")
    on_gpu = device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(arch, None, device=device)
    official_dtype = torch.float16 if on_gpu and precision != "fp32" else torch.float32
    names = imagenet_classnames(n_classes)
    name_tokens = [count_tokens(n) for n in names]
    shape = tower_shape(arch)
    image_gflops = image_encoder_gflops(arch)
    generator = torch.Generator().manual_seed(0)
    image_features = F.normalize(torch.randn(batch, backbone.embed_dim, generator=generator), dim=-1).to(device)
    labels = torch.randint(n_classes, (batch,), generator=generator).to(device)
    rows = []
    for n_ctx, csc, position in variants:
        layout = prompt_layout(n_ctx, max(name_tokens), csc, position, sum(name_tokens) / len(name_tokens))
        paths = [p for p in ("shared", "truncated") if p != "shared" or layout.prefix > 0]
        paths += ["official"] if position == "end" else []
        for path in paths:
            packed = False
            if path == "official":
                step, _ = official_train_step(backbone, names, n_ctx, csc, position, batch, official_dtype)
            else:
                step, packed = engine_step(backbone, names, n_ctx, csc, position, precision, path, image_features,
                                           labels, graph)
            for _ in range(WARMUP_STEPS - 1):  # timed() runs one more
                step()
            seconds = timed(step, device, repeats)
            flops = step_flops(shape, n_classes, layout, path, batch, image_gflops, packed)
            rows.append({
                "arch": arch, "classes": n_classes, "n_ctx": n_ctx, "csc": csc, "position": position,
                "path": path, "precision": str(official_dtype) if path == "official" else precision,
                "seconds_per_step": seconds, "model_tflops_per_step": flops.total / 1e12,
                "model_text_tflops_per_step": (flops.dense + flops.attention) / 1e12,
                "achieved_tflops": flops.total / seconds / 1e12,
                "tokens": OFFICIAL_TOKENS if path == "official" else layout.length, "packed": packed,
                "prefix": layout.prefix if path == "shared" else 0,
                "cuda_graph": path != "official" and graph and on_gpu and precision != "amp",
                "device": torch.cuda.get_device_name(device) if on_gpu else str(device),
            })
            log.info("%s", rows[-1])
            del step
            if on_gpu:
                torch.cuda.empty_cache()
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python bench/costmodel.py", __doc__, params=False)
    cli.add_device(parser)
    parser.add_argument("--arch", default="RN50", help="open_clip architecture; random weights cost the same "
                        "(default: %(default)s)")
    parser.add_argument("--classes", type=int, nargs="+", default=[1000], metavar="N",
                        help="class counts to measure (default: 1000)")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "bf16", "fp16", "amp"],
                        help="precision of our steps (default: %(default)s, the official CoOp setting)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per case; median reported "
                        "(default: %(default)s)")
    parser.add_argument("--no-graph", action="store_true",
                        help="run our steps eagerly instead of as CUDA graphs (train.cuda_graph: false)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="also write every row to this JSON file")
    return parser


def run(args: argparse.Namespace, params: object) -> int:
    """Measure every --classes count; no params file is read."""
    device = resolve_device(args.device)
    rows: list[dict[str, Any]] = []
    for n_classes in args.classes:
        measured = measure(args.arch, n_classes, device, args.precision, args.repeats, graph=not args.no_graph)
        sys.stdout.write("".join(json.dumps(row) + "\n" for row in measured))
        sys.stdout.flush()
        rows += measured
    if args.out:
        from pipeline.atomic import write_json_atomic

        write_json_atomic(args.out, rows)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
