"""Ray Tune searchers that hand out only distinct, valid CoOp configurations.

`ConfigListSearcher` serves a precomputed list (grid, random draw) in order; its state is a small JSON
file, so a resumed sweep continues where it stopped. `UniqueSearcher` wraps a model-based searcher
(OptunaSearch): a configuration it has already handed out is answered from the earlier trial's result
(so TPE still learns from it) and a new one is asked for, so no trial trains a duplicate. `BundlingSearcher`
gathers its suggestions into fused trial bundles where sweep.bundle_size bundles.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from pipeline.sweep.plan import BUNDLE, MEMBERS
from pipeline.sweep.space import SearchSpace, trial_key

if TYPE_CHECKING:
    from pipeline.sweep.plan import BundleRule, SweepPlan

log = logging.getLogger(__name__)

METRIC = "val_acc"
MODE = "max"


class ConfigListSearcher(Searcher):
    """Suggests the given configurations one by one, then reports that the search is finished."""

    CKPT_FILE_TMPL = "config-list-state-{}.json"

    def __init__(self, configs: list[dict[str, Any]], metric: str = METRIC, mode: str = MODE) -> None:
        super().__init__(metric=metric, mode=mode)
        self._configs = [dict(c) for c in configs]
        self._next = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._next >= len(self._configs):
            return Searcher.FINISHED
        config = dict(self._configs[self._next])
        self._next += 1
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # the list does not depend on results

    def save(self, checkpoint_path: str) -> None:
        # Ray renames the file into place after save() returns, so a plain write is already atomic.
        Path(checkpoint_path).write_text(json.dumps({"next": self._next, "configs": self._configs}))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self._next, self._configs = int(state["next"]), list(state["configs"])


class UniqueSearcher(Searcher):
    """Wraps a searcher so that every suggested configuration is new (by `trial_key`).

    Ray saves a wrapper's `get_state()` next to the wrapped searcher's own checkpoint, so the record of
    handed-out configurations survives a resume.
    """

    def __init__(self, searcher: Searcher, space: SearchSpace, max_repeats: int = 32) -> None:
        self.searcher = searcher
        self._space = space
        self._size = len(space.enumerate())
        self._max_repeats = max_repeats
        self._handed: dict[str, str] = {}  # trial key -> Ray trial id
        self._values: dict[str, float] = {}  # trial key -> final metric of the finished trial
        self._keys: dict[str, str] = {}  # Ray trial id -> trial key
        self._inner_ids: dict[str, str] = {}  # Ray trial id -> id the wrapped searcher knows the trial by
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    @property
    def size(self) -> int:
        return self._size

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if len(self._handed) >= self._size:
            log.info("all %d distinct configurations have been tried; the search is complete", self._size)
            return Searcher.FINISHED
        for attempt in range(self._max_repeats + 1):
            inner_id = trial_id if attempt == 0 else f"{trial_id}~repeat{attempt}"
            if attempt == self._max_repeats:
                self._enqueue_unseen()
            config = self.searcher.suggest(inner_id)
            if config is None or config == Searcher.FINISHED:
                return config
            key = trial_key(config)
            if key not in self._handed:
                self._handed[key] = trial_id
                self._keys[trial_id] = key
                self._inner_ids[trial_id] = inner_id
                return config
            self._answer_repeat(inner_id, key)
        log.warning("the searcher keeps proposing tried configurations; waiting for results")
        return None

    def _answer_repeat(self, inner_id: str, key: str) -> None:
        # Tell the sampler what the earlier trial scored, so TPE learns without a second training run.
        if key in self._values:
            self.searcher.on_trial_complete(inner_id, {self.metric: self._values[key]})
        else:  # still running (or failed): no value to give, so the sampler must not count it
            self.searcher.on_trial_complete(inner_id, None, error=True)

    def _enqueue_unseen(self) -> None:
        """Make the wrapped Optuna study's next trial an untried configuration (TPE is stuck on tried ones)."""
        study = getattr(self.searcher, "_ot_study", None)
        if study is None:
            return
        for config in self._space.enumerate():
            if trial_key(config) not in self._handed:
                # Canonical values the sampler never offers (epochs resolved from null) go back to null.
                fixed = {}
                for key, choices in self._space.values.items():
                    if len(choices) > 1:
                        value = config[key] if config[key] in choices else None
                        if value in choices:
                            fixed[key] = value
                study.enqueue_trial(fixed)
                return

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(self._inner_ids.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self._keys.get(trial_id)
        if key is not None and result and not error and self.metric in result:
            self._values[key] = float(result[self.metric])
        self.searcher.on_trial_complete(self._inner_ids.get(trial_id, trial_id), result=result, error=error)

    def get_state(self) -> dict[str, Any]:
        return {
            "handed": dict(self._handed),
            "values": dict(self._values),
            "keys": dict(self._keys),
            "inner_ids": dict(self._inner_ids),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._handed = dict(state.get("handed", {}))
        self._values = dict(state.get("values", {}))
        self._keys = dict(state.get("keys", {}))
        self._inner_ids = dict(state.get("inner_ids", {}))

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(self._inner_ids.get(trial_id, trial_id))

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(self._inner_ids.get(trial_id, trial_id))


class BundlingSearcher(Searcher):
    """Gathers the wrapped searcher's suggestions into bundles by a `BundleRule`: one Ray trial, several
    configurations (TPE's batched asks).

    Each member is asked for under an id of its own (``<trial>~m<n>``) and told its own result when the bundle
    reports or ends, so TPE learns from every configuration as if it had run alone; a suggestion that cannot
    share the bundle being filled waits for the next trial. At most `budget` configurations are handed out
    (sweep.num_samples); Ray saves `get_state` beside the wrapped searcher's checkpoint, so a resumed sweep
    goes on with the same waiting suggestions and members.
    """

    def __init__(self, searcher: Searcher, rule: BundleRule, budget: int) -> None:
        self.searcher = searcher
        self._rule = rule
        self._budget = budget
        self._handed = 0  # configurations handed out in trials
        self._asked = 0  # member ids used
        self._exhausted = False  # the wrapped searcher said FINISHED
        self._waiting: list[tuple[str, dict[str, Any]]] = []  # (member id, configuration) not in a trial yet
        self._members: dict[str, list[tuple[str, str]]] = {}  # Ray trial id -> its (member id, trial key)s
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def _ask(self, trial_id: str, in_hand: int = 0) -> tuple[str, dict[str, Any]] | None:
        """A new suggestion, unless the budget is spent (counting `in_hand`: members of the bundle being filled)."""
        if self._exhausted or self._handed + len(self._waiting) + in_hand >= self._budget:
            return None
        member_id = f"{trial_id}~m{self._asked}"
        self._asked += 1
        config = self.searcher.suggest(member_id)
        if config == Searcher.FINISHED:
            self._exhausted = True
        return (member_id, config) if isinstance(config, dict) else None

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        first = self._waiting.pop(0) if self._waiting else self._ask(trial_id)
        if first is None:
            done = self._exhausted or self._handed >= self._budget
            return Searcher.FINISHED if done else None
        members = [first]
        limit, shared = self._rule.limit(first[1]), self._rule.shared(first[1])
        for item in list(self._waiting):
            if len(members) < limit and self._rule.shared(item[1]) == shared:
                self._waiting.remove(item)
                members.append(item)
        for _ in range(limit - len(members)):
            item = self._ask(trial_id, in_hand=len(members))
            if item is None:
                break
            if self._rule.shared(item[1]) == shared:
                members.append(item)
            else:
                self._waiting.append(item)
        self._handed += len(members)
        self._members[trial_id] = [(member_id, trial_key(config)) for member_id, config in members]
        configs = [config for _, config in members]
        return configs[0] if len(configs) == 1 else {BUNDLE: configs}

    def _own(self, trial_id: str, result: dict | None) -> list[tuple[str, dict | None]]:
        """Each member's id and its own result (a bundle's from MEMBERS; a lone configuration's is the result)."""
        members = self._members.get(trial_id, [(trial_id, "")])
        if len(members) == 1:
            return [(members[0][0], result)]
        by_key = (result or {}).get(MEMBERS) or {}
        return [(member_id, by_key.get(key)) for member_id, key in members]

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        for member_id, own in self._own(trial_id, result):
            if own and isinstance(own.get(self.metric), float) and own.get("state") in (None, "RUNNING"):
                # Tune's report counter, which the wrapped searcher reads (a member's own result lacks it).
                self.searcher.on_trial_result(member_id, {"training_iteration": result.get("training_iteration"),
                                                          **own})

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        for member_id, own in self._own(trial_id, result):
            failed = error or not own or own.get("state") == "FAILED" or self.metric not in own
            self.searcher.on_trial_complete(member_id, result=None if failed else own, error=failed)

    def get_state(self) -> dict[str, Any]:
        return {"handed": self._handed, "asked": self._asked, "exhausted": self._exhausted,
                "waiting": [list(item) for item in self._waiting],
                "members": {k: [list(m) for m in v] for k, v in self._members.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._handed, self._asked = int(state.get("handed", 0)), int(state.get("asked", 0))
        self._exhausted = bool(state.get("exhausted", False))
        self._waiting = [(str(i), dict(c)) for i, c in state.get("waiting", [])]
        self._members = {k: [(str(i), str(key)) for i, key in v] for k, v in state.get("members", {}).items()}

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        for member_id, _ in self._members.get(trial_id, [(trial_id, "")]):
            self.searcher.on_pause(member_id)

    def on_unpause(self, trial_id: str) -> None:
        for member_id, _ in self._members.get(trial_id, [(trial_id, "")]):
            self.searcher.on_unpause(member_id)


def build_searcher(plan: SweepPlan, optuna_seed: int, trials: list[dict[str, Any]] | None = None,
                   rule: BundleRule | None = None) -> Searcher:
    """The Ray trials' configs in order (grid, random: `trials`, the plan's configurations or their bundles), or TPE
    seeded by `optuna_seed` that never repeats a configuration (its suggestions gathered into bundles by `rule`
    where it bundles)."""
    if plan.search != "optuna":
        return ConfigListSearcher(plan.configs if trials is None else trials)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group=True models the conditional space (n_ctx/csc exist only under random init) jointly; fewer
        # random start-up trials than Optuna's 10 so TPE gets to act within a small budget.
        sampler = optuna.samplers.TPESampler(
            seed=optuna_seed, multivariate=True, group=True,
            n_startup_trials=max(2, min(10, plan.num_samples // 2)),
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    inner = OptunaSearch(space=plan.space.define_by_run(), metric=METRIC, mode=MODE, sampler=sampler)
    unique = UniqueSearcher(inner, plan.space)
    return BundlingSearcher(unique, rule, plan.num_samples) if rule is not None and rule.bundles else unique
