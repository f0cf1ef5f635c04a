"""Classify image files with a saved CoOp context: `python -m pipeline.tools.predict --context FILE IMAGE`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import cli


def predict(context_file: Path, images: list[Path], pretrained: str | None = None, top_k: int = 3,
            device: str = "auto") -> list[dict]:
    """Top-k classes (name, probability, label) for each image under the saved context.

    The label (index in the context's class list) identifies the class: two classes may share a name
    (ImageNet's 'missile')."""
    import torch
    import torch.nn.functional as F

    from pipeline.data.images import build_transforms, load_image
    from pipeline.engine.backbone import load_backbone, resolve_device
    from pipeline.engine.context import context_model, load_context

    ctx, meta = load_context(context_file)
    backbone = load_backbone(meta.arch, pretrained if pretrained is not None else meta.pretrained,
                             resolve_device(device))
    model = context_model(backbone, ctx, meta)
    _, test_transform = build_transforms(backbone.image_size, backbone.mean, backbone.std)
    batch = torch.stack([test_transform(load_image(p)) for p in images])
    with torch.no_grad():
        features = F.normalize(backbone.encode_images(batch), dim=-1)
        probs = model(features).softmax(dim=-1)
    k = min(top_k, probs.shape[1])
    top = probs.topk(k, dim=-1)
    return [
        {"image": str(path),
         "top": [(meta.classnames[i], round(p, 4), i) for i, p in zip(idx, val, strict=True)]}
        for path, idx, val in zip(images, top.indices.tolist(), top.values.tolist(), strict=True)
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipeline.tools.predict", __doc__, params=False)
    parser.add_argument("--context", type=Path, required=True,
                        help="learned context (.safetensors; its .json metadata must lie beside it)")
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--pretrained", default=None,
                        help="override the weights recorded in the context (a local checkpoint file or tag)")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to print per image (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per image instead of text: top = [[name, probability, label], ...]")
    cli.add_device(parser, "the CLIP model")
    return parser


def run(args: argparse.Namespace, params: None) -> None:
    from pipeline.data.datasets import duplicate_classnames
    from pipeline.engine.context import load_metadata

    results = predict(args.context, args.images, args.pretrained, args.top_k, args.device)
    # Names given to several classes (ImageNet's 'missile') are shown with their label.
    shared = set(duplicate_classnames(load_metadata(args.context).classnames))
    for row in results:
        if args.json:
            sys.stdout.write(json.dumps(row) + "\n")
        else:
            ranked = ", ".join(f"{name}{f' [label {label}]' if name in shared else ''} ({p:.1%})"
                               for name, p, label in row["top"])
            sys.stdout.write(f"{row['image']}: {ranked}\n")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
