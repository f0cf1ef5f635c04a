"""The trials a sweep will run (grid, random) or choose from (optuna), checked and listed for --dry-run."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.sweep.space import SearchSpace, build_space, check_searchable, trial_key

log = logging.getLogger(__name__)

GPU_PRECISIONS = ("fp16", "amp")

# Column widths of the dry-run table, in the order of its columns.
TABLE_WIDTHS = {"dataset": 14, "protocol": 8, "shots": 5, "seed": 4, "method": 7, "n_ctx": 5, "ctx_init": 16,
                "csc": 5, "class_token_position": 8, "lr": 9, "epochs": 6, "batch_size": 5, "precision": 9}
TABLE_HEADINGS = {"class_token_position": "position", "batch_size": "batch"}


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
