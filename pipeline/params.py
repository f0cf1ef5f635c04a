"""params.yaml: typed sections, validated on load with errors that name the bad key."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.errors import UserError

# The official `PREC: fp16`: CLIP and the context parameter itself in fp16, plain SGD on it (no fp32 master
# copy, no loss scaling), so updates below half an fp16 ulp of a context value are lost. Our `fp16` keeps an
# fp32 master context with a GradScaler instead; see docs/fidelity.md.
OFFICIAL_FP16 = "fp16-official"
PRECISIONS = ("fp32", "bf16", "fp16", "amp", OFFICIAL_FP16)  # train.precision (engine.prompt.compute_dtype)
SEARCHES = ("grid", "random", "optuna")  # sweep.search (pipeline/sweep/plan.py, searchers.py)
# sweep.name (--name): a folder under sweep.storage and an MLflow run name, so a plain file name
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ONLINE_VIEWS = "online"  # features.views of the exact official augmentation: fresh crops every epoch, none cached


class ParamsError(UserError, ValueError):
    """params.yaml (or another --params file) has a bad key or value."""


def check_views(value: Any) -> int | str:
    """`value` if it is a valid features.views (a number of cached views >= 1, or ONLINE_VIEWS), else ParamsError."""
    if value == ONLINE_VIEWS or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ParamsError(
        f"features.views must be >= 1 (an integer: views cached per training image) or {ONLINE_VIEWS!r} (a fresh "
        f"crop every epoch), got {value!r}"
    )


@dataclass(frozen=True)
class DataParams:
    root: str = "data/demo"
    datasets: list[str] = field(default_factory=lambda: ["FashionMNIST"])
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    splits_dir: str = "outputs/splits"
    fewshot_repeat: bool = False  # true: classes with < K images drawn with replacement (Dassl before Oct 2021)


@dataclass(frozen=True)
class BackboneParams:
    arch: str = "coop-tiny"
    pretrained: str | None = None  # open_clip tag, checkpoint file, or null for (seeded) random weights


@dataclass(frozen=True)
class FeatureParams:
    dir: str = "outputs/features"
    # Augmented views cached per training image (1 = no augmentation), or "online": the exact official
    # augmentation, a fresh crop of every training image every epoch, encoded during training.
    views: int | str = 4
    views_per_seed: bool = True  # cached views differ between split seeds (the official runs' crops do)
    dtype: str = "fp16"
    batch_size: int = 128
    seed: int = 0
    online_workers: int | None = None  # views: online: image-decoding processes per trial; null: cpus_per_trial - 1


@dataclass(frozen=True)
class TrainParams:
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int | None = None  # null: CoOp's per-shot default
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 32
    eval_every: int = 0
    precision: str = "fp32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    shared_prefix: bool | None = None  # null: automatic (always on CPUs; on GPUs when it saves enough)
    pack_tokens: bool | None = None  # null: automatic (CPU: whenever prompts differ in length; GPU: by size)
    cuda_graph: bool = True  # on a GPU, replay each step's text path as one CUDA graph (not with amp)


@dataclass(frozen=True)
class SweepParams:
    # Keys sweep.space may hold; dataset/shots/seed default to data.*, the rest to train.* / CoOp's defaults.
    SPACE_KEYS: ClassVar[tuple[str, ...]] = (
        "dataset", "protocol", "shots", "seed", "method", "n_ctx", "ctx_init", "csc", "class_token_position", "lr",
        "epochs", "batch_size", "precision", "kg_weight", "meta_reduction",
    )

    search: str = "grid"  # one of SEARCHES
    num_samples: int = 8  # trials for random/optuna; grid runs every distinct combination once
    max_concurrent: int = 2
    space: dict[str, list[Any]] = field(default_factory=dict)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU between trials
    asha: bool = False  # early-stop on val_acc; needs train.eval_every > 0
    asha_grace_epochs: int = 10
    asha_reduction_factor: int = 3
    retries: int = 0  # Ray restarts of a failed trial (FailureConfig.max_failures)
    optuna_seed: int = 0  # seeds TPE and the random search's draw
    storage: str = "outputs/ray"  # Ray Tune experiment folder (made absolute)
    results_dir: str = "outputs/sweep"
    address: str | None = None  # Ray cluster address (host:port); null: a local Ray instance
    name: str | None = None  # Ray experiment name; null: <search>-<timestamp>
    nearest_words: int = 3  # vocabulary words listed per learned context vector
    # CoOp configurations one Ray trial trains together in one fused step (pipeline/engine/bundle.py), each with its
    # own MLflow run; "auto": by device and class count (pipeline/sweep/plan.py::auto_bundle_size); 1: no bundles.
    bundle_size: int | str = "auto"


@dataclass(frozen=True)
class TrackingParams:
    uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are made absolute; MLFLOW_TRACKING_URI overrides
    experiment: str = "coop"
    check_timeout_s: float = 5.0  # how long the start-up check waits for a tracking server
    # How long a trial rides out a tracking server that stopped answering (connection refused, timeouts, HTTP
    # 5xx): it keeps training, holds its metrics and retries with backoff; past this many seconds since the
    # first failed call the trial fails with a TrackingError that says so.
    outage_limit_s: float = 300.0


@dataclass(frozen=True)
class ReportParams:
    dir: str = "outputs/report"
    baselines_dir: str = "outputs/baselines"  # zero-shot / linear-probe / domain-shift tables


@dataclass(frozen=True)
class BaselineParams:
    # Linear-probe protocols the baselines stage runs, each a row per split in baselines.csv.
    PROTOCOLS: ClassVar[dict[str, str]] = {
        "lpclip": "the official CoOp lpclip/ probe: un-augmented features, coarse + binary C search",
        "grid": "ours: a 13-value C grid on normalised features of every cached augmented view",
    }

    linear_probe_protocols: list[str] = field(default_factory=lambda: ["lpclip"])


@dataclass(frozen=True)
class DomainShiftParams:
    # Contexts learned on `source` are evaluated on each of `targets` that data.datasets lists: test sets of
    # the source's classes (all, or a subset matched by ImageNet label or else by class name).
    source: str = "ImageNet"
    targets: list[str] = field(
        default_factory=lambda: ["ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR"]
    )


@dataclass(frozen=True)
class TransferParams:
    # Cross-dataset transfer (sweep.space.protocol: xd): a context learned on a trial's dataset is evaluated on
    # the test sets of `targets` with their class names; null: every other trainable dataset of data.datasets.
    targets: list[str] | None = None


@dataclass(frozen=True)
class PretrainParams:
    """Pretraining a small CLIP on the synthetic world (pipeline/pretrain.py, stage `pretrain`)."""

    # open_clip architecture: coop-tiny-rn (coop-tiny's text tower, a tiny ResNet image tower: it learns shapes
    # several times faster per step than coop-tiny's 2-layer ViT), coop-tiny, or another in engine/model_configs
    arch: str = "coop-tiny-rn"
    corpus_seed: int = 0  # the world's image-caption pairs and held-out sets are drawn from this seed
    corpus_size: int = 100_000  # training pairs (passes over them: steps * batch_size / corpus_size)
    heldout_size: int = 2048  # held-out pairs for the held-out contrastive loss
    zero_shot_size: int = 800  # images per held-out zero-shot task (shape, colour)
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3  # AdamW peak learning rate: linear warm-up, then cosine to 0
    weight_decay: float = 0.1  # not on gains, biases, the temperature
    warmup_steps: int = 100
    seed: int = 0  # initial weights and batch order
    threads: int = 1  # torch CPU threads: the result's bits depend on it (and 1 is fastest on a busy 2-core box)
    eval_every: int = 500  # held-out loss and zero-shot accuracy every k steps (and at the end)
    out: str = "models/coop-tiny-world.safetensors"  # the checkpoint; its card is the same path with .json


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    backbone: BackboneParams = field(default_factory=BackboneParams)
    features: FeatureParams = field(default_factory=FeatureParams)
    train: TrainParams = field(default_factory=TrainParams)
    sweep: SweepParams = field(default_factory=SweepParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    report: ReportParams = field(default_factory=ReportParams)
    baselines: BaselineParams = field(default_factory=BaselineParams)
    domain_shift: DomainShiftParams = field(default_factory=DomainShiftParams)
    transfer: TransferParams = field(default_factory=TransferParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{key}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ParamsError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: expected a mapping of keys (`key: value` lines), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamsError(f"unknown key {where!r}{hint}; allowed here: {', '.join(sorted(names))}")
    values = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**values)


def _validate(p: Params) -> None:
    if not p.data.datasets:
        raise ParamsError("data.datasets is empty: name at least one dataset")
    for key, values in (("data.shots", p.data.shots), ("data.seeds", p.data.seeds)):
        if not values:
            raise ParamsError(f"{key} is empty")
    if any(s < 1 for s in p.data.shots):
        raise ParamsError(f"data.shots must be >= 1, got {p.data.shots}")
    check_views(p.features.views)
    if p.features.online_workers is not None and p.features.online_workers < 0:
        raise ParamsError(f"features.online_workers must be >= 0 or null, got {p.features.online_workers}")
    if p.features.dtype not in ("fp16", "fp32"):
        raise ParamsError(f"features.dtype must be fp16 or fp32, got {p.features.dtype!r}")
    if p.train.precision not in PRECISIONS:
        raise ParamsError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {p.train.precision!r}")
    if p.train.epochs is not None and p.train.epochs < 1:
        raise ParamsError(f"train.epochs must be >= 1 or null, got {p.train.epochs}")
    for key, value, low, strict in (  # `not value >= low` also refuses NaN
        ("train.lr", p.train.lr, 0, True),
        ("train.momentum", p.train.momentum, 0, False),
        ("train.weight_decay", p.train.weight_decay, 0, False),
        ("train.warmup_epochs", p.train.warmup_epochs, 0, False),
        ("train.warmup_lr", p.train.warmup_lr, 0, False),
        ("train.batch_size", p.train.batch_size, 1, False),
        ("train.eval_every", p.train.eval_every, 0, False),
        ("features.batch_size", p.features.batch_size, 1, False),
    ):
        if not (value > low if strict else value >= low):
            raise ParamsError(f"{key} must be {'>' if strict else '>='} {low}, got {value}")
    if p.sweep.search not in SEARCHES:
        raise ParamsError(f"sweep.search must be one of {', '.join(SEARCHES)}, got {p.sweep.search!r}")
    if p.sweep.name is not None and not SWEEP_NAME.fullmatch(p.sweep.name):
        raise ParamsError(f"sweep.name (--name) {p.sweep.name!r} is not a plain name: use up to 100 letters, "
                          "digits, '.', '_' or '-', starting with a letter or digit (it names a folder under "
                          "sweep.storage)")
    for key in p.sweep.space:
        if key not in SweepParams.SPACE_KEYS:
            raise ParamsError(
                f"unknown key 'sweep.space.{key}'; allowed here: {', '.join(sorted(SweepParams.SPACE_KEYS))}"
            )
        if p.sweep.space[key] == []:
            raise ParamsError(f"sweep.space.{key} is an empty list: give at least one value (or drop the key)")
    for key, value, low in (
        ("sweep.num_samples", p.sweep.num_samples, 1),
        ("sweep.max_concurrent", p.sweep.max_concurrent, 1),
        ("sweep.asha_grace_epochs", p.sweep.asha_grace_epochs, 1),
        ("sweep.asha_reduction_factor", p.sweep.asha_reduction_factor, 2),
        ("sweep.retries", p.sweep.retries, 0),
        ("sweep.nearest_words", p.sweep.nearest_words, 1),
    ):
        if value < low:
            raise ParamsError(f"{key} must be >= {low}, got {value}")
    size = p.sweep.bundle_size
    if size != "auto" and not (isinstance(size, int) and size >= 1):
        raise ParamsError(f"sweep.bundle_size (--bundle-size) must be 'auto' or an integer >= 1 (1: one configuration "
                          f"per trial), got {size!r}")
    if p.sweep.cpus_per_trial <= 0 or p.sweep.gpus_per_trial < 0:
        raise ParamsError(
            f"sweep.cpus_per_trial must be > 0 and sweep.gpus_per_trial >= 0, got "
            f"{p.sweep.cpus_per_trial} and {p.sweep.gpus_per_trial}"
        )
    if not p.tracking.uri.strip() or not p.tracking.experiment.strip():
        raise ParamsError("tracking.uri and tracking.experiment must not be empty")
    if p.tracking.check_timeout_s <= 0:
        raise ParamsError(f"tracking.check_timeout_s must be > 0, got {p.tracking.check_timeout_s}")
    if not p.tracking.outage_limit_s > 0:  # also refuses NaN
        raise ParamsError(f"tracking.outage_limit_s must be > 0 (seconds a trial waits for a tracking server "
                          f"that stopped answering), got {p.tracking.outage_limit_s}")
    protocols = p.baselines.linear_probe_protocols
    unknown = [name for name in protocols if name not in BaselineParams.PROTOCOLS]
    if unknown or not protocols or len(set(protocols)) != len(protocols):
        choices = "; ".join(f"{k} ({v})" for k, v in BaselineParams.PROTOCOLS.items())
        problem = f"unknown protocol(s) {unknown}" if unknown else "needs distinct protocols, at least one"
        raise ParamsError(f"baselines.linear_probe_protocols {problem}, got {protocols}; choose from: {choices}")
    shift = p.domain_shift
    if not shift.source.strip() or any(not t.strip() for t in shift.targets):
        raise ParamsError(f"domain_shift.source and domain_shift.targets must name datasets, got source "
                          f"{shift.source!r} and targets {shift.targets}")
    targets = p.transfer.targets
    if targets is not None and (not targets or any(not t.strip() for t in targets) or len(set(targets)) != len(targets)):
        raise ParamsError(f"transfer.targets must be null (every other dataset of data.datasets) or a list of "
                          f"distinct dataset names, got {targets}")
    if shift.source in shift.targets or len(set(shift.targets)) != len(shift.targets):
        raise ParamsError(f"domain_shift.targets must be distinct datasets other than the source "
                          f"{shift.source!r}, got {shift.targets}")


def _validate_pretrain(p: PretrainParams) -> None:
    for key, value, low in (
        ("corpus_size", p.corpus_size, 1),
        ("heldout_size", p.heldout_size, 1),
        ("zero_shot_size", p.zero_shot_size, 1),
        ("steps", p.steps, 1),
        ("batch_size", p.batch_size, 2),
        ("warmup_steps", p.warmup_steps, 0),
        ("eval_every", p.eval_every, 1),
        ("threads", p.threads, 1),
    ):
        if value < low:
            raise ParamsError(f"pretrain.{key} must be >= {low}, got {value}")
    if p.batch_size > p.corpus_size:
        raise ParamsError(f"pretrain.batch_size ({p.batch_size}) must not exceed pretrain.corpus_size "
                          f"({p.corpus_size})")
    if p.warmup_steps >= p.steps:
        raise ParamsError(f"pretrain.warmup_steps ({p.warmup_steps}) must be below pretrain.steps ({p.steps})")
    if p.lr <= 0 or p.weight_decay < 0:
        raise ParamsError(f"pretrain.lr must be > 0 and pretrain.weight_decay >= 0, got {p.lr}, {p.weight_decay}")
    if not p.out.endswith(".safetensors"):
        raise ParamsError(f"pretrain.out must be a .safetensors path, got {p.out!r}")


def override(params: Params, **sections: dict[str, Any]) -> Params:
    """`params` with, per section, the keys whose new value is not None replaced, checked like a params file.

    What commands do with their flags: ``override(params, data={"shots": args.shots})``; a bad value raises
    ParamsError naming the key, exactly as if it had been written in params.yaml.
    """
    changed = {}
    for name, values in sections.items():
        section = getattr(params, name)
        hints = typing.get_type_hints(type(section))
        given = {
            key: _check(str(value) if isinstance(value, Path) else value, hints[key], f"{name}.{key}")
            for key, value in values.items()
            if value is not None
        }
        if given:
            changed[name] = dataclasses.replace(section, **given)
    result = dataclasses.replace(params, **changed)
    _validate(result)
    return result


def params_from_dict(raw: dict[str, Any]) -> Params:
    params = _build(Params, raw, "")
    _validate(params)
    _validate_pretrain(params.pretrain)
    return params


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; ParamsError (one line) names the file and the offending key or line."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ParamsError(f"params file {path} {problem}; pass --params with an existing YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 YAML") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = _one_line(getattr(e, "problem", None) or e)
        raise ParamsError(f"{path} is not valid YAML{where}: {problem}; correct it there (params.yaml shows the "
                          "layout: one `key: value` per line, sections indented by spaces)") from None
    try:
        return params_from_dict(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
