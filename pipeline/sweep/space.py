"""The sweep's search space: the methods' conditional hyperparameters, as a deduplicated grid, a random draw or an Optuna space.

CoOp's prompt variants are not a plain product: a word initialisation (``ctx_init``) fixes the context
length to the words' token count and always learns one unified context, so with word init ``n_ctx`` and
``csc`` are not free. The methods add their own conditions: CoCoOp and KgCoOp learn a unified context,
cross-dataset transfer (``protocol: xd``) needs one (a class-specific context has no rows for another
dataset's classes), and each method's own hyperparameter (KgCoOp's ``kg_weight``, CoCoOp's
``meta_reduction``) exists only for it. Every configuration is therefore canonicalised (word init:
``n_ctx`` := token count; ``epochs``/``batch_size`` null := the method's default; a hyperparameter of
another method := null) and the sweep never spends a trial on an impossible or duplicate combination:

* grid: the product of all value lists, canonicalised, impossible ones dropped, duplicates removed;
* random: a seeded draw without replacement from that same list;
* optuna: a define-by-run space that asks for a key only where it applies
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
from pipeline.data.protocols import FEWSHOT, PROTOCOLS, XD
from pipeline.engine.methods import COCOOP, COOP, KGCOOP, METHODS, OFFICIAL_RECIPES, MethodConfig
from pipeline.engine.prompt import POSITIONS, PromptConfig, resolve_n_ctx
from pipeline.engine.train import default_epochs
from pipeline.errors import UserError
from pipeline.params import PRECISIONS, SEARCHES, Params, SweepParams

if TYPE_CHECKING:
    import optuna

DATA_KEYS = ("dataset", "protocol", "shots", "seed")
HYPER_KEYS = ("method", "n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs", "batch_size", "precision",
              "kg_weight", "meta_reduction")
CONFIG_KEYS = DATA_KEYS + HYPER_KEYS  # every trial config holds exactly these keys
assert set(CONFIG_KEYS) == set(SweepParams.SPACE_KEYS)
# Keys added after sweeps were first recorded, with the value every earlier trial had: a trial key leaves a
# key out at that value, so a CoOp few-shot trial keeps the key (and MLflow run, for --resume) it always had.
LATER_KEYS = {"protocol": FEWSHOT, "method": COOP, "batch_size": None, "kg_weight": None, "meta_reduction": None}
# Each method's own hyperparameter (engine.methods.METHOD_HYPERPARAMETERS), null for the other methods.
OWN_KEYS = {"kg_weight": KGCOOP, "meta_reduction": COCOOP}


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
    if key == "protocol":
        if value not in PROTOCOLS:
            raise SpaceError(f"{where}: expected one of {', '.join(PROTOCOLS)}, got {value!r}")
        return value
    if key == "method":
        if value not in METHODS:
            raise SpaceError(f"{where}: unknown method {value!r}; expected one of {', '.join(METHODS)}")
        return value
    if key == "batch_size":
        if value is None:
            return None
        if not is_int or value < 1:
            raise SpaceError(f"{where}: expected integers >= 1 or null (train.batch_size; CoCoOp's and "
                             f"KgCoOp's official batch sizes for those methods), got {value!r}")
        return value
    if key == "kg_weight":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise SpaceError(f"{where}: expected finite numbers >= 0 (KgCoOp's scripts use 8.0), got {value!r}")
        return float(value)
    if key == "meta_reduction":
        if not is_int or value < 1:
            raise SpaceError(f"{where}: expected integers >= 1 (CoCoOp's is 16), got {value!r}")
        return value
    raise SpaceError(f"unknown key 'sweep.space.{key}'; allowed: {', '.join(sorted(CONFIG_KEYS))}")


def complete(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration with every CONFIG_KEY: one recorded before a key existed (a resumed sweep's) gets the
    value all its trials had (LATER_KEYS)."""
    return {k: config[k] if k in config else LATER_KEYS[k] for k in CONFIG_KEYS}


def trial_key(config: dict[str, Any]) -> str:
    """Deterministic id of a canonical configuration: the same trial gets the same key in every process."""
    config = complete(config)
    canonical = {k: config[k] for k in CONFIG_KEYS if k not in LATER_KEYS or config[k] != LATER_KEYS[k]}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_label(config: dict[str, Any], epochs: bool = True) -> str:
    """Human-readable name of a configuration without its data keys (what summaries group by).

    epochs=False leaves the epochs out: the name of a configuration across shots when its epochs follow
    CoOp's per-shot schedule (the plots' lines).
    """
    init = f"init='{config['ctx_init']}'" if config["ctx_init"] else f"n_ctx={config['n_ctx']}"
    parts = [init, "csc" if config["csc"] else "unified", config["class_token_position"], f"lr={config['lr']:g}"]
    method = config.get("method", COOP)
    if method == KGCOOP:
        parts.insert(0, f"kgcoop(λ={config['kg_weight']:g})")
    elif method == COCOOP:
        parts.insert(0, f"cocoop(r={config['meta_reduction']})")
    if epochs:
        parts.append(f"ep={config['epochs']}")
    if config.get("batch_size") is not None:
        parts.append(f"bs={config['batch_size']}")
    parts.append(config["precision"])
    return " ".join(parts)


def impossible(config: dict[str, Any]) -> str:
    """Why a combination cannot be trained ("" if it can): the conditions in the module docstring."""
    if not config["csc"]:
        return ""
    if config["ctx_init"]:
        return "a word initialisation (ctx_init) learns one unified context (CoOp initialises only that from words)"
    if config["method"] != COOP:
        return f"method {config['method']} learns one context for all classes"
    if config["protocol"] == XD:
        return "cross-dataset transfer (protocol xd) needs a unified context: a class-specific one has no rows " \
               "for another dataset's classes"
    return ""


@dataclass(frozen=True)
class SearchSpace:
    """Candidate values per key (deduplicated, in the order given) and how to canonicalise a combination."""

    values: dict[str, tuple[Any, ...]]
    train_epochs: int | None = None  # train.epochs: what epochs=null means before CoOp's per-shot default

    def canonical(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """The configuration a combination really trains, or None when it is impossible (`impossible` says why)."""
        if impossible(raw):
            return None
        config = {k: raw[k] for k in CONFIG_KEYS}
        method = config["method"]
        if config["ctx_init"]:
            config["n_ctx"] = resolve_n_ctx(PromptConfig(n_ctx=1, ctx_init=config["ctx_init"]))
        recipe = OFFICIAL_RECIPES.get(method, {})
        if config["epochs"] is None:
            config["epochs"] = self.train_epochs or recipe.get("epochs") or default_epochs(config["dataset"],
                                                                                           config["shots"])
        if config["batch_size"] is None:
            config["batch_size"] = recipe.get("batch_size")  # CoOp's null: train.batch_size, as before methods
        for key, owner in OWN_KEYS.items():
            if method != owner:
                config[key] = None
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
        # Only a unified context fits word init, CoCoOp, KgCoOp and transfer: offer those only if csc may be false.
        unified_ok = False in values["csc"]
        raw = {k: self._pick(trial, k, values[k]) for k in ("dataset", "shots", "seed")}
        raw["protocol"] = self._pick(trial, "protocol", tuple(p for p in values["protocol"] if p != XD or unified_ok))
        raw["method"] = self._pick(trial, "method", tuple(m for m in values["method"] if m == COOP or unified_ok))
        raw["ctx_init"] = self._pick(trial, "ctx_init", tuple(v for v in values["ctx_init"] if not v or unified_ok))
        if raw["ctx_init"]:
            raw["n_ctx"] = values["n_ctx"][0]  # canonical() replaces it by the words' token count
        else:
            raw["n_ctx"] = self._pick(trial, "n_ctx", values["n_ctx"])
        if raw["ctx_init"] or raw["method"] != COOP or raw["protocol"] == XD:
            raw["csc"] = False
        else:
            raw["csc"] = self._pick(trial, "csc", values["csc"])
        for key in ("class_token_position", "lr", "epochs", "batch_size", "precision"):
            raw[key] = self._pick(trial, key, values[key])
        for key, owner in OWN_KEYS.items():  # asked only of the method it belongs to
            raw[key] = self._pick(trial, key, values[key]) if raw["method"] == owner else None
        config = self.space.canonical(raw)
        assert config is not None  # the choices above exclude every impossible combination
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
        "protocol": [FEWSHOT],
        "method": [COOP],
        "batch_size": [None],
        "kg_weight": [MethodConfig().kg_weight],
        "meta_reduction": [MethodConfig().meta_reduction],
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
    check_possible(space)
    return space


def check_possible(space: SearchSpace) -> None:
    """SpaceError when the space, or a listed method or protocol, would get no trial: all its combinations are
    impossible. (A word initialisation that csc: true rules out for some settings is only dropped there.)"""
    configs = space.enumerate()
    for key in ("protocol", "method"):
        for value in space.values[key]:
            if any(c[key] == value for c in configs):
                continue
            raws = (dict(zip(space.values, combo, strict=True)) for combo in itertools.product(*space.values.values()))
            why = next(impossible(raw) for raw in raws if raw[key] == value)
            raise SpaceError(
                f"sweep.space.{key}: {value!r} has no valid combination in sweep.space: {why}, yet sweep.space.csc "
                "is [true]; add false to sweep.space.csc (or drop that value)")
    if not configs:
        raise SpaceError(
            "sweep.space has no valid combination: a word initialisation (ctx_init) cannot be combined with "
            "csc: true (CoOp initialises only a unified context from words); add false to sweep.space.csc "
            'or "" to sweep.space.ctx_init'
        )


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
