"""Cost model: a params file's sweep on the resources it asks for (as --dry-run), or one 16-shot ImageNet trial.

Counts the FLOPs of every trial's steps (pipeline.engine.flops; CoCoOp's per-image prompts, KgCoOp's frozen
pass, base2new's half of the classes, xd's transfer targets: pipeline.sweep.estimate.estimate_trial) and
turns them into time on the device the params ask for: GPU-hours on an assumed GPU model when
sweep.gpus_per_trial > 0 (pipeline.sweep.estimate: peaks, utilisation and per-step floors fitted to H100
steps), else CPU core-hours at sweep.cpus_per_trial cores per trial, at the rate measured on the development
machine's CPU. `python bench/costmodel.py` times
real steps on this machine's accelerator next to the model's FLOPs. Where sweep.bundle_size bundles the
configurations (auto: on GPUs), the bundled cost follows the unbundled one (the model's, not measured).

examples:
  python -m pipeline.tools.costmodel                                               # params.yaml, as it asks
  python -m pipeline.tools.costmodel --params configs/paper_rn50.yaml --gpu H100 --gpus 1 8 32
  python -m pipeline.tools.costmodel --params configs/paper_rn50.yaml --official  # the official code
  python -m pipeline.tools.costmodel --imagenet                                   # 16-shot ImageNet
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import cli
from pipeline.sweep.estimate import GPUS  # light: torch and open_clip load only when FLOPs are counted

if TYPE_CHECKING:
    from pipeline.params import Params


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipeline.tools.costmodel", __doc__)
    parser.add_argument("--gpu", choices=sorted(GPUS),
                        help="cost the sweep on this GPU model, one per trial (default: what the params ask for: H100 "
                        "when sweep.gpus_per_trial > 0, else CPU core-hours at sweep.cpus_per_trial; --imagenet: H100)")
    parser.add_argument("--official", action="store_true",
                        help="cost the grid as the official CoOp code would run it (77 tokens, image encoder)")
    parser.add_argument("--gpus", type=int, nargs="+", metavar="N",
                        help="trials at a time (GPUs, or CPU trial slots) to print wall times for (default: 1, "
                        "sweep.max_concurrent and, for GPUs, 8 and 32)")
    parser.add_argument("--imagenet", action="store_true",
                        help="print the 16-shot ImageNet trial estimate (ours vs official) as JSON instead")
    parser.add_argument("--arch", default="RN50", help="architecture for --imagenet (default: %(default)s)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="also write the result to this JSON file")
    return parser


def run(args: argparse.Namespace, params: Params | None) -> int:
    from pipeline.sweep.estimate import estimate_sweep, imagenet_16shot_estimate, sweep_trials

    result: dict[str, Any]
    if args.imagenet:
        from pipeline.data.published import load_published

        result = imagenet_16shot_estimate(args.gpu or "H100", args.arch)
        # For reference: the time the CoOp authors give for one such run on one GPU (published.json).
        result["published_official_hours"] = load_published()["timing"]["imagenet_16shot_one_gpu_hours"]
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        assert params is not None  # cli.run loads --params
        estimate = estimate_sweep(params, gpu=args.gpu, path="official" if args.official else None)
        slots = args.gpus or estimate.slots
        sys.stdout.write(estimate.summary(slots) + "\n")
        result = {"device": asdict(estimate.device), "unit": estimate.unit, "hours": estimate.hours,
                  "cores_per_trial": estimate.cores if estimate.on_cpu else None, "resources": estimate.resources,
                  "wall_hours": {str(n): estimate.wall_hours(n) for n in slots},
                  "by_dataset": estimate.by_dataset(), "by_method": estimate.by_method(),
                  "trials": len(estimate.trials)}
        trials = [] if args.official else sweep_trials(params)  # the official code has no bundles
        if trials and len(trials) < len(estimate.trials):
            bundled = estimate_sweep(params, trials, gpu=args.gpu)
            sys.stdout.write(f"with bundles (sweep.bundle_size {params.sweep.bundle_size}): {bundled.brief(slots)}\n")
            sys.stdout.writelines(f"  assumption: {a}\n" for a in bundled.assumptions if a not in estimate.assumptions)
            result["bundled"] = {"hours": bundled.hours, "trials": len(bundled.trials),
                                 "bundles": sum(1 for t in bundled.trials if t.members),
                                 "wall_hours": {str(n): bundled.wall_hours(n) for n in slots},
                                 "by_dataset": bundled.by_dataset()}
    if args.out:
        from pipeline.atomic import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
