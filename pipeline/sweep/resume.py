"""Resume state: what each sweep records when it starts, so that --resume continues the right experiment."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipeline.atomic import write_json_atomic
from pipeline.sweep.plan import SweepError, SweepPlan

OPTIONAL_FIELDS = ("finished", "member_asha")  # added later: a state file written before has none
LATEST_FILE = "latest.json"  # {"name": <the sweep started last under this storage>}
STATE_SUFFIX = ".sweep.json"


@dataclass(frozen=True)
class SweepState:
    """<sweep.storage>/<name>.sweep.json: the experiment a resumed sweep continues, and its MLflow parent run."""

    name: str  # the Ray Tune experiment, <sweep.storage>/<name>
    search: str
    plan: str  # SweepPlan.fingerprint() of the search and space it started with
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    created: str  # ISO time the sweep started
    finished: bool = False  # set when the sweep ends with every trial settled (a killed driver never sets it)
    member_asha: bool = False  # its trials include bundles and ASHA decides per configuration (MemberRungs)

    def check_plan(self, plan: SweepPlan) -> None:
        """A resumed sweep must search the same space it started with."""
        if plan.fingerprint() != self.plan:
            raise SweepError(
                f"sweep {self.name!r} was started with other sweep.space / data settings; resume needs the "
                "params it started with (or start a new sweep without --resume)"
            )


def state_path(storage: Path, name: str) -> Path:
    return storage / f"{name}{STATE_SUFFIX}"


def read_state(storage: Path, resume: str) -> SweepState:
    """The state of the sweep named `resume`, or of the latest one when `resume` is "latest"."""
    name = resume
    if resume == "latest":
        latest = storage / LATEST_FILE
        if not latest.is_file():
            raise SweepError(f"nothing to resume: no sweep has started under {storage} (sweep.storage)")
        name = json.loads(latest.read_text())["name"]
    path = state_path(storage, name)
    if not path.is_file():
        known = sorted(p.name[: -len(STATE_SUFFIX)] for p in storage.glob(f"*{STATE_SUFFIX}"))
        raise SweepError(f"no sweep named {name!r} under {storage}; known: {', '.join(known) or 'none'}")
    try:
        recorded = json.loads(path.read_text())
        return SweepState(**{f.name: recorded[f.name] for f in fields(SweepState) if f.name in recorded
                             or f.name not in OPTIONAL_FIELDS})
    except (ValueError, KeyError, TypeError) as error:
        raise SweepError(f"{path} is not a sweep state file this version can read ({error!r}); "
                         "start a new sweep without --resume") from None


def unfinished_sweeps(storage: Path) -> list[SweepState]:
    """The sweeps under `storage` that never finished (interrupted, or their driver was killed), oldest first."""
    states = []
    for path in sorted(storage.glob(f"*{STATE_SUFFIX}")):
        try:
            state = read_state(storage, path.name[: -len(STATE_SUFFIX)])
        except SweepError:
            continue
        if not state.finished:
            states.append(state)
    return sorted(states, key=lambda s: s.created)


def mark_finished(storage: Path, state: SweepState) -> None:
    """Record that the sweep ended with every trial settled (`unfinished_sweeps` no longer lists it)."""
    write_json_atomic(state_path(storage, state.name), asdict(state) | {"finished": True})


def write_state(storage: Path, state: SweepState) -> None:
    """Record a new sweep's state and make it the one `--resume` (latest) continues."""
    storage.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state_path(storage, state.name), asdict(state))
    write_json_atomic(storage / LATEST_FILE, {"name": state.name})


def rungs_path(storage: Path, name: str) -> Path:
    """Where a sweep with per-configuration ASHA keeps its rungs between driver sessions (MemberRungs.state)."""
    return storage / f"{name}.rungs.json"
