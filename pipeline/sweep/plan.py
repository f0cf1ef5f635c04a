"""The trials a sweep will run (grid, random) or choose from (optuna), their bundles, checked and listed for --dry-run."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError
from pipeline.params import ONLINE_VIEWS, Params
from pipeline.sweep.space import SearchSpace, build_space, check_searchable, trial_key

log = logging.getLogger(__name__)

GPU_PRECISIONS = ("fp16", "amp")

# Column widths of the dry-run table, in the order of its columns.
TABLE_WIDTHS = {"dataset": 14, "protocol": 8, "shots": 5, "seed": 4, "method": 7, "n_ctx": 5, "ctx_init": 16,
                "csc": 5, "class_token_position": 8, "lr": 9, "epochs": 6, "batch_size": 5, "precision": 9}
TABLE_HEADINGS = {"class_token_position": "position", "batch_size": "batch"}


BUNDLE = "bundle"  # a Ray trial's config key holding the configurations of its bundle (absent: one configuration)
MEMBERS = "members"  # a bundle's result: each member's latest result by trial key, with its "state"
# auto bundle size on a GPU: members until a step encodes about this many class prompts. A bf16 step's time grew
# with the prompts from 800 on (14.0 ms at 800, 28.4 at 1,600, 53.0 at 3,200; issue 15, H200), so larger
# bundles gain nothing per configuration and cost memory; below it the card idles (3.6 ms at 100).
GPU_BUNDLE_PROMPTS = 1600
MAX_AUTO_BUNDLE = 64
# auto bundle size on CPUs: none. The step is compute-bound there (bundled steps 1.0-1.3x), so a bundle saves
# only the per-trial overhead, and the demo's sweep in bundles of 3 and 9 ran 0.88-1.15x as fast as unbundled
# (BENCHMARKS.md, "A bundled sweep end to end").
CPU_AUTO_BUNDLE = 1


class SweepError(UserError, RuntimeError):
    """The sweep cannot start or resume; the message says why and what to do."""


def feature_key(dataset: str, shots: int, seed: int) -> str:
    """The key of one (dataset, shots, seed) feature set among those the driver ships to the trials."""
    return f"{dataset}|{shots}|{seed}"


@dataclass
class SweepPlan:
    search: str
    space: SearchSpace
    configs: list[dict[str, Any]]  # grid/random: the trials, in order; optuna: every configuration TPE may pick
    num_samples: int  # trials to run (optuna: at most)
    max_concurrent: int

    @property
    def triples(self) -> list[tuple[str, int, int]]:
        """(dataset, shots, seed) whose features the trials need."""
        return sorted({(c["dataset"], c["shots"], c["seed"]) for c in self.configs})

    def fingerprint(self) -> str:
        """Identifies the search and its space: a resumed sweep must have the same."""
        text = json.dumps({"search": self.search, "space": {k: list(v) for k, v in self.space.values.items()}},
                          sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self, limit: int = 200) -> str:
        """The dry-run listing: what will run, and how many."""
        if self.search == "optuna":
            head = (
                f"optuna (TPE): up to {self.num_samples} trials, chosen adaptively from these "
                f"{len(self.configs)} distinct valid configurations (searching {', '.join(self.space.searched_keys())}):"
            )
        else:
            head = f"{self.search}: {len(self.configs)} trials:"
        lines = [head, "  #    " + " ".join(f"{TABLE_HEADINGS.get(k, k):<{w}}" for k, w in TABLE_WIDTHS.items())
                 + " key"]
        for i, c in enumerate(self.configs[:limit], 1):
            cells = " ".join(f"{_table_cell(c[k]):<{w}}" for k, w in TABLE_WIDTHS.items())
            lines.append(f"  {i:<4} {cells} {trial_key(c)}")
        if len(self.configs) > limit:
            lines.append(f"  ... {len(self.configs) - limit} more")
        count = self.num_samples if self.search == "optuna" else len(self.configs)
        lines.append(f"{count} trial(s) would run ({self.search}; max {self.max_concurrent} at a time).")
        return "\n".join(lines)


def _table_cell(value: Any) -> str:
    if value is None:
        return "-"  # batch_size: train.batch_size
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_sweep(params: Params) -> SweepPlan:
    """The trials to run (grid, random) or to choose from (optuna); SpaceError on a bad or empty space."""
    search = params.sweep.search
    space = build_space(params)
    check_searchable(space, search)
    num_samples, max_concurrent = params.sweep.num_samples, params.sweep.max_concurrent
    if num_samples < 1 or max_concurrent < 1:
        raise SweepError(f"sweep.num_samples (--num-samples) and sweep.max_concurrent (--max-concurrent) must be "
                         f">= 1 (got {num_samples}, {max_concurrent})")
    configs = space.enumerate()
    if search == "random":
        if num_samples > len(configs):
            log.warning("random: only %d distinct valid configurations; running each once", len(configs))
        configs = space.sample(num_samples, params.sweep.optuna_seed)
    elif search == "optuna" and num_samples > len(configs):
        log.warning("optuna: only %d distinct valid configurations; the search ends after trying them all",
                    len(configs))
        num_samples = len(configs)
    if search != "optuna":
        num_samples = len(configs)
    return SweepPlan(search, space, configs, num_samples, max_concurrent)


def check_precision(params: Params, plan: SweepPlan) -> None:
    """fp16/amp trials need a GPU: refuse a plan that asks for them without giving trials one."""
    gpu_wanted = params.sweep.gpus_per_trial > 0 or params.train.device.startswith("cuda")
    needs_gpu = sorted({p for p in plan.space.values["precision"] if p in GPU_PRECISIONS})
    if needs_gpu and not gpu_wanted:
        raise SweepError(
            f"precision {', '.join(needs_gpu)} needs a GPU but trials get none (sweep.gpus_per_trial=0); "
            "set sweep.gpus_per_trial > 0 or sweep.space.precision to fp32/bf16"
        )


def auto_bundle_size(n_classes: int, gpu: bool) -> int:
    """sweep.bundle_size 'auto': on a GPU, enough members for GPU_BUNDLE_PROMPTS class prompts a step (at most
    MAX_AUTO_BUNDLE); on CPUs, CPU_AUTO_BUNDLE."""
    if not gpu:
        return CPU_AUTO_BUNDLE
    return max(1, min(MAX_AUTO_BUNDLE, math.ceil(GPU_BUNDLE_PROMPTS / max(n_classes, 1))))


def members_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The configurations a Ray trial's config trains: a bundle's members, or the configuration itself."""
    return list(config[BUNDLE]) if BUNDLE in config else [config]


@dataclass(frozen=True)
class BundleRule:
    """Which configurations may share a bundle, and how many: sweep.bundle_size on the device trials get.

    Members share what one fused step needs (engine/bundle.py): dataset, protocol and shots (so the class list),
    epochs, precision, batch size and training-set size (so steps per epoch); seeds, prompt variants and learning
    rates may differ. CoCoOp/KgCoOp and online crops train alone. `n_classes`/`n_train`: a configuration's class
    count and training-set size as it trains (the sweep reads them from its features, the cost model from
    statistics)."""

    size: int | str  # sweep.bundle_size
    gpu: bool
    online: bool
    n_classes: Callable[[dict[str, Any]], int]
    n_train: Callable[[dict[str, Any]], int]
    default_batch: int  # train.batch_size, for configurations whose batch_size is null

    @property
    def bundles(self) -> bool:
        """Whether any configuration can get company."""
        return not self.online and self.size != 1 and (self.size != "auto" or self.gpu or CPU_AUTO_BUNDLE > 1)

    def limit(self, config: dict[str, Any]) -> int:
        """The most members a bundle led by `config` may hold."""
        if self.online or config["method"] != "coop":
            return 1
        return self.size if isinstance(self.size, int) else auto_bundle_size(self.n_classes(config), self.gpu)

    def shared(self, config: dict[str, Any]) -> tuple[Any, ...]:
        """What members of one bundle have in common."""
        return (config["dataset"], config["protocol"], config["shots"], config["epochs"], config["precision"],
                config.get("batch_size") or self.default_batch, self.n_train(config))


def form_bundles(configs: Sequence[dict[str, Any]], rule: BundleRule) -> list[dict[str, Any]]:
    """The Ray trials' configs: `configs` in order, those that can share a step gathered into bundles by `rule`
    ({BUNDLE: [members]}), every other one alone. A bundle sits where its first member was."""
    trials: list[list[dict[str, Any]]] = []
    open_bundle: dict[tuple[Any, ...], tuple[int, int]] = {}  # what members share -> (trial index, its limit)
    for config in configs:
        limit, shared = rule.limit(config), rule.shared(config)
        index, limit_then = open_bundle.get(shared, (-1, 0))
        if index >= 0 and len(trials[index]) < min(limit, limit_then):
            trials[index].append(config)
            continue
        trials.append([config])
        if limit > 1:
            open_bundle[shared] = (len(trials) - 1, limit)
    return [members[0] if len(members) == 1 else {BUNDLE: members} for members in trials]


def bundle_rule(params: Params, n_classes: Callable[[dict[str, Any]], int],
                n_train: Callable[[dict[str, Any]], int]) -> BundleRule:
    """The sweep's BundleRule from params (trials get a GPU when sweep.gpus_per_trial > 0 or train.device is CUDA)."""
    gpu = params.sweep.gpus_per_trial > 0 or params.train.device.startswith("cuda")
    return BundleRule(params.sweep.bundle_size, gpu, params.features.views == ONLINE_VIEWS, n_classes, n_train,
                      params.train.batch_size)


def sweep_bundles(search: str, configs: Sequence[dict[str, Any]], rule: BundleRule) -> list[dict[str, Any]]:
    """The Ray trials' configs of grid/random: `form_bundles`; optuna's are formed as TPE suggests them
    (searchers.BundlingSearcher), so its trials are not listed ahead."""
    return list(configs) if search == "optuna" else form_bundles(configs, rule)
