"""Classify image files with a saved CoOp/CoCoOp/KgCoOp model: `python -m pipeline.tools.predict --context FILE IMAGE`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import cli

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

BATCH_SIZE = 64  # images decoded and encoded at once: memory stays bounded however many files are given


def context_tensor_file(path: Path) -> Path:
    """The .safetensors file of a context named by either of its two files (the tensor or its .json metadata)."""
    from pipeline.engine.context import ContextFileError

    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".safetensors")
    if path.suffix != ".safetensors":
        raise ContextFileError(f"--context {path}: expected a context's .safetensors file or the .json beside it")
    return path


def _read_image(path: Path) -> tuple[Image.Image | None, str]:
    """The image as RGB, or None and why it cannot be read (logged, naming the file)."""
    from pipeline.data.images import ImageReadError, load_image

    if not Path(path).is_file():
        error = f"Cannot read image {path}: no such file."
    else:
        try:
            return load_image(path, advice=""), ""
        except ImageReadError as e:
            error = str(e)
    log.error("%s Skipped.", error)
    return None, error


def class_logits(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) of normalised image features; CoCoOp's (a prompt per image and class) in chunks of images."""
    import torch

    from pipeline.engine.cocoop import EVAL_PROMPTS, CoCoOp

    images = max(1, EVAL_PROMPTS // model.prompt_learner.n_cls) if isinstance(model, CoCoOp) else len(features)
    return torch.cat([model(features[start : start + images]) for start in range(0, len(features), images)])


def predict(context_file: Path, images: list[Path], pretrained: str | None = None, top_k: int = 3,
            device: str = "auto") -> list[dict]:
    """Top-k classes (name, probability, label) for each image under the saved model, in the order given: a
    context (CoOp, KgCoOp) or CoCoOp's context and meta-network (`context.save_learned`'s files).

    An image that is missing or cannot be decoded is logged (naming the file) and gets an "error" entry
    instead of "top"; the other images are still classified. The label (index in the context's class
    list) identifies the class: two classes may share a name (ImageNet's 'missile')."""
    import torch
    import torch.nn.functional as F

    from pipeline.data.images import build_transforms
    from pipeline.engine.backbone import BackboneError, WeightsUnavailableError, load_backbone, resolve_device
    from pipeline.engine.context import ContextFileError, load_learned
    from pipeline.engine.methods import learned_model

    tensor_file = context_tensor_file(context_file)
    tensors, meta = load_learned(tensor_file)
    run_on = resolve_device(device)
    rows: list[dict] = [{"image": str(path)} for path in images]
    model = None  # loaded with the first readable image
    for start in range(0, len(images), BATCH_SIZE):
        decoded = []  # (row index, image) of this batch's readable images
        for index in range(start, min(start + BATCH_SIZE, len(images))):
            image, error = _read_image(images[index])
            if image is None:
                rows[index]["error"] = error
            else:
                decoded.append((index, image))
        if not decoded:
            continue
        if model is None:
            weights = pretrained if pretrained is not None else meta.pretrained
            try:  # the backbone comes from the context's metadata: a failure names the file it came from
                backbone = load_backbone(meta.arch, weights, run_on)
                model = learned_model(backbone, tensors, meta)
            except (BackboneError, WeightsUnavailableError, ContextFileError) as error:
                fix = " (--pretrained gives other weights)" if isinstance(error, WeightsUnavailableError) else ""
                raise ContextFileError(f"context {tensor_file} (backbone {meta.arch}, weights {weights}) cannot be "
                                       f"used: {error}{fix}") from None
            _, test_transform = build_transforms(backbone.image_size, backbone.mean, backbone.std)
        batch = torch.stack([test_transform(image) for _, image in decoded])
        with torch.no_grad():
            features = F.normalize(backbone.encode_images(batch), dim=-1)
            top = class_logits(model, features).softmax(dim=-1).topk(min(top_k, len(meta.classnames)), dim=-1)
        for (index, _), idx, val in zip(decoded, top.indices.tolist(), top.values.tolist(), strict=True):
            rows[index]["top"] = [(meta.classnames[i], round(p, 4), i) for i, p in zip(idx, val, strict=True)]
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipeline.tools.predict", __doc__, params=False)
    parser.add_argument("--context", type=Path, required=True,
                        help="learned model (CoOp, CoCoOp or KgCoOp): its .safetensors file or the .json metadata "
                        "beside it (both must be there)")
    parser.add_argument("images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--pretrained", default=None,
                        help="override the weights recorded in the context (a local checkpoint file or tag)")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to print per image (default 3)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per image instead of text: top = [[name, probability, label], "
                        "...], or error = why the image could not be read")
    cli.add_device(parser, "the CLIP model")
    return parser


def run(args: argparse.Namespace, params: None) -> int:
    """Print each image's classes; exit status 1 when some image could not be read (each was logged)."""
    from pipeline.data.datasets import duplicate_classnames
    from pipeline.engine.context import load_metadata

    results = predict(args.context, args.images, args.pretrained, args.top_k, args.device)
    # Names given to several classes (ImageNet's 'missile') are shown with their label.
    shared = set(duplicate_classnames(load_metadata(args.context).classnames))
    for row in results:
        if args.json:
            sys.stdout.write(json.dumps(row) + "\n")
        elif "top" in row:
            ranked = ", ".join(f"{name}{f' [label {label}]' if name in shared else ''} ({p:.1%})"
                               for name, p, label in row["top"])
            sys.stdout.write(f"{row['image']}: {ranked}\n")
    failed = sum("error" in row for row in results)
    if failed:
        log.error("%d of %d image(s) could not be read (each named above)", failed, len(results))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
