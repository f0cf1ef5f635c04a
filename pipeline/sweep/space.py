"""The sweep's search space: CoOp's conditional hyperparameters, as a deduplicated grid, a random draw or an Optuna space.

CoOp's prompt variants are not a plain product: a word initialisation (``ctx_init``) fixes the context
length to the words' token count and always learns one unified context, so with word init ``n_ctx`` and
``csc`` are not free. Every configuration is therefore canonicalised (word init: ``n_ctx`` := token count,
``csc`` must be false; ``epochs`` null := the per-shot default) and the sweep never spends a trial on an
impossible or duplicate combination:

* grid: the product of all value lists, canonicalised, impossible ones dropped, duplicates removed;
* random: a seeded draw without replacement from that same list;
* optuna: a define-by-run space that asks for ``n_ctx``/``csc`` only under random initialisation
  (duplicates suggested by TPE are caught by `pipeline.sweep.searchers.UniqueSearcher`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.data.fewshot import is_test_only
from pipeline.engine.prompt import POSITIONS, PromptConfig, resolve_n_ctx
from pipeline.engine.train import default_epochs
from pipeline.errors import UserError
from pipeline.params import PRECISIONS, SEARCHES, Params, SweepParams

if TYPE_CHECKING:
    import optuna

DATA_KEYS = ("dataset", "shots", "seed")
HYPER_KEYS = ("n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs", "precision")
CONFIG_KEYS = DATA_KEYS + HYPER_KEYS  # every trial config holds exactly these keys
assert set(CONFIG_KEYS) == set(SweepParams.SPACE_KEYS)


class SpaceError(UserError, ValueError):
    """sweep.space is malformed, or the search cannot run on it; the message names the key."""


def _check_value(key: str, value: Any) -> Any:
    """One candidate value of `key`, type-checked and normalised; SpaceError names the key."""
    where = f"sweep.space.{key}"
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key == "dataset":
        if not isinstance(value, str) or not value.strip():
            raise SpaceError(f"{where}: dataset names are non-empty strings, got {value!r}")
        return value.strip()
    if key in ("shots", "n_ctx"):
        if not is_int or value < 1:
            raise SpaceError(f"{where}: expected integers >= 1, got {value!r}")
        return value
    if key == "seed":
        if not is_int:
            raise SpaceError(f"{where}: expected integers, got {value!r}")
        return value
    if key == "ctx_init":
        if value is None:
            return ""
        if not isinstance(value, str):
            raise SpaceError(f'{where}: expected strings ("" = random init), got {value!r}')
        return " ".join(value.split())
    if key == "csc":
        if not isinstance(value, bool):
            raise SpaceError(f"{where}: expected true/false, got {value!r}")
        return value
    if key == "class_token_position":
        if value not in POSITIONS:
            raise SpaceError(f"{where}: expected one of {', '.join(POSITIONS)}, got {value!r}")
        return value
    if key == "lr":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
            raise SpaceError(f"{where}: expected positive numbers, got {value!r}")
        return float(value)
    if key == "epochs":
        if value is None:
            return None
        if not is_int or value < 1:
            raise SpaceError(f"{where}: expected integers >= 1 or null (CoOp's per-shot default), got {value!r}")
        return value
    if key == "precision":
        if value not in PRECISIONS:
            raise SpaceError(f"{where}: expected one of {', '.join(PRECISIONS)}, got {value!r}")
        return value
    raise SpaceError(f"unknown key 'sweep.space.{key}'; allowed: {', '.join(sorted(CONFIG_KEYS))}")


def trial_key(config: dict[str, Any]) -> str:
    """Deterministic id of a canonical configuration: the same trial gets the same key in every process."""
    canonical = {k: config[k] for k in CONFIG_KEYS}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_label(config: dict[str, Any], epochs: bool = True) -> str:
    """Human-readable name of a configuration without its data keys (what summaries group by).

    epochs=False leaves the epochs out: the name of a configuration across shots when its epochs follow
    CoOp's per-shot schedule (the plots' lines).
    """
    init = f"init='{config['ctx_init']}'" if config["ctx_init"] else f"n_ctx={config['n_ctx']}"
    parts = [init, "csc" if config["csc"] else "unified", config["class_token_position"], f"lr={config['lr']:g}"]
    if epochs:
        parts.append(f"ep={config['epochs']}")
    parts.append(config["precision"])
    return " ".join(parts)


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per key (deduplicated, in the order given) and how to canonicalise a combination."""

    values: dict[str, tuple[Any, ...]]
    train_epochs: int | None = None  # train.epochs: what epochs=null means before CoOp's per-shot default

    def canonical(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """The configuration a combination really trains, or None when it is impossible."""
        config = {k: raw[k] for k in CONFIG_KEYS}
        if config["ctx_init"]:
            if config["csc"]:
                return None  # CoOp initialises only a unified context from words
            config["n_ctx"] = resolve_n_ctx(PromptConfig(n_ctx=1, ctx_init=config["ctx_init"]))
        if config["epochs"] is None:
            config["epochs"] = self.train_epochs or default_epochs(config["dataset"], config["shots"])
        return config

    def enumerate(self) -> list[dict[str, Any]]:
        """Every distinct valid configuration, seeds of one setting adjacent."""
        order = [k for k in CONFIG_KEYS if k != "seed"] + ["seed"]
        seen: set[str] = set()
        out = []
        for combo in itertools.product(*(self.values[k] for k in order)):
            config = self.canonical(dict(zip(order, combo, strict=True)))
            if config is None:
                continue
            key = trial_key(config)
            if key not in seen:
                seen.add(key)
                out.append(config)
        return out

    def searched_keys(self) -> list[str]:
        """Hyperparameters with a real choice (dataset, shots and seed are axes, not things to optimise)."""
        # Judged on canonical configs within one dataset x shots x seed: word init can pin n_ctx and csc,
        # and epochs=null varies with shots without being a choice.
        choices: dict[tuple, dict[str, set[str]]] = {}
        for config in self.enumerate():
            group = choices.setdefault(tuple(config[k] for k in DATA_KEYS), {k: set() for k in HYPER_KEYS})
            for k in HYPER_KEYS:
                group[k].add(json.dumps(config[k]))
        return [k for k in HYPER_KEYS if any(len(group[k]) > 1 for group in choices.values())]

    def sample(self, n: int, seed: int) -> list[dict[str, Any]]:
        """A seeded draw of min(n, size) distinct valid configurations."""
        configs = self.enumerate()
        return random.Random(seed).sample(configs, min(n, len(configs)))

    def define_by_run(self) -> OptunaSpace:
        """Optuna's conditional space: n_ctx and csc are asked for only under random initialisation."""
        return OptunaSpace(self)


@dataclass(frozen=True)
class OptunaSpace:
    """Define-by-run function for OptunaSearch; a class, not a closure, because Ray pickles the searcher."""

    space: SearchSpace

    @staticmethod
    def _pick(trial: optuna.Trial, key: str, choices: tuple[Any, ...]) -> Any:
        # A single choice is a constant, not a distribution: TPE should not model it.
        return choices[0] if len(choices) == 1 else trial.suggest_categorical(key, list(choices))

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        values = self.space.values
        word_init_ok = False in values["csc"]
        inits = tuple(v for v in values["ctx_init"] if not v or word_init_ok)
        raw = {k: self._pick(trial, k, values[k]) for k in DATA_KEYS}
        raw["ctx_init"] = self._pick(trial, "ctx_init", inits)
        if raw["ctx_init"]:
            raw["n_ctx"], raw["csc"] = values["n_ctx"][0], False  # canonical() replaces n_ctx
        else:
            raw["n_ctx"] = self._pick(trial, "n_ctx", values["n_ctx"])
            raw["csc"] = self._pick(trial, "csc", values["csc"])
        for key in ("class_token_position", "lr", "epochs", "precision"):
            raw[key] = self._pick(trial, key, values[key])
        config = self.space.canonical(raw)
        assert config is not None  # inits excludes word init when csc cannot be false
        return config


def build_space(params: Params) -> SearchSpace:
    """sweep.space with defaults filled in: data.* for dataset/shots/seed, train.* and CoOp's defaults for the rest."""
    raw = dict(params.sweep.space)
    for key in raw:
        if key not in CONFIG_KEYS:
            raise SpaceError(f"unknown key 'sweep.space.{key}'; allowed: {', '.join(sorted(CONFIG_KEYS))}")
    defaults: dict[str, list[Any]] = {
        # Shifted test sets (ImageNet-V2, WorldSketchV2, ...) are evaluated by domain_shift, never trained on.
        "dataset": [d for d in params.data.datasets if not is_test_only(params.data.splits_dir, d)],
        "shots": list(params.data.shots),
        "seed": list(params.data.seeds),
        "n_ctx": [PromptConfig().n_ctx],
        "ctx_init": [PromptConfig().ctx_init],
        "csc": [PromptConfig().csc],
        "class_token_position": [PromptConfig().class_token_position],
        "lr": [params.train.lr],
        "epochs": [params.train.epochs],
        "precision": [params.train.precision],
    }
    values: dict[str, tuple[Any, ...]] = {}
    for key in CONFIG_KEYS:
        given = raw.get(key, defaults[key])
        given = given if isinstance(given, list) else [given]  # a scalar fixes the key
        if not given:
            raise SpaceError(f"sweep.space.{key} is an empty list: give at least one value (or drop the key)")
        checked = [_check_value(key, v) for v in given]
        values[key] = tuple(dict.fromkeys(checked))  # drop repeats, keep order
    space = SearchSpace(values, params.train.epochs)
    if not space.enumerate():
        raise SpaceError(
            "sweep.space has no valid combination: a word initialisation (ctx_init) cannot be combined with "
            "csc: true (CoOp initialises only a unified context from words); add false to sweep.space.csc "
            'or "" to sweep.space.ctx_init'
        )
    return space


def check_searchable(space: SearchSpace, search: str) -> None:
    """Refuse a search that has nothing to choose; SpaceError says what to add."""
    if search not in SEARCHES:
        raise SpaceError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")
    if search == "optuna" and not space.searched_keys():
        fixed = ", ".join(f"{k}={space.values[k][0]!r}" for k in HYPER_KEYS)
        raise SpaceError(
            "--search optuna has nothing to search: every hyperparameter in sweep.space has a single value "
            f"({fixed}). Give at least one of {', '.join(HYPER_KEYS)} two or more values in sweep.space, or "
            "use --search grid to run the dataset x shots x seed grid."
        )


def max_epochs(configs: list[dict[str, Any]]) -> int:
    return max(c["epochs"] for c in configs)
