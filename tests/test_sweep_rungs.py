"""MemberRungs decides per bundle member exactly what Ray Tune's real ASHAScheduler decides per trial."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pipeline.sweep.rungs import MemberRungs

# (max_t, grace_period, reduction_factor): powers that land on max_t, ones that do not, float factors.
SETTINGS = [(8, 1, 2), (10, 1, 3), (16, 2, 2), (27, 1, 3), (50, 3, 4), (30, 1, 1.5), (12, 4, 2.5), (5, 5, 2)]


@dataclass
class Event:
    """One step of a sweep: member `key` validated at `epoch` (its `last` validation when `last`)."""

    key: str
    epoch: int
    val_acc: float
    last: bool


def events(seed: int, max_t: int, members: int = 40) -> Iterator[Event]:
    """Randomly interleaved validations of many members: own epochs (some below max_t), own eval_every (some
    skip rungs), val_accs from a small set (ties) with some NaNs."""
    rng = random.Random(seed)
    schedules = {}
    for i in range(members):
        epochs = rng.choice([max_t, max_t, max(1, max_t // 2), rng.randint(1, max_t)])
        every = rng.choice([1, 1, 2, 3, 5])
        schedules[f"m{i}"] = sorted({e for e in range(every, epochs + 1, every)} | {epochs})
    while schedules:
        key = rng.choice(sorted(schedules))
        epoch = schedules[key].pop(0)
        val_acc = math.nan if rng.random() < 0.08 else rng.choice([10.0, 20.0, 25.0, 50.0, 50.0, 75.0, 90.0])
        yield Event(key, epoch, val_acc, not schedules[key])
        if not schedules[key]:
            del schedules[key]


class RayAsha:
    """Ray's real ASHAScheduler driven the way Tune's controller drives it (tune_controller.py): on_trial_add
    for a new trial, on_trial_result per result, and on_trial_complete with the last result when the trial is
    stopped (stop_trial of a RUNNING trial) or returns after its last result; no results after a STOP."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float) -> None:
        self.scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=max_t,
                                       grace_period=grace_period, reduction_factor=reduction_factor)
        self.trials: dict[str, Trial] = {}

    def on_result(self, event: Event) -> bool:
        if event.key not in self.trials:
            self.trials[event.key] = Trial("coop_member", trial_id=event.key, stub=True)
            self.scheduler.on_trial_add(None, self.trials[event.key])
        trial = self.trials[event.key]
        result = {"epoch": event.epoch, "val_acc": event.val_acc}
        decision = self.scheduler.on_trial_result(None, trial, result)
        assert decision in (TrialScheduler.CONTINUE, TrialScheduler.STOP)
        if decision == TrialScheduler.STOP or event.last:
            self.scheduler.on_trial_complete(None, trial, result)
        return decision == TrialScheduler.CONTINUE


def decide(rungs: MemberRungs, event: Event) -> bool:
    """The sweep's side: ask at each validation, report the end of a member that ran all its epochs."""
    keep = rungs.on_result(event.key, event.epoch, event.val_acc)
    if keep and event.last:
        rungs.on_complete(event.key)
    return keep


def play(seed: int, setting: tuple[int, int, float]) -> tuple[list[Event], list[bool]]:
    """The events a sweep would see (none for a member after its stop) and Ray's decisions on them."""
    ray_asha, stopped, seen, decisions = RayAsha(*setting), set(), [], []
    for event in events(seed, setting[0]):
        if event.key in stopped:
            continue
        keep = ray_asha.on_result(event)
        seen.append(event)
        decisions.append(keep)
        if not keep:
            stopped.add(event.key)
    return seen, decisions


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # Ray's cutoff of a rung holding only NaNs
@pytest.mark.parametrize("setting", SETTINGS)
def test_decisions_match_ray_asha(setting: tuple[int, int, float]) -> None:
    stops_before_max_t = nan_results = 0
    for seed in range(6):
        seen, expected = play(seed, setting)
        rungs = MemberRungs(*setting)
        for step, (event, keep) in enumerate(zip(seen, expected, strict=True)):
            assert decide(rungs, event) == keep, f"seed {seed}, step {step}: {event}"
            stops_before_max_t += not keep and event.epoch < setting[0]
            nan_results += math.isnan(event.val_acc)
    # Not vacuous: ASHA stopped members early (never when grace_period == max_t: its one rung is max_t), and
    # NaN val_accs were judged.
    assert (stops_before_max_t > 0) == (setting[1] < setting[0])
    assert nan_results > 0


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_state_round_trip_mid_sweep_keeps_decisions() -> None:
    setting = (27, 1, 3)
    for seed in range(4):
        seen, expected = play(seed, setting)
        rungs = MemberRungs(*setting)
        half = len(seen) // 2
        for event in seen[:half]:
            decide(rungs, event)
        saved = json.dumps(rungs.state(), allow_nan=False)  # strict JSON, NaNs included
        if any(math.isnan(e.val_acc) for e in seen[:half]):
            assert "null" in saved  # a recorded NaN is saved as null
        restored = MemberRungs.from_state(json.loads(saved))
        assert restored.state() == rungs.state()
        for event, keep in zip(seen[half:], expected[half:], strict=True):
            assert decide(restored, event) == keep


def test_stopped_member_stays_stopped() -> None:
    rungs = MemberRungs(8, 1, 2)
    assert rungs.on_result("a", 1, 90.0) and rungs.on_result("b", 1, 95.0)
    assert not rungs.on_result("c", 1, 10.0)  # below the rung-1 cutoff of 90, 95
    assert not rungs.on_result("c", 2, 99.0)  # a retried bundle asking again: still stopped
    assert not rungs.on_result("a", 8, 99.0)  # max_t reached


@pytest.mark.parametrize(("args", "name"), [
    ((0, 1, 2), "max_t"), ((8, 0, 2), "grace_period"), ((8, 9, 2), "grace_period"),
    ((8, 1, 1), "reduction_factor"), ((8, 1, 0.5), "reduction_factor"),
])
def test_bad_arguments_are_named(args: tuple[int, int, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MemberRungs(*args)


def test_bad_state_is_refused() -> None:
    state = MemberRungs(8, 1, 2).state()
    with pytest.raises(ValueError, match="state"):
        MemberRungs.from_state({k: v for k, v in state.items() if k != "rungs"})
    with pytest.raises(ValueError, match="rungs at epochs"):
        MemberRungs.from_state({**state, "max_t": 16})


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_ray_actor_answers_like_the_plain_object() -> None:
    setting = (16, 2, 2)
    seen, expected = play(0, setting)
    plain = MemberRungs(*setting)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        actor = ray.remote(num_cpus=0)(MemberRungs).remote(*setting)
        answers = []
        for event in seen:
            keep = ray.get(actor.on_result.remote(event.key, event.epoch, event.val_acc))
            if keep and event.last:
                ray.get(actor.on_complete.remote(event.key))
            answers.append(keep)
        assert answers == [decide(plain, event) for event in seen] == expected
        assert MemberRungs.from_state(ray.get(actor.state.remote())).state() == ray.get(actor.state.remote())
    finally:
        if started:
            ray.shutdown()
