"""DVC stage `pretrain`: pretrain a small CLIP on the synthetic world and write its checkpoint and card.

Trains `pretrain.arch` (default coop-tiny) from seeded random weights with CLIP's contrastive loss on
the generated image-caption corpus (pipeline/data/synthetic), then writes the fp16 safetensors
checkpoint to `pretrain.out` and a JSON card beside it (same name, .json: corpus, steps, final loss,
held-out zero-shot accuracies, SHA-256, wall time). Use it with ``backbone.pretrained: <pretrain.out>``.
The repository ships the result, so only a change to the world, the recipe or its params reruns this.

Settings come from --params (params.yaml); a flag overrides its key: ``pretrain.out``, ``pretrain.steps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import cli

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger("stages.pretrain")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m stages.pretrain", __doc__)
    parser.add_argument("--out", metavar="PATH", help="checkpoint to write, .safetensors (params: pretrain.out)")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps (params: pretrain.steps)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def with_flags(params: Params, args: argparse.Namespace) -> Params:
    """`params` with the `pretrain` keys given as flags replaced, validated again."""
    from pipeline.params import params_from_dict

    given = {key: value for key, value in {"out": args.out, "steps": args.steps}.items() if value is not None}
    replaced = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, **given))
    return params_from_dict(replaced.to_dict())


def run(args: argparse.Namespace, params: Params) -> None:
    """Pretrain, then write the checkpoint and its card."""
    from pathlib import Path

    from pipeline.pretrain import card_path, pretrain, save

    settings = with_flags(params, args).pretrain
    result = pretrain(settings, progress=not args.no_progress)
    card = save(result, Path(settings.out))
    log.info("wrote %s (%.1f MB, sha256 %s) and %s in %.0f s: final loss %.3f, zero-shot %s", settings.out,
             card["bytes"] / 1e6, card["sha256"][:12], card_path(Path(settings.out)), card["wall_s"],
             card["final_loss"],
             ", ".join(f"{k} {v['accuracy']:.1f}% (chance {v['chance']:.1f}%)" for k, v in card["zero_shot"].items()))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
