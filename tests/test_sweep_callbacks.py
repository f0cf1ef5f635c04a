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
    ProgressLog,
    RayResumeHint,
    best_table,
    duration_model,
    eta_seconds,
    format_duration,
    mean_std_text,
    progress_line,
    ray_resume_hint_dropped,
)
from pipeline.sweep.results import TrialRecord, summarize
from pipeline.sweep.space import trial_key


def test_duration_model_is_a_cost_per_trial_plus_a_cost_per_step() -> None:
    assert duration_model([]) is None  # nothing ended yet: no basis
    exact = duration_model([(50, 2.0 + 0.01 * 50), (100, 2.0 + 0.01 * 100), (400, 2.0 + 0.01 * 400)])
    assert exact is not None and exact(1000) == pytest.approx(12.0) and exact(0) == pytest.approx(2.0)
    # one size only, or a fit that would go negative (here: the bigger trial ran shorter): the mean duration
    same = duration_model([(50, 3.0), (50, 5.0)])
    assert same is not None and same(1000) == pytest.approx(4.0)
    falling = duration_model([(50, 9.0), (400, 3.0)])
    assert falling is not None and falling(50) == falling(400) == pytest.approx(6.0)


def test_eta_shares_the_work_left_among_the_slots_but_waits_for_the_slowest_running_trial() -> None:
    flat = duration_model([(1, 10.0), (1, 20.0)])  # mean trial 15 s
    assert eta_seconds(None, [(1, 5.0)], [1, 1], concurrency=2) is None
    # running trials have 15 - 5 = 10 s and 0 s left (one ran past the mean); 3 waiting
    assert eta_seconds(flat, [(1, 5.0), (1, 20.0)], [1, 1, 1], concurrency=2) == pytest.approx((3 * 15 + 10) / 2)
    # the last trial running: two idle slots do not make it end sooner
    assert eta_seconds(flat, [(1, 1.0)], [], concurrency=2) == pytest.approx(14.0)
    assert eta_seconds(flat, [], [1] * 4, concurrency=0) == pytest.approx(60.0)  # never divides by 0
    # Sizes count: small trials ended first (1 shot), the big ones wait (16 shots, 20x the steps).
    scaled = duration_model([(50, 1.5), (100, 2.0)])  # 1 s + 10 ms per step
    assert eta_seconds(scaled, [], [1000, 1000], concurrency=1) == pytest.approx(2 * 11.0)


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


def test_progress_log_counts_ray_trials_through_tunes_callback_hooks(caplog: pytest.LogCaptureFixture) -> None:
    """Ray's own Trial objects (stubs: no trainable runs) driven through the hooks Tune calls."""
    from ray.tune.experiment import Trial

    base = {"dataset": "D", "shots": 1, "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end",
            "lr": 0.002, "epochs": 10, "precision": "fp32"}
    configs = [{**base, "seed": seed} for seed in (1, 2, 3, 4)]
    progress = ProgressLog("grid-t", total=4, every_s=3600, sizes={trial_key(c): 10 * c["seed"] for c in configs})
    progress.setup(total_num_samples=4)
    trials = [Trial("run_trial", config=c, stub=True) for c in configs[:3]]  # Tune created three so far
    progress.on_step_begin(0, trials)
    for trial in trials[:2]:
        trial.set_status(Trial.RUNNING)
        progress.on_trial_start(0, trials, trial)
    progress.on_step_end(0, trials)  # within every_s: logs nothing
    with caplog.at_level(logging.INFO, logger="pipeline.sweep.callbacks"):
        progress.log(trials)
        trials[0].set_status(Trial.TERMINATED)
        progress.on_trial_complete(1, trials, trials[0])
        trials[1].set_status(Trial.ERROR)
        progress.on_trial_error(1, trials, trials[1])
        trials[2].set_status(Trial.RUNNING)
        progress.on_trial_start(1, trials, trials[2])
        progress.log(trials)
        trials[2].set_status(Trial.TERMINATED)  # what Ray does to a running trial on Ctrl-C
        progress.on_experiment_end(trials)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("sweep grid-t: 0/4 trials done (0 failed), 2 running, 2 waiting;")
    assert lines[0].endswith("ETA once a trial has ended")
    assert lines[1].startswith("sweep grid-t: 2/4 trials done (1 failed), 1 running, 1 waiting;")
    assert ", ETA " in lines[1]  # two trials of sizes 10 and 20 ended: the model scales to sizes 30 and 40
    assert progress.durations[0][0] == 10 and progress.durations[1][0] == 20
    assert lines[2].startswith("sweep grid-t: 2/4 trials done (1 failed), 0 running, 2 waiting;")
    assert lines[2].endswith("stopped with 2 trial(s) not done")
