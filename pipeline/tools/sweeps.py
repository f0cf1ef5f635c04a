"""List the sweeps in the tracking store: name, experiment, start, trials, state and best accuracy of each.

Every sweep is an MLflow parent run (tag `sweep.name`) whose metrics, logged when it ends, count its trials
and give each dataset x shots' best configuration (chosen on validation accuracy) with its mean test
accuracy; the list shows, per dataset, that accuracy at the most shots. A sweep still running (or whose
driver died) has no such metrics yet: its trials are counted from its child runs.

examples:
  python -m pipeline.tools.sweeps                          # every sweep in tracking.uri's store
  python -m pipeline.tools.sweeps --experiment coop-demo   # one experiment's sweeps
  python -m pipeline.tools.sweeps --tracking-uri http://10.0.0.1:5000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import cli

if TYPE_CHECKING:
    from mlflow.entities import Run

    from pipeline.params import Params

STATES = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed", "RUNNING": "running"}
TRIAL_COUNTS = ("finished", "failed", "stopped", "unfinished")  # the parent run's trials_<state> metrics
BEST_PREFIX = "best_test_acc."  # best_test_acc.<dataset>.<K>shot: the best-by-val configuration's test mean


@dataclass
class SweepListing:
    """One sweep as the tracking store records it."""

    name: str
    experiment: str
    started: datetime
    state: str  # finished | interrupted | failed | running
    trials: dict[str, int] = field(default_factory=dict)  # total and TRIAL_COUNTS; {"started": n} while running
    best: dict[str, tuple[int, float]] = field(default_factory=dict)  # dataset -> (most shots, test acc there)

    def trials_text(self) -> str:
        if "total" not in self.trials:
            return f"{self.trials.get('started', 0)} started"
        parts = [f"{self.trials.get('finished', 0)}/{self.trials['total']} finished"]
        parts += [f"{self.trials[k]} {k}" for k in TRIAL_COUNTS[1:] if self.trials.get(k)]
        return ", ".join(parts)

    def best_text(self) -> str:
        return "; ".join(f"{d} {shots}-shot {acc:.1f}" for d, (shots, acc) in sorted(self.best.items())) or "-"


def best_at_most_shots(metrics: dict[str, float]) -> dict[str, tuple[int, float]]:
    """dataset -> (its largest shot count, the best-by-val test accuracy there) from a parent run's metrics;
    another protocol's setting is named "<dataset> [<protocol>]" (base-to-new: the base classes' accuracy)."""
    best: dict[str, tuple[int, float]] = {}
    for key, value in metrics.items():
        if not key.startswith(BEST_PREFIX):
            continue
        setting, protocol = key[len(BEST_PREFIX):], ""
        if not setting.endswith("shot"):  # best_test_acc.<dataset>.<K>shot.<protocol>
            setting, protocol = setting.rsplit(".", 1)
            if not setting.endswith("shot"):
                continue
        dataset, shots_text = setting.rsplit(".", 1)  # dataset names may hold dots
        dataset += f" [{protocol}]" if protocol else ""
        shots = int(shots_text[: -len("shot")])
        if dataset not in best or shots > best[dataset][0]:
            best[dataset] = (shots, value)
    return best


def listing(run: Run, experiment: str, children: int) -> SweepListing:
    """What the list shows of one sweep's parent run (`children`: its child runs, for a sweep without counts)."""
    from pipeline.tracking import SWEEP_TAG

    metrics = run.data.metrics
    trials = {k: int(metrics[f"trials_{k}"]) for k in ("total", *TRIAL_COUNTS) if f"trials_{k}" in metrics}
    return SweepListing(
        name=run.data.tags.get(SWEEP_TAG) or run.info.run_name or run.info.run_id,
        experiment=experiment,
        started=datetime.fromtimestamp(run.info.start_time / 1000),
        state=STATES.get(run.info.status, run.info.status.lower()),
        trials=trials if "total" in trials else {"started": children},
        best=best_at_most_shots(metrics),
    )


def list_sweeps(uri: str, experiment: str | None = None) -> list[SweepListing]:
    """Every sweep in the store at `uri` (or in one experiment), oldest first."""
    from mlflow import MlflowClient

    from pipeline.tracking import PARENT_TAG, SWEEP_TAG, TrackingError

    client = MlflowClient(uri)
    if experiment is None:
        experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise TrackingError(f"no experiment {experiment!r} in {uri}; experiments there: {names}")
        experiments = {found.experiment_id: found.name}
    if not experiments:
        return []
    parents = client.search_runs(list(experiments), f"tags.`{SWEEP_TAG}` LIKE '%' AND tags.`{PARENT_TAG}` IS NULL",
                                 max_results=50_000)
    sweeps = []
    for run in parents:
        children = 0
        if "trials_total" not in run.data.metrics:  # still running, or its driver died: count what started
            children = len(client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run.info.run_id}'",
                                              max_results=50_000))
        sweeps.append(listing(run, experiments[run.info.experiment_id], children))
    return sorted(sweeps, key=lambda s: s.started)


def format_sweeps(sweeps: Sequence[SweepListing]) -> str:
    """The list as a text table, with what to do about interrupted sweeps."""
    rows = [("sweep", "experiment", "started", "trials", "state", "best test acc by val, at the most shots")]
    rows += [(s.name, s.experiment, f"{s.started:%Y-%m-%d %H:%M}", s.trials_text(), s.state, s.best_text())
             for s in sweeps]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if any(s.state == "interrupted" for s in sweeps):
        lines.append("interrupted: continue one with `python -m pipeline.sweep --resume NAME` (same params)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("python -m pipeline.tools.sweeps", __doc__)
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI, e.g. http://host:5000 or sqlite:///mlflow.db (default: "
                        "MLFLOW_TRACKING_URI, else tracking.uri)")
    parser.add_argument("--experiment", metavar="NAME",
                        help="list only this MLflow experiment's sweeps (default: every experiment in the store)")
    return parser


def run(args: argparse.Namespace, params: Params | None) -> int:
    from pipeline.tracking import TrackingError, check_tracking_uri, resolve_tracking_uri

    assert params is not None  # cli.run loads --params
    uri = resolve_tracking_uri(args.tracking_uri, params.tracking.uri)
    database = _sqlite_path(uri)
    if database is not None and not database.is_file():
        raise TrackingError(f"no tracking database at {database}: no sweep has logged there yet (run one, or "
                            "point --tracking-uri, MLFLOW_TRACKING_URI or tracking.uri at the store)")
    check_tracking_uri(uri, timeout=params.tracking.check_timeout_s)
    sweeps = list_sweeps(uri, args.experiment)
    if not sweeps:
        sys.stdout.write(f"no sweeps in {uri}" + (f" (experiment {args.experiment})" if args.experiment else "") + "\n")
    else:
        sys.stdout.write(format_sweeps(sweeps) + "\n")
    return 0


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (which MLflow would create empty if it did not exist), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) and uri[len(prefix):] != ":memory:" else None


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
