"""The sweep's console on Ray Tune: which trials ended, a progress line, one resume hint, the end-of-sweep table.

EndWatcher: after an interrupted fit, Ray marks every trial TERMINATED; only trials that went through Tune's
stop path (`on_trial_complete`) really ended. Tuner.restore brings back a pickled copy of each callback, so a
copy registers itself under its experiment name when the session starts, and the driver looks it up there;
every callback resets its state in `setup` for the same reason.

ProgressLog: one log line every `every_s` seconds (and one at the end) with the trials done, failed, running
and waiting out of the sweep's total, the time elapsed and an ETA from the durations of the trials that ended
in this session, scaled by each trial's optimizer steps; it replaces Ray Tune's own per-trial tables.

RayResumeHint: on an interrupt Ray logs "Resume experiment with: Tuner.restore(...)", a Python call our users
never make; the sweep's own warning names the command (`--resume NAME`), so Ray's line is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from pipeline.sweep.plan import members_of
from pipeline.sweep.space import trial_key

if TYPE_CHECKING:
    from pipeline.sweep.results import ConfigSummary

log = logging.getLogger(__name__)

WATCHERS: dict[str, EndWatcher] = {}  # experiment name -> the watcher of the session running in this process
PROGRESS_EVERY_S = 30.0  # Ray Tune's own status tables came every 30 s too
DONE_STATES = ("TERMINATED", "ERROR")  # Ray's statuses of a trial that will not run again in this session


class RayResumeHint(logging.Filter):
    """Drops Ray Tune's "Resume experiment with: Tuner.restore(...)" record (see ray_resume_hint_dropped)."""

    LOGGER = "ray.tune.tune"  # where tune.run logs it, at the end of an interrupted fit

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def ray_resume_hint_dropped() -> Iterator[None]:
    """While the block runs (Tuner.fit), Ray's own resume hint is not logged."""
    logger, hint = logging.getLogger(RayResumeHint.LOGGER), RayResumeHint()
    logger.addFilter(hint)
    try:
        yield
    finally:
        logger.removeFilter(hint)


class EndWatcher(Callback):
    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: set[str] = set()
        self.ended_before: set[str] | None = None

    def setup(self, **info: Any) -> None:
        self.ended, self.ended_before = set(), None
        WATCHERS[self.name] = self

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended_before is None:  # trials that a resumed session restored already ended
            self.ended_before = {t.trial_id for t in trials if t.status in DONE_STATES}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)

    def all_ended(self) -> set[str]:
        return self.ended | (self.ended_before or set())


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min': as precise as a progress line needs."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def duration_model(ended: Sequence[tuple[float, float]]) -> Callable[[float], float] | None:
    """A trial's expected seconds from its size (its optimizer steps), fitted on the (size, seconds) of the
    trials that ended: least squares `a + b * size` (a fixed cost per trial plus a cost per step) when their
    sizes differ and the fit is not negative anywhere, else their mean duration; None before any ended.

    Trials of one sweep differ tenfold in steps (1 vs 16 shots, 50 vs 200 epochs), and grids run the small
    ones first, so a plain mean would promise the end far too soon."""
    if not ended:
        return None
    sizes, seconds = [s for s, _ in ended], [t for _, t in ended]
    mean = statistics.fmean(seconds)
    if len(set(sizes)) > 1:
        slope, intercept = statistics.linear_regression(sizes, seconds)
        if slope > 0 and intercept >= 0:
            return lambda size: intercept + slope * size
    return lambda size: mean


def eta_seconds(expected: Callable[[float], float] | None, running: Sequence[tuple[float, float]],
                waiting: Sequence[float], concurrency: int) -> float | None:
    """Seconds until the last trial ends: the expected seconds of the `waiting` trials' sizes plus what the
    `running` trials ((size, seconds elapsed)) have left, shared by `concurrency` slots; never less than what
    the running trial furthest from its end has left. None without a duration model."""
    if expected is None:
        return None
    left_running = [max(expected(size) - elapsed, 0.0) for size, elapsed in running]
    work = sum(expected(size) for size in waiting) + sum(left_running)
    return max(work / max(concurrency, 1), max(left_running, default=0.0))


def progress_line(name: str, total: int, done: int, failed: int, running: int, elapsed: float,
                  eta: float | None, final: bool = False) -> str:
    """'sweep NAME: 40/135 trials done (2 failed), 2 running, 93 waiting; 3 min 10 s elapsed, ETA 6 min 40 s'.

    `done` counts the trials that ended (finished, early-stopped or failed); trials the searcher has not
    created yet are waiting. `final`: the line Tune's end gets, which says whether trials were left over.
    """
    waiting = max(total - done - running, 0)
    if done >= total:
        outlook = "all ended"
    elif final:
        outlook = f"stopped with {total - done} trial(s) not done"
    elif eta is None:
        outlook = "ETA once a trial has ended"
    else:
        outlook = f"ETA {format_duration(eta)}"
    return (f"sweep {name}: {done}/{total} trials done ({failed} failed), {running} running, {waiting} waiting; "
            f"{format_duration(elapsed)} elapsed, {outlook}")


class ProgressLog(Callback):
    """Logs `progress_line` every `every_s` seconds while Tune runs, and once when it stops.

    `total`: the configurations the sweep will train (a bundle trial trains several). `sizes`: each planned
    Ray trial's work by `ray_trial_key` (optimizer steps times configurations; grid/random: every trial; optuna:
    its candidates), the size the ETA's duration model scales with; a trial of unknown size counts as the
    planned configurations' mean size per configuration it trains.
    """

    def __init__(self, name: str, total: int, every_s: float = PROGRESS_EVERY_S,
                 sizes: dict[str, float] | None = None) -> None:
        self.name, self.total, self.every_s, self.sizes = name, total, every_s, dict(sizes or {})
        configurations = sum(len(key.split("+")) for key in self.sizes)
        self.mean_size = sum(self.sizes.values()) / configurations if self.sizes else 1.0  # per configuration
        self._reset()

    def _reset(self) -> None:
        now = time.monotonic()
        self.start, self.last_logged = now, now
        self.started: dict[str, float] = {}  # trial id -> when it started in this session
        self.durations: list[tuple[float, float]] = []  # (size, seconds) of the trials that ended in this session
        # Trials that really ended: Tune's complete/error path, or already ended when a resumed session began
        # (on an interrupt Ray marks the trials it cut off TERMINATED too, so statuses alone cannot tell).
        self.ended: set[str] = set()
        self.failed: set[str] = set()
        self.ended_before: set[str] | None = None
        self.most_running = 0  # the concurrency the cluster really gave (max_concurrent or fewer)

    def size(self, config: dict[str, Any] | None) -> float:
        return self.sizes.get(_key(config), self.mean_size * _weight(config))

    def setup(self, **info: Any) -> None:
        self._reset()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.ended_before is None:
            self.ended_before = {t.trial_id for t in trials if t.status in DONE_STATES}
            self.failed |= {t.trial_id for t in trials if t.status == "ERROR"}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started.setdefault(trial.trial_id, time.monotonic())  # a retried trial keeps its first start

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.failed.add(trial.trial_id)
        self._ended(trial)

    def _ended(self, trial: Any) -> None:
        self.ended.add(trial.trial_id)
        start = self.started.pop(trial.trial_id, None)
        if start is not None:
            self.durations.append((self.size(trial.config), time.monotonic() - start))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        running = sum(t.status == "RUNNING" for t in trials)
        self.most_running = max(self.most_running, running)
        if time.monotonic() - self.last_logged >= self.every_s:
            self.log(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.log(trials, final=True)

    def log(self, trials: Sequence[Any], final: bool = False) -> None:
        now = time.monotonic()
        self.last_logged = now
        done_ids = self.ended | (self.ended_before or set())
        # Counts are of configurations (a bundle trial holds several); the ETA works on Ray trials and their sizes.
        running_trials = [t for t in trials if t.status == "RUNNING" and t.trial_id in self.started]
        running = [(self.size(t.config), now - self.started[t.trial_id]) for t in running_trials]
        created = sum(_weight(t.config) for t in trials)
        total = max(self.total, created)
        # Waiting: trials created but not started, and those Tune has not created yet: grid/random's remaining
        # planned trials, or as many mean-sized ones (optuna: `sizes` are its candidates).
        waiting = [self.size(t.config) for t in trials if t.trial_id not in done_ids and t.status != "RUNNING"]
        created_keys = {_key(t.config) for t in trials}
        planned = [size for key, size in self.sizes.items() if key not in created_keys]
        left = max(total - created, 0)
        waiting += planned if sum(len(key.split("+")) for key in self.sizes if key not in created_keys) == left else (
            [self.mean_size] * left)
        eta = eta_seconds(duration_model(self.durations), running, waiting, max(self.most_running, 1))
        done = sum(_weight(t.config) for t in trials if t.trial_id in done_ids)
        failed = sum(_weight(t.config) for t in trials if t.trial_id in self.failed)
        busy = 0 if final else sum(_weight(t.config) for t in running_trials)
        log.info("%s", progress_line(self.name, total, done, failed, busy, now - self.start, eta, final))


def _weight(config: dict[str, Any] | None) -> int:
    """How many configurations a Ray trial trains (a bundle's members)."""
    return len(members_of(config)) if config else 1


def ray_trial_key(config: dict[str, Any]) -> str:
    """A Ray trial's key: its configuration's trial key, or its bundle's members' keys joined by '+'."""
    return "+".join(trial_key(c) for c in members_of(config))


def _key(config: dict[str, Any] | None) -> str:
    """`ray_trial_key` of a trial's config; '' for a config that is not a sweep configuration."""
    try:
        return ray_trial_key(config) if config else ""
    except KeyError:
        return ""


def mean_std_text(values: Sequence[float], std: bool = True) -> str:
    """'71.25 ± 1.30' over seeds (population std, as CoOp's result parser), the mean alone for one seed or
    std=False, '-' when no value is finite."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "-"
    mean = f"{statistics.fmean(finite):.2f}"
    return f"{mean} ± {statistics.pstdev(finite):.2f}" if std and len(finite) > 1 else mean


def best_table(summaries: Sequence[ConfigSummary]) -> str:
    """The best configuration of each dataset x shots (x protocol; chosen on mean validation accuracy), as a text
    table; base-to-new rows add the new classes' accuracy and H."""
    best = sorted((s for s in summaries if s.best), key=lambda s: (s.dataset, s.protocol, s.shots))
    if not best:
        return "no configuration finished: no best configuration to show"
    protocols = any(s.protocol != "fewshot" for s in best)
    rows = [("dataset" + (" [protocol]" if protocols else ""), "shots", "configuration (best by val)", "seeds",
             "val acc", "test acc (mean ± std)")]
    for s in best:
        test = mean_std_text(s.test)
        if s.new:
            test = f"base {test}, new {mean_std_text(s.new)}, H {s.h_of_means:.2f}"
        where = s.dataset + (f" [{s.protocol}]" if protocols else "")
        rows.append((where, str(s.shots), s.label, str(len(s.seeds)), mean_std_text(s.val, std=False), test))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {1, 3, 4, 5}  # numbers align right
    lines = ["  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row))
             .rstrip() for row in rows]
    return ("best configuration per dataset x shots, chosen on validation accuracy (mean over seeds; test "
            "accuracy is shown, never used to choose):\n" + "\n".join(lines))
