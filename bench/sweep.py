"""Benchmark the sweep's overhead per trial on the bundled demo: (sweep wall time - sum of trial training time) / trials.

Builds the demo's splits and feature cache in a work folder (the real prepare/features stages), runs the
sweep of the project's params.yaml there (paths redirected, tracking to a SQLite file in the folder) and
prints the figures. Wall time is measured twice: the whole `run_sweep` (params, feature loading, Ray
start, MLflow parent run, Tuner.fit, result tables) and `Tuner.fit` alone. Training time is each trial's
own `train_seconds` (the engine's timed loop), so the overhead covers worker start-up, backbone loading,
the object-store fetch, MLflow logging and artifacts, and Tune's scheduling.

    python bench/sweep.py                         # optuna, 8 trials, params.yaml's demo settings
    python bench/sweep.py --search grid --epochs 20
    python bench/sweep.py --scale 1000            # 1,000 one-epoch trials on the Fashion-MNIST sample
                                                  # (tiny random-weight CLIP): overhead, driver memory, locks
    python bench/sweep.py --search grid --bundle-sizes 1,9 --repeats 2 --datasets WorldSketch
                                                  # the demo's grid unbundled against bundles of 9, in turn

--bundle-sizes runs the same sweep once per sweep.bundle_size in turn (A B A B ... for --repeats rounds, each
in its own Ray folder and tracking file) and prints each run's wall time and the ratio to the first size, pair by
pair (the machine drifts; only side-by-side ratios count). A bundle's members all report the bundle's training
time, so only wall times are compared.

--scale N runs a grid of N distinct configurations (N learning rates x n_ctx 1..8, 1 shot, seed 1, one epoch)
and also reports the driver's peak and final resident memory (sampled every second), trials that failed on
"database is locked", and whether trials.csv holds every planned trial exactly once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pipeline.params import Params

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # stages/ lives in the checkout

log = logging.getLogger("bench.sweep")


def prepare_workspace(params_file: Path, work: Path, epochs: int | None) -> Path:
    """params.yaml with every path inside `work`, and its splits + feature cache built there."""
    from stages.features import main as features_main
    from stages.prepare import main as prepare_main

    raw = yaml.safe_load(params_file.read_text()) or {}
    data = raw.setdefault("data", {})
    data["root"] = str((REPO / data.get("root", "data/demo")).resolve())
    data["splits_dir"] = str(work / "splits")
    raw.setdefault("features", {})["dir"] = str(work / "features")
    sweep = raw.setdefault("sweep", {})
    sweep.update(storage=str(work / "ray"), results_dir=str(work / "results"), name=None, address=None)
    raw.setdefault("tracking", {})["uri"] = f"sqlite:///{work}/mlflow.db"
    if epochs is not None:
        raw.setdefault("train", {})["epochs"] = epochs
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    start = time.perf_counter()
    for stage in (prepare_main, features_main):
        extra = ["--no-progress"] if stage is features_main else []
        if stage(["--params", str(path), *extra]) != 0:
            raise SystemExit(f"{stage.__module__} failed; see the log above")
    log.info("demo splits and features ready in %.1fs", time.perf_counter() - start)
    return path


def scale_params(work: Path, trials: int) -> Path:
    """configs/fashion-mnist.yaml with a grid of `trials` one-epoch configurations (lr x n_ctx)."""
    raw = yaml.safe_load((REPO / "configs" / "fashion-mnist.yaml").read_text())
    n_ctx = list(range(1, 9))
    lrs = [round(0.0005 * 1.01 ** i, 8) for i in range(-(-trials // len(n_ctx)))]
    raw["data"].update(shots=[1], seeds=[1])
    raw.setdefault("train", {}).update(epochs=1, eval_every=0)
    raw["sweep"]["space"] = {"n_ctx": n_ctx, "lr": lrs, "ctx_init": [""], "csc": [False]}
    raw["sweep"]["search"] = "grid"
    path = work / "scale-source.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class MemorySampler:
    """This process's resident memory every `every` seconds, in a thread: peak and last value (MiB)."""

    def __init__(self, every: float = 1.0) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(every):
            self.samples.append(me.memory_info().rss / 2**20)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def compare_bundle_sizes(params: Params, work: Path, sizes: list[int], repeats: int) -> int:
    """The same sweep once per bundle size, in turn, `repeats` rounds; wall times and ratios to sizes[0]."""
    from pipeline.sweep.tuner import SweepOptions, run_sweep

    walls: dict[int, list[float]] = {size: [] for size in sizes}
    for round_ in range(repeats):
        for size in sizes:
            tag = f"b{size}-r{round_}"
            run = replace(params, sweep=replace(params.sweep, bundle_size=size, name=tag,
                                                storage=str(work / f"ray-{tag}"),
                                                results_dir=str(work / f"results-{tag}")),
                          tracking=replace(params.tracking, uri=f"sqlite:///{work}/mlflow-{tag}.db"))
            outcome = run_sweep(run, SweepOptions(verbose=0))
            walls[size].append(outcome.wall_seconds)
            trials = len({r.trial_id for r in outcome.records})
            log.info("bundle_size %d, round %d: %d configurations in %d trials, %s finished; wall %.1f s, "
                     "Tuner.fit %.1f s", size, round_ + 1, len(outcome.records), trials,
                     outcome.counts.get("finished", 0), outcome.wall_seconds, outcome.fit_seconds)
    first = sizes[0]
    print(f"machine: {os.cpu_count()} CPUs; {params.sweep.search} sweep of {params.data.datasets}, "
          f"max {params.sweep.max_concurrent} concurrent; {repeats} round(s), sizes in turn")
    for size in sizes:
        ratios = [a / b for a, b in zip(walls[first], walls[size], strict=True)]
        print(f"bundle_size {size:3d}: wall {', '.join(f'{w:.1f}' for w in walls[size])} s; "
              f"bundle_size {first} / this, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)}")
    return 0


def main() -> int:
    from pipeline.params import SEARCHES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file to sweep")
    parser.add_argument("--search", choices=SEARCHES, default="optuna")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-concurrent", type=int)
    parser.add_argument("--epochs", type=int, help="override train.epochs (default: the params file's)")
    parser.add_argument("--workdir", type=Path, help="keep the workspace here (default: a temp folder)")
    parser.add_argument("--scale", type=int, metavar="N", help="N one-epoch trials on the Fashion-MNIST sample")
    parser.add_argument("--bundle-sizes", metavar="B,B", help="compare these sweep.bundle_size values (e.g. 1,9)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of --bundle-sizes (default 1)")
    parser.add_argument("--datasets", help="override data.datasets (comma-separated)")
    parser.add_argument("--gpus-per-trial", type=float, help="override sweep.gpus_per_trial (a GPU run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    from pipeline.params import load_params
    from pipeline.sweep.tuner import SweepOptions, run_sweep

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        source = scale_params(work, args.scale) if args.scale else args.params
        params_path = prepare_workspace(source, work, args.epochs)
        params = load_params(params_path)
        flags = {"search": "grid" if args.scale else args.search, "num_samples": args.num_samples,
                 "max_concurrent": args.max_concurrent, "gpus_per_trial": args.gpus_per_trial}
        params = replace(params, sweep=replace(params.sweep, **{k: v for k, v in flags.items() if v is not None}))
        if args.datasets:
            params = replace(params, data=replace(params.data, datasets=args.datasets.split(",")))
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if args.bundle_sizes:
            return compare_bundle_sizes(params, work, [int(b) for b in args.bundle_sizes.split(",")], args.repeats)
        with MemorySampler() as memory:
            outcome = run_sweep(params, SweepOptions(verbose=0))
        rows = (outcome.files.trials.read_text().count("\n") - 1) if outcome.files.trials.is_file() else 0
    records = outcome.records
    trained = [r for r in records if r.train_seconds is not None]
    n = len(records)
    train_sum = sum(r.train_seconds or 0.0 for r in trained)
    concurrency = params.sweep.max_concurrent
    print(f"machine: {os.cpu_count()} CPUs; search {params.sweep.search}, {n} trials "
          f"({outcome.counts.get('finished', 0)} finished), max {concurrency} concurrent, "
          f"{params.sweep.cpus_per_trial:g} CPU per trial")
    print(f"sweep wall time (run_sweep, incl. Ray start + features + MLflow): {outcome.wall_seconds:8.1f} s")
    print(f"Tuner.fit wall time:                                            {outcome.fit_seconds:8.1f} s")
    print(f"sum of the trials' training time:                               {train_sum:8.1f} s")
    print(f"overhead per trial = (sweep wall - sum training) / trials:      {(outcome.wall_seconds - train_sum) / n:8.2f} s")
    print(f"  same with Tuner.fit wall only:                                {(outcome.fit_seconds - train_sum) / n:8.2f} s")
    print(f"  per trial slot ({concurrency} concurrent: fit wall x {concurrency} - sum training) / trials: "
          f"{(outcome.fit_seconds * concurrency - train_sum) / n:8.2f} s")
    if memory.samples:
        print(f"driver resident memory: peak {max(memory.samples):.0f} MiB, at the end {memory.samples[-1]:.0f} MiB "
              f"(first sample {memory.samples[0]:.0f} MiB)")
    locked = [r for r in records if "database is locked" in r.reason]
    keys = {r.trial_key for r in records}
    print(f"trials failed on 'database is locked': {len(locked)}; trials.csv rows {rows} for {n} planned trials, "
          f"{len(keys)} distinct keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
