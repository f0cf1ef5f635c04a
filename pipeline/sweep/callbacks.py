"""A Ray Tune callback that tells trials which ended (finished or early-stopped) from trials an interrupt cut off.

After an interrupted fit, Ray marks every trial TERMINATED; only trials that went through Tune's stop path
(`on_trial_complete`) really ended. Tuner.restore brings back a pickled copy of the callback, so each copy
registers itself under its experiment name when the session starts, and the driver looks it up there.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

WATCHERS: dict[str, EndWatcher] = {}  # experiment name -> the watcher of the session running in this process


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
            self.ended_before = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.add(trial.trial_id)

    def all_ended(self) -> set[str]:
        return self.ended | (self.ended_before or set())
