"""The sweep's console: the progress line and its ETA, the end-of-sweep table, Ray's resume hint dropped.

The progress callback and the table in a real sweep: test_sweep.py (optuna end to end); a real SIGINT to a
real sweep process: test_stages_sweep.py.
"""

from __future__ import annotations

import inspect
import logging
import statistics

import pytest

from pipeline.sweep.callbacks import (
    RayResumeHint,
    best_table,
    eta_seconds,
    format_duration,
    mean_std_text,
    progress_line,
    ray_resume_hint_dropped,
)
from pipeline.sweep.results import TrialRecord, summarize
from pipeline.sweep.space import trial_key


def test_eta_shares_the_work_left_among_the_slots_but_waits_for_the_slowest_running_trial() -> None:
    assert eta_seconds([], [5.0], waiting=3, concurrency=2) is None  # nothing ended yet: no basis
    # mean trial 15 s; running trials have 15 - 5 = 10 s and 0 s left (one ran past the mean); 3 waiting
    assert eta_seconds([10.0, 20.0], [5.0, 20.0], waiting=3, concurrency=2) == pytest.approx((3 * 15 + 10) / 2)
    # the last trial running: two idle slots do not make it end sooner
    assert eta_seconds([10.0, 20.0], [1.0], waiting=0, concurrency=2) == pytest.approx(14.0)
    assert eta_seconds([10.0], [], waiting=4, concurrency=0) == pytest.approx(40.0)  # never divides by 0


def test_progress_line_counts_and_outlook() -> None:
    line = progress_line("grid-x", total=135, done=40, failed=2, running=2, elapsed=190, eta=400)
    assert line == ("sweep grid-x: 40/135 trials done (2 failed), 2 running, 93 waiting; 3 min 10 s elapsed, "
                    "ETA 6 min 40 s")
    assert progress_line("s", 4, 0, 0, 2, 12, None).endswith("2 running, 2 waiting; 12 s elapsed, ETA once a "
                                                             "trial has ended")
    assert progress_line("s", 4, 4, 1, 0, 7300, None, final=True).endswith("2 h 01 min elapsed, all ended")
    interrupted = progress_line("s", 4, 1, 0, 0, 30, 20.0, final=True)
    assert interrupted.endswith("stopped with 3 trial(s) not done") and "ETA" not in interrupted
    assert [format_duration(s) for s in (0, 59.4, 60, 3599, 3600, 86399)] == \
        ["0 s", "59 s", "1 min 00 s", "59 min 59 s", "1 h 00 min", "23 h 59 min"]


def _record(config: dict, val: float, test: float, state: str = "FINISHED") -> TrialRecord:
    return TrialRecord(config=config, trial_key=trial_key(config), state=state, val_acc=val, test_acc=test)


def test_end_table_shows_the_best_by_validation_of_each_setting_with_test_mean_and_std() -> None:
    base = {"dataset": "D", "shots": 4, "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end",
            "lr": 0.002, "epochs": 10, "precision": "fp32"}
    csc = {**base, "csc": True}
    records = [
        _record({**base, "seed": 1}, val=70, test=90), _record({**base, "seed": 2}, val=72, test=94),
        _record({**csc, "seed": 1}, val=80, test=60), _record({**csc, "seed": 2}, val=84, test=63),  # best by val
        _record({**base, "shots": 1, "seed": 1}, val=50, test=40),  # one seed: no std
        _record({**base, "shots": 1, "seed": 2}, val=99, test=99, state="FAILED"),
        _record({**base, "dataset": "E", "seed": 1}, val=10, test=20, state="FAILED"),  # nothing finished in E
    ]
    table = best_table(summarize(records))
    lines = table.splitlines()
    assert "chosen on validation accuracy" in lines[0]
    assert lines[1].split()[:2] == ["dataset", "shots"]
    rows = [line.split("  ") for line in lines[2:]]
    cells = [[c.strip() for c in row if c.strip()] for row in rows]
    expected_test = f"{statistics.fmean([60, 63]):.2f} ± {statistics.pstdev([60, 63]):.2f}"
    assert cells == [
        ["D", "1", "n_ctx=16 unified end lr=0.002 ep=10 fp32", "1", "50.00", "40.00"],
        ["D", "4", "n_ctx=16 csc end lr=0.002 ep=10 fp32", "2", "82.00", expected_test],
    ]
    assert expected_test == "61.50 ± 1.50"
    assert "no configuration finished" in best_table([])
    assert mean_std_text([float("nan")]) == "-" and mean_std_text([1.0, 3.0], std=False) == "2.00"


def test_rays_resume_hint_is_dropped_only_while_the_fit_runs() -> None:
    import ray.tune.tune as ray_tune_run

    # Where and how Ray says it (so the filter keeps matching this Ray version's record).
    source = inspect.getsource(ray_tune_run)
    assert ray_tune_run.logger.name == RayResumeHint.LOGGER and "Resume experiment with: {restore_entrypoint}" in source
    assert 'Tuner.restore(path="{path}", trainable=...)' in source
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    ray_logger = logging.getLogger(RayResumeHint.LOGGER)
    handler = Keep(level=logging.DEBUG)
    ray_logger.addHandler(handler)
    hint = ("Experiment has been interrupted, but the most recent state was saved.\nResume experiment with: "
            'Tuner.restore(path="/tmp/ray/grid-1", trainable=...)')
    try:
        with ray_resume_hint_dropped():
            ray_logger.warning(hint)
            ray_logger.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
        ray_logger.warning(hint)
    finally:
        ray_logger.removeHandler(handler)
    assert seen == ["Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.", hint]
    assert not any(isinstance(f, RayResumeHint) for f in ray_logger.filters)
