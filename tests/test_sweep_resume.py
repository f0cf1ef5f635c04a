"""Resume state: what a sweep records when it starts, which sweep --resume continues, and refusals that say why."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.params import params_from_dict
from pipeline.sweep.plan import SweepError, plan_sweep
from pipeline.sweep.resume import SweepState, read_state, write_state


def state(name: str, plan: str = "p") -> SweepState:
    return SweepState(name=name, search="grid", plan=plan, tracking_uri="sqlite:////tmp/m.db", experiment_id="1",
                      parent_run_id=f"run-{name}", created="2026-01-01T00:00:00")


def test_latest_and_named_sweeps_are_found(tmp_path: Path) -> None:
    write_state(tmp_path, state("first"))
    write_state(tmp_path, state("second"))
    assert read_state(tmp_path, "latest") == state("second")
    assert read_state(tmp_path, "first") == state("first")


def test_state_file_keeps_its_format(tmp_path: Path) -> None:
    """Sweeps started before this version must stay resumable: the same file names and keys (plus `finished` and
    `member_asha`, which a file written before they existed lacks: such a sweep reads as unfinished, without
    bundles)."""
    write_state(tmp_path, state("grid-1"))
    assert json.loads((tmp_path / "latest.json").read_text()) == {"name": "grid-1"}
    before = {"name": "grid-1", "search": "grid", "plan": "p", "tracking_uri": "sqlite:////tmp/m.db",
              "experiment_id": "1", "parent_run_id": "run-grid-1", "created": "2026-01-01T00:00:00"}
    assert json.loads((tmp_path / "grid-1.sweep.json").read_text()) == {**before, "finished": False, "member_asha": False}
    (tmp_path / "grid-1.sweep.json").write_text(json.dumps(before))
    assert read_state(tmp_path, "grid-1") == state("grid-1")


def test_unfinished_sweeps_are_listed_until_marked_finished(tmp_path: Path) -> None:
    from pipeline.sweep.resume import mark_finished, unfinished_sweeps

    write_state(tmp_path, state("a"))
    write_state(tmp_path, state("b"))
    assert [s.name for s in unfinished_sweeps(tmp_path)] == ["a", "b"]
    mark_finished(tmp_path, state("a"))
    assert [s.name for s in unfinished_sweeps(tmp_path)] == ["b"]
    assert read_state(tmp_path, "a").finished


def test_nothing_or_an_unknown_sweep_to_resume_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="nothing to resume"):
        read_state(tmp_path, "latest")
    write_state(tmp_path, state("a"))
    with pytest.raises(SweepError, match="no sweep named 'b'.*known: a"):
        read_state(tmp_path, "b")
    (tmp_path / "c.sweep.json").write_text('{"name": "c"}')
    with pytest.raises(SweepError, match="c.sweep.json is not a sweep state file"):
        read_state(tmp_path, "c")


def test_resume_needs_the_space_the_sweep_started_with() -> None:
    params = params_from_dict({"sweep": {"space": {"n_ctx": [4, 8]}}})
    plan = plan_sweep(params)
    started = state("s", plan=plan.fingerprint())
    started.check_plan(plan)
    other = plan_sweep(replace(params, sweep=replace(params.sweep, space={"n_ctx": [4, 16]})))
    with pytest.raises(SweepError, match="sweep 's' was started with other sweep.space"):
        started.check_plan(other)
