"""ASHA's stopping rule per bundle member: the continue/stop decisions Ray Tune's ASHAScheduler makes for trials."""

# A fused trial bundle trains several configurations ("members") inside one Ray trial, and Ray's ASHAScheduler
# can only stop a whole trial. The sweep therefore asks this one shared object (a Ray actor made by the driver)
# at every validation whether a member goes on; it keeps ASHA's rungs per member key, so a configuration is
# stopped exactly when Ray would have stopped it as a trial of its own (one bracket, stop_last_trials=True,
# mode="max"). Ray's own scheduler for the sweep (pipeline/sweep/tuner.py::_scheduler) uses the same settings.

from __future__ import annotations

import math
from typing import Any

import numpy as np


class MemberRungs:
    """ASHA's rungs, keyed by member, with Ray's AsyncHyperBandScheduler semantics.

    A rung at epoch milestone `grace_period * reduction_factor**k` records the val_acc of each member that
    reached it. A member reaching a rung continues unless its val_acc is below the rung's cutoff: the
    (1 - 1/reduction_factor) quantile (linear interpolation, NaNs ignored) of the values recorded there before
    it. As in Ray, one result is judged at the highest reached rung the member is not yet recorded in (a member
    validating every few epochs fills lower rungs it skipped with later results), a NaN val_acc always continues
    (and is recorded), ties continue, and a member at epoch >= max_t stops. When a member ends, Ray feeds its
    last result to the rungs once more (`on_trial_complete`): `on_result` does this itself for the stops it
    decides; the sweep calls `on_complete` for a member that ended on its own (its last epoch below max_t).
    """

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float) -> None:
        if not max_t >= 1:
            raise ValueError(f"max_t must be at least 1 epoch, got {max_t!r}")
        if not 1 <= grace_period <= max_t:
            raise ValueError(f"grace_period must be between 1 and max_t={max_t} epochs, got {grace_period!r}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be above 1, got {reduction_factor!r}")
        self.max_t, self.grace_period, self.reduction_factor = max_t, grace_period, reduction_factor
        # Ray's rung count, computed the same way (np.log, truncation) so the top rung matches at the boundaries.
        count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
        # Highest milestone first: a result is judged at the highest rung it reached.
        self._rungs: list[tuple[float, dict[str, float]]] = [
            (grace_period * reduction_factor**k, {}) for k in reversed(range(count))]
        self._last: dict[str, tuple[int, float]] = {}  # each running member's last result, for on_complete
        self._ended: set[str] = set()

    def on_result(self, key: str, epoch: int, val_acc: float) -> bool:
        """Member `key` validated at `epoch` with `val_acc`: True to keep training it, False to stop it now."""
        if key in self._ended:
            return False  # already stopped or complete (a retried bundle asks again): it stays ended
        self._last[key] = (epoch, val_acc)
        keep = epoch < self.max_t and self._judge(key, epoch, val_acc)
        if not keep:
            self.on_complete(key)
        return keep

    def on_complete(self, key: str) -> None:
        """Member `key` ended: its last result counts once more, as Ray's on_trial_complete feeds it."""
        if key in self._ended or key not in self._last:
            return
        self._ended.add(key)
        self._judge(key, *self._last.pop(key))

    def _judge(self, key: str, epoch: int, val_acc: float) -> bool:
        for milestone, recorded in self._rungs:
            if epoch < milestone or key in recorded:
                continue
            cutoff = self._cutoff(recorded)
            recorded[key] = val_acc
            return cutoff is None or not val_acc < cutoff
        return True

    def _cutoff(self, recorded: dict[str, float]) -> float | None:
        values = [v for v in recorded.values() if not math.isnan(v)]
        if not values:
            return None  # nothing (or only NaNs) recorded: no member can fall below it
        return float(np.percentile(values, (1 - 1 / self.reduction_factor) * 100))

    def state(self) -> dict[str, Any]:
        """Everything the decisions depend on, as strict JSON (NaN written as null)."""
        def number(v: float) -> float | None:
            return None if math.isnan(v) else v
        return {
            "max_t": self.max_t, "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "rungs": [{"epoch": milestone, "val_acc": {k: number(v) for k, v in recorded.items()}}
                      for milestone, recorded in self._rungs],
            "last": {k: [epoch, number(v)] for k, (epoch, v) in self._last.items()},
            "ended": sorted(self._ended),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take `state()`'s rungs (how the driver restores its Ray actor, which only a constructor builds)."""
        self.__dict__.update(MemberRungs.from_state(state).__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MemberRungs:
        """The MemberRungs that `state()` saved (ValueError naming what does not fit)."""
        def number(v: float | None) -> float:
            return math.nan if v is None else float(v)
        try:
            rungs = cls(state["max_t"], state["grace_period"], state["reduction_factor"])
            milestones = [rung["epoch"] for rung in state["rungs"]]
            if milestones != [m for m, _ in rungs._rungs]:
                raise ValueError(f"saved rungs at epochs {milestones} are not the ones max_t, grace_period and "
                                 f"reduction_factor give ({[m for m, _ in rungs._rungs]})")
            for (_, recorded), rung in zip(rungs._rungs, state["rungs"], strict=True):
                recorded.update({k: number(v) for k, v in rung["val_acc"].items()})
            rungs._last = {k: (int(epoch), number(v)) for k, (epoch, v) in state["last"].items()}
            rungs._ended = set(state["ended"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a MemberRungs state ({type(e).__name__}: {e}); save it with state()") from None
        return rungs
