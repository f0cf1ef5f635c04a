"""The report stage: one self-contained HTML page from the sweep's, baselines' and domain-shift results.

Reads ``<sweep.results_dir>/trials.csv`` (FINISHED trials; learned contexts' nearest words from each
trial's artifacts), ``baselines.csv`` and ``domain_shift.csv`` (default folder: ``baselines/`` beside
``sweep.results_dir``) and ``pipeline/published.json``, and writes ``<report.dir>/index.html`` atomically.
Figures are inline PNGs (base64 ``data:`` URIs): the page needs no other file. Sections:

1. accuracy against shots per dataset and averaged: CoOp variants, zero-shot CLIP, linear probe (one
   series per protocol, labelled; ± std over seeds), the paper's main figure, with the numbers as a table;
2. our 16-shot CoOp (M=16, end, unified) and zero-shot results next to the published ones;
3. domain generalisation: ImageNet contexts on ImageNet-V2/-Sketch/-A/-R, beside zero-shot CLIP;
4. the nearest vocabulary words of each dataset's best learned context;
5. the sweep's view: accuracy against each hyperparameter, and parameter importances (fANOVA over an
   Optuna study rebuilt from trials.csv).

Where several configurations share a CoOp variant (e.g. the sweep also varied lr), each dataset x shots
uses the one with the best mean validation accuracy; test accuracy never selects anything. A section
without data says so in one line. The page is also logged to MLflow as the artifact of a "report" run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from pipeline.params import Params, ParamsError, load_params

log = logging.getLogger(__name__)

PUBLISHED = Path(__file__).parent / "published.json"
HYPERPARAMETERS = ("n_ctx", "ctx_init", "csc", "class_token_position", "lr", "epochs", "precision")
HYPER_NAMES = {"n_ctx": "context length M", "ctx_init": "initialisation", "csc": "class-specific context (CSC)",
               "class_token_position": "class token position", "lr": "learning rate", "epochs": "epochs",
               "precision": "precision"}
PAPER_VARIANT = {"n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end"}
ZERO_SHOT = "zero-shot"
ENSEMBLE = "zero-shot-ensemble"
PROBE = "linear-probe"
METHOD_NAMES = {ZERO_SHOT: "Zero-shot CLIP", ENSEMBLE: "Zero-shot CLIP (prompt ensemble)", PROBE: "Linear probe CLIP"}
# Linear-probe rows are one series per protocol (baselines.csv's `protocol`): its method is "linear-probe/<protocol>".
PROBE_PROTOCOL_NAMES = {"lpclip": "official lpclip protocol", "grid": "our C grid on augmented views"}


def probe_method(protocol: str) -> str:
    """The series name of a linear-probe row; rows from before protocols were recorded keep plain PROBE."""
    return f"{PROBE}/{protocol}" if protocol else PROBE


def is_probe(method: str) -> bool:
    return method == PROBE or method.startswith(PROBE + "/")


def method_name(method: str) -> str:
    """How the report labels a method: linear-probe numbers always say which protocol produced them."""
    if is_probe(method):
        protocol = method.partition("/")[2]
        return f"{METHOD_NAMES[PROBE]} ({PROBE_PROTOCOL_NAMES.get(protocol, protocol) or 'protocol not recorded'})"
    return METHOD_NAMES.get(method, method)


# ---------------------------------------------------------------------------------------------- inputs


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def typed_trial(row: dict[str, str]) -> dict[str, Any]:
    """A trials.csv row with numbers and booleans parsed."""
    return {**row, "shots": int(row["shots"]), "seed": int(row["seed"]), "n_ctx": int(row["n_ctx"]),
            "csc": row["csc"] == "True", "lr": _float(row["lr"]), "epochs": int(row["epochs"]),
            "val_acc": _float(row["val_acc"]), "test_acc": _float(row["test_acc"])}


def variant_label(row: dict[str, Any]) -> str:
    """The CoOp variant of a trial as the paper names it: context length (or init words), position, CSC."""
    init = f"'{row['ctx_init']}' (M={row['n_ctx']})" if row["ctx_init"] else f"M={row['n_ctx']}"
    return f"CoOp {init}, {row['class_token_position']}, {'CSC' if row['csc'] else 'unified'}"


def is_paper_variant(row: dict[str, Any]) -> bool:
    return all(row[k] == v for k, v in PAPER_VARIANT.items())


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and population std (ddof=0, as CoOp's result parser) of the finite values, and their count."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    return statistics.fmean(finite), statistics.pstdev(finite), len(finite)


@dataclass
class Series:
    """One curve point: mean ± std over seeds of one method at one dataset x shots."""

    method: str
    dataset: str
    shots: int
    mean: float
    std: float
    n: int
    config: str = ""
    trial_keys: list[str] = field(default_factory=list)


def coop_series(trials: Sequence[dict[str, Any]]) -> list[Series]:
    """Per dataset x shots x variant, the configuration with the best mean val accuracy (most seeds first)."""
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        groups[(t["dataset"], t["shots"], variant_label(t), t["config"])].append(t)
    best: dict[tuple[str, int, str], tuple[tuple[int, float], list[dict[str, Any]]]] = {}
    for (dataset, shots, variant, _), members in groups.items():
        val, _, n = mean_std(m["val_acc"] for m in members)
        score = (len(members), val if math.isfinite(val) else -math.inf)
        key = (dataset, shots, variant)
        if key not in best or score > best[key][0]:
            best[key] = (score, members)
    out = []
    for (dataset, shots, variant), (_, members) in sorted(best.items()):
        mean, std, n = mean_std(m["test_acc"] for m in members)
        out.append(Series(variant, dataset, shots, mean, std, n, members[0]["config"],
                          [m["trial_key"] for m in members]))
    return out


def baseline_series(rows: Sequence[dict[str, str]]) -> list[Series]:
    groups: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    for r in rows:
        method = probe_method(r.get("protocol") or "") if r["method"] == PROBE else r["method"]
        groups[(method, r["dataset"], int(r["shots"]))].append(_float(r["test_acc"]))
    return [Series(method, dataset, shots, *mean_std(values)) for (method, dataset, shots), values in
            sorted(groups.items())]


@dataclass
class ReportData:
    params: Params
    results_dir: Path
    baselines_dir: Path
    all_trials: list[dict[str, str]]
    trials: list[dict[str, Any]]  # FINISHED, typed
    baselines: list[dict[str, str]]
    domain: list[dict[str, str]]
    published: dict[str, Any]
    words: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset -> nearest words of its best context
    notes: list[str] = field(default_factory=list)

    @property
    def coop(self) -> list[Series]:
        return coop_series(self.trials)

    @property
    def base(self) -> list[Series]:
        return baseline_series(self.baselines)


def collect(params: Params, results_dir: Path | None = None, baselines_dir: Path | None = None,
            tracking_uri: str | None = None) -> ReportData:
    """Read every input the report draws on; missing optional inputs leave their sections empty."""
    from pipeline.baselines_run import baselines_dir as default_baselines_dir

    results_dir = Path(results_dir or params.sweep.results_dir)
    baselines_dir = Path(baselines_dir or default_baselines_dir(params))
    notes = []
    all_trials: list[dict[str, str]] = []
    trials_path = results_dir / "trials.csv"
    if trials_path.is_file():
        all_trials = _read_csv(trials_path)
    else:
        notes.append(f"{trials_path} does not exist: run the sweep (dvc repro sweep).")
    trials = [typed_trial(r) for r in all_trials if r.get("state") == "FINISHED"]
    if any(r.get("dataset") == "ImageNet" for r in all_trials):
        # CoOp's ImageNet has no val split: its few-shot "val" comes from the test images (val_is_test).
        notes.append("ImageNet has no validation split: as in the official code its few-shot val images come from "
                     "the test set, so the best ImageNet configuration is selected on test images.")
    baselines = _read_csv(baselines_dir / "baselines.csv") if (baselines_dir / "baselines.csv").is_file() else []
    domain = _read_csv(baselines_dir / "domain_shift.csv") if (baselines_dir / "domain_shift.csv").is_file() else []
    published = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    data = ReportData(params, results_dir, baselines_dir, all_trials, trials, baselines, domain, published,
                      notes=notes)
    data.words = best_context_words(data, tracking_uri)
    return data


def best_context_words(data: ReportData, tracking_uri: str | None) -> dict[str, dict[str, Any]]:
    """For each dataset, the nearest words of its best trial (by val) at its largest shot count, preferring
    unified contexts (one row of words per position, as in the paper's interpretation table)."""
    from pipeline.baselines_run import trial_artifacts
    from pipeline.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, data.params.tracking.uri)
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in data.trials:
        by_dataset[t["dataset"]].append(t)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="coop-report-") as tmp:
        for dataset, members in sorted(by_dataset.items()):
            top = max(m["shots"] for m in members)
            candidates = [m for m in members if m["shots"] == top]
            unified = [m for m in candidates if not m["csc"]]
            finite = [m for m in (unified or candidates) if math.isfinite(m["val_acc"])]
            if not finite:
                continue
            best = max(finite, key=lambda m: (m["val_acc"], -m["seed"]))
            folder = trial_artifacts(best, data.results_dir, Path(tmp), uri, names=("nearest_words.json",))
            if folder is None:
                continue
            words = json.loads((folder / "nearest_words.json").read_text(encoding="utf-8"))
            out[dataset] = {"trial": best, "k": words.get("k"), "vectors": words["vectors"]}
    return out


# --------------------------------------------------------------------------------------------- figures


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shots_figure(coop: Sequence[Series], base: Sequence[Series]) -> str | None:
    """Small multiples: test accuracy against shots per dataset plus the average panel."""
    probes = sorted({s.method for s in base if is_probe(s.method)})
    if not coop and not probes:
        return None
    plt = _pyplot()
    datasets = sorted({s.dataset for s in coop} | {s.dataset for s in base if is_probe(s.method)})
    shots = sorted({s.shots for s in coop} | {s.shots for s in base if s.shots > 0})
    position = {k: i + 1 for i, k in enumerate(shots)}  # 0 is zero-shot
    methods = sorted({s.method for s in coop}) + probes
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    panels = [*datasets, "Average"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    average = average_series([*coop, *base], datasets)
    for ax, panel in zip(axes.flat, panels, strict=False):
        series = average if panel == "Average" else [s for s in (*coop, *base) if s.dataset == panel]
        for method in methods:
            points = sorted((s for s in series if s.method == method and s.shots > 0), key=lambda s: s.shots)
            if not points:
                continue
            xs = [position[s.shots] for s in points]
            ys = [s.mean for s in points]
            errs = [s.std if math.isfinite(s.std) else 0.0 for s in points]
            style = "--" if is_probe(method) else "-"
            ax.errorbar(xs, ys, yerr=errs, fmt=style + "o", ms=3.5, capsize=2.5, lw=1.4, color=colours[method],
                        label=method_name(method))
        for method, marker in ((ZERO_SHOT, "*"), (ENSEMBLE, "^")):
            zero = [s for s in series if s.method == method]
            if zero:
                ax.plot([0], [zero[0].mean], marker, ms=11 if marker == "*" else 7, color="black" if marker == "*"
                        else "dimgray", label=METHOD_NAMES[method], ls="none")
                ax.axhline(zero[0].mean, color="lightgray", lw=0.8, ls=":", zorder=0)
        ax.set_title(panel, fontsize=10, fontweight="bold" if panel == "Average" else "normal")
        ax.set_xticks(range(len(shots) + 1), ["0", *map(str, shots)])
        ax.set_xlabel("shots per class", fontsize=8)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = {}, []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="lower center", ncol=min(3, len(labels)),
               fontsize=8, bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 3)))
    fig.tight_layout()
    return _png(fig)


def average_series(series: Sequence[Series], datasets: Sequence[str]) -> list[Series]:
    """Mean over datasets of each method's per-dataset means, where every dataset has that point."""
    groups: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for s in series:
        groups[(s.method, s.shots)][s.dataset] = s.mean
    out = []
    for (method, shots), values in sorted(groups.items()):
        if set(datasets) <= set(values):
            out.append(Series(method, "Average", shots, statistics.fmean(values[d] for d in datasets), math.nan,
                              len(datasets)))
    return out


def hyperparameter_effects(trials: Sequence[dict[str, Any]]) -> dict[str, list[tuple[Any, list[float], list[float]]]]:
    """For each hyperparameter the sweep really varied (within some dataset x shots x seed): per value, the
    trials' val and test accuracy relative to the mean of their dataset x shots x seed group."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
    for t in trials:
        groups[(t["dataset"], t["shots"], t["seed"])].append(t)
    varied = [k for k in HYPERPARAMETERS if any(len({json.dumps(m[k]) for m in g}) > 1 for g in groups.values())]
    out: dict[str, list[tuple[Any, list[float], list[float]]]] = {}
    for key in varied:
        by_value: dict[str, tuple[Any, list[float], list[float]]] = {}
        for members in groups.values():
            if len({json.dumps(m[key]) for m in members}) < 2:
                continue  # this group says nothing about `key`
            val_mean = mean_std(m["val_acc"] for m in members)[0]
            test_mean = mean_std(m["test_acc"] for m in members)[0]
            for m in members:
                entry = by_value.setdefault(json.dumps(m[key]), (m[key], [], []))
                entry[1].append(m["val_acc"] - val_mean)
                entry[2].append(m["test_acc"] - test_mean)
        out[key] = sorted(by_value.values(), key=lambda e: str(e[0]))
    return out


def _value_name(key: str, value: Any) -> str:
    if key == "ctx_init":
        return f"'{value}'" if value else "random"
    if key == "csc":
        return "CSC" if value else "unified"
    return f"{value:g}" if isinstance(value, float) else str(value)


def effects_figure(effects: dict[str, list[tuple[Any, list[float], list[float]]]]) -> str | None:
    if not effects:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(effects), figsize=(3.4 * len(effects), 3.2), squeeze=False)
    for ax, (key, values) in zip(axes.flat, effects.items(), strict=True):
        names = [_value_name(key, v) for v, _, _ in values]
        ax.boxplot([[d for d in test if math.isfinite(d)] or [0.0] for _, _, test in values], widths=0.5)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20 if max(map(len, names)) > 8 else 0, fontsize=8)
        ax.axhline(0, color="gray", lw=0.8, ls=":")
        ax.set_title(HYPER_NAMES.get(key, key), fontsize=10)
        ax.set_ylabel("test acc. − setting mean (pp)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25, axis="y")
    fig.tight_layout()
    return _png(fig)


def param_importances(trials: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[dict[str, float] | None, str]:
    """fANOVA importances over an Optuna study rebuilt from the trials (objective: val acc minus its
    dataset x shots x seed mean, so differences between datasets and shot counts do not count). A key that
    mirrors another one to one is reported under the other's name as "a = b"."""
    if not keys:
        return None, "the sweep varied no hyperparameter"
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    twins = independent_keys(trials, keys)
    keys = list(twins)
    groups: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for t in trials:
        groups[(t["dataset"], t["shots"], t["seed"])].append(t["val_acc"])
    means = {k: mean_std(v)[0] for k, v in groups.items()}
    choices = {k: sorted({_optuna_value(t[k]) for t in trials}, key=str) for k in keys}
    distributions = {k: CategoricalDistribution(v) for k, v in choices.items() if len(v) > 1}
    if not distributions:
        return None, "no hyperparameter took more than one value"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in trials:
        value = t["val_acc"] - means[(t["dataset"], t["shots"], t["seed"])]
        if not math.isfinite(value):
            continue
        study.add_trial(optuna.trial.create_trial(
            params={k: _optuna_value(t[k]) for k in distributions}, distributions=distributions, value=value))
    if len(study.trials) < 2:
        return None, "fewer than two finished trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        names = {k: " = ".join(HYPER_NAMES.get(x, x) for x in [k, *twins[k]]) for k in importances}
        return {names[k]: v for k, v in importances.items()}, ""
    except (RuntimeError, ValueError, ZeroDivisionError) as error:
        return None, f"fANOVA could not be computed ({error})"


def independent_keys(trials: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, list[str]]:
    """`keys` without those that mirror an earlier key one to one over the trials, mapped to the keys they
    stand for (a word initialisation fixes M, so with one init word list n_ctx and ctx_init carry the same
    information, and fANOVA would split one effect between them)."""
    def one_to_one(a: str, b: str) -> bool:
        pairs = {(json.dumps(t[a]), json.dumps(t[b])) for t in trials}
        return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})

    kept: dict[str, list[str]] = {}
    for key in keys:
        twin = next((other for other in kept if one_to_one(other, key)), None)
        if twin is None:
            kept[key] = []
        else:
            kept[twin].append(key)
    return kept


def _optuna_value(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


# ------------------------------------------------------------------------------------------------ HTML


def _fmt(mean: float, std: float = math.nan, n: int = 0) -> str:
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.2f}"
    if math.isfinite(std) and n > 1:
        text += f" ± {std:.2f}"
    return text


def _signed(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:+.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "", classes: str = "") -> str:
    """An HTML table; cells are escaped, except those given as ('html', markup) tuples."""
    def cell(tag: str, value: Any) -> str:
        if isinstance(value, tuple) and value and value[0] == "html":
            return f"<{tag}>{value[1]}</{tag}>"
        return f"<{tag}>{escape(str(value))}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    # The caption goes below as a paragraph: a <caption> is as narrow as its table.
    cap = f'<p class="caption">{escape(caption)}</p>' if caption else ""
    return (f'<div class="scroll"><table class="{classes}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{cap}")


def empty(text: str) -> str:
    return f'<p class="empty">{escape(text)}</p>'


def figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{escape(alt)}"><figcaption>{escape(caption)}</figcaption></figure>'


def section_shots(data: ReportData) -> str:
    coop, base = data.coop, data.base
    uri = shots_figure(coop, base)
    if uri is None:
        return empty("No CoOp trials or linear-probe results yet: run the sweep and the baselines stage.")
    parts = [figure(uri, "Test accuracy against shots per dataset",
                     "Test accuracy (%) against shots per class: CoOp variants and the linear probe (its protocol "
                     "in the legend) as mean ± std over seeds, zero-shot CLIP at 0 shots (★ hand-crafted prompt, ▲ prompt ensemble). Average: "
                     "mean of the per-dataset means over the datasets shown.")]
    shots = sorted({s.shots for s in (*coop, *base)})
    rows = []
    for dataset in sorted({s.dataset for s in (*coop, *base)}):
        probes = sorted({s.method for s in base if is_probe(s.method)})
        for method in [ZERO_SHOT, ENSEMBLE, *probes, *sorted({s.method for s in coop})]:
            points = {s.shots: s for s in (*coop, *base) if s.dataset == dataset and s.method == method}
            if points:
                rows.append([dataset, method_name(method),
                             *[_fmt(points[k].mean, points[k].std, points[k].n) if k in points else "" for k in shots]])
    parts.append(table(["dataset", "method", *[f"{k} shots" if k else "0 shots" for k in shots]], rows,
                       "Test accuracy (%), mean ± std over seeds", "numbers"))
    return "\n".join(parts)


def section_published(data: ReportData) -> str:
    published = data.published
    coop = published["coop_16shot"]
    shots = coop["shots"]
    ours = {s.dataset: s for s in data.coop if s.shots == shots and s.method == variant_label(
        {**PAPER_VARIANT, "n_ctx": coop["variant"]["n_ctx"]})}
    zero = {s.dataset: s for s in data.base if s.method == ZERO_SHOT}
    zero_published = published["zero_shot"]["accuracy"]
    rows, pairs = [], []
    for dataset, value in coop["accuracy"].items():
        mine = ours.get(dataset)
        zero_mine = zero.get(dataset)
        if mine is None and zero_mine is None:
            continue
        mean = mine.mean if mine else math.nan
        if mine is not None and math.isfinite(mean):
            pairs.append((mean, value))
        zp = zero_published.get(dataset, math.nan)
        zm = zero_mine.mean if zero_mine else math.nan
        rows.append([dataset, _fmt(mean, mine.std if mine else math.nan, mine.n if mine else 0), f"{value:.2f}",
                     _signed(mean - value), _fmt(zm), "" if not math.isfinite(zp) else f"{zp:.2f}", _signed(zm - zp)])
    if not rows:
        return empty(f"No {shots}-shot CoOp (M={coop['variant']['n_ctx']}, end, unified) or zero-shot results on the "
                     f"published datasets ({', '.join(coop['accuracy'])}).")
    if pairs:
        ours_avg = statistics.fmean(p[0] for p in pairs)
        pub_avg = statistics.fmean(p[1] for p in pairs)
        rows.append([f"average ({len(pairs)} datasets)", f"{ours_avg:.2f}", f"{pub_avg:.2f}",
                     _signed(ours_avg - pub_avg), "", "", ""])
    backbone = f"{data.params.backbone.arch}/{data.params.backbone.pretrained or 'random weights'}"
    reference = f"{coop['backbone']['arch']}/{coop['backbone']['pretrained']}"
    notes = [f"<p>Published: {escape(coop['source'])}; zero-shot: {escape(published['zero_shot']['source'])}. "
             f"The published average over all 11 datasets is {coop['average']:.2f}.</p>"]
    if backbone != reference:
        notes.append(f'<p class="warn">Our backbone is {escape(backbone)}, the published numbers are for '
                     f"{escape(reference)}: the differences below are not a reproduction result.</p>")
    return "\n".join(notes) + table(
        ["dataset", f"ours CoOp {shots}-shot", "published", "Δ", "ours zero-shot", "published zero-shot", "Δ"], rows,
        f"CoOp M={coop['variant']['n_ctx']}, end, unified, {shots} shots (mean ± std over seeds) and zero-shot "
        "CLIP with the hand-crafted prompt, test accuracy (%)", "numbers")


def section_domain(data: ReportData) -> str:
    rows = data.domain
    if not rows:
        return empty("No domain-shift results: they need ImageNet trials and the ImageNet variants in "
                     "data.datasets (run python -m pipeline.domain_shift).")
    targets = list(dict.fromkeys(r["target"] for r in rows))
    source = rows[0]["source"]
    shots = sorted({int(r["shots"]) for r in rows if r["method"] == "CoOp"})
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for r in rows:
        name = METHOD_NAMES.get(r["method"], r["method"]) if r["method"] != "CoOp" else variant_label(
            {"n_ctx": int(r["n_ctx"]), "ctx_init": r["ctx_init"], "csc": r["csc"] == "True",
             "class_token_position": r["class_token_position"]})
        if name not in order:
            order.append(name)
        groups[name][r["target"]].append(_float(r["test_acc"]))
    shifted = [t for t in targets if t != source]
    table_rows = []
    for name in order:
        cells = [_fmt(*mean_std(groups[name][t])) if groups[name][t] else "" for t in targets]
        target_means = [mean_std(groups[name][t])[0] for t in shifted if groups[name][t]]
        avg = statistics.fmean(target_means) if len(target_means) == len(shifted) and shifted else math.nan
        table_rows.append([name, *cells, _fmt(avg)])
    header = ["method", *[f"{t} (source)" if t == source else t for t in targets], "average (targets)"]
    caption = (f"Contexts learned on {source} with {', '.join(map(str, shots))} shots, evaluated on its test set "
               "and on the shifted test sets (mean ± std over seeds); 200-class subsets use the contexts' rows of "
               "their classes. Test accuracy (%).")
    return table(header, table_rows, caption, "numbers")


def _first_context(vectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The vectors of the first class's context (all of a unified one). Classes are told apart by label, as
    two may share a name (ImageNet's 'missile'); files written before labels were recorded have the name only."""
    key = "label" if "label" in vectors[0] else "class"
    return [v for v in vectors if v.get(key) == vectors[0][key]]


def section_words(data: ReportData) -> str:
    if not data.words:
        return empty("No learned contexts to interpret (no finished trials, or their artifacts are unavailable).")
    width = max(len(_first_context(w["vectors"])) for w in data.words.values())
    rows = []
    for dataset, entry in data.words.items():
        trial = entry["trial"]
        vectors = entry["vectors"]
        owner = vectors[0]["class"]
        shown = _first_context(vectors)  # CSC: the first class's context
        cells = []
        for v in shown:
            top = v["words"]
            title = ", ".join(f"{w['word']} ({w['distance']:.3f})" for w in top)
            cells.append(("html", f'<span title="{escape(title)}">{escape(top[0]["word"])}</span>'
                                  f'<small>{top[0]["distance"]:.2f}</small>'))
        cells += [""] * (width - len(cells))
        label = variant_label(trial).removeprefix("CoOp ") + (f", class '{owner}'" if owner else "")
        rows.append([dataset, ("html", f"{escape(label)}<br><small>{trial['shots']} shots, seed {trial['seed']}, "
                                       f"val {trial['val_acc']:.1f}%</small>"), *cells])
    return table(["dataset", "context", *[f"v{i + 1}" for i in range(width)]], rows,
                 "Nearest vocabulary word (Euclidean distance in the token-embedding space) of each learned context "
                 "vector of each dataset's best context by validation accuracy; hover a word for its top-k.",
                 "words")


def section_sweep(data: ReportData) -> str:
    if not data.trials:
        return empty("No finished trials: nothing to say about hyperparameters yet.")
    effects = hyperparameter_effects(data.trials)
    parts = []
    uri = effects_figure(effects)
    if uri is None:
        parts.append(empty("The sweep varied no hyperparameter within a dataset × shots × seed setting."))
    else:
        parts.append(figure(uri, "Accuracy against each hyperparameter",
                            "Test accuracy of each trial minus the mean of its dataset × shots × seed setting, by "
                            "the value of each hyperparameter the sweep varied (boxes over all settings)."))
        rows = []
        for key, values in effects.items():
            for value, val, test in values:
                rows.append([HYPER_NAMES.get(key, key), _value_name(key, value), str(len(test)),
                             _signed(mean_std(val)[0]), _signed(mean_std(test)[0])])
        parts.append(table(["hyperparameter", "value", "trials", "Δ val acc", "Δ test acc"], rows,
                           "Mean accuracy difference to the setting mean (percentage points)", "numbers"))
    importances, why = param_importances(data.trials, list(effects))
    if importances is None:
        parts.append(empty(f"Parameter importances: not computed ({why})."))
    else:
        search = data.params.sweep.search
        parts.append(table(["hyperparameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.items()],
                           f"fANOVA importances (optuna.importance, seed 0) on an Optuna study rebuilt from the "
                           f"{len(data.trials)} finished trials of this {search} sweep; objective: val accuracy "
                           "minus its dataset × shots × seed mean.", "numbers"))
    return "\n".join(parts)


def header_html(data: ReportData) -> str:
    params = data.params
    states: dict[str, int] = defaultdict(int)
    for r in data.all_trials:
        states[r.get("state", "?")] += 1
    pretrained = params.backbone.pretrained
    rows = [
        ["backbone", f"{params.backbone.arch} / {pretrained or 'random weights'}"],
        ["datasets", ", ".join(params.data.datasets)],
        ["shots × seeds", f"{params.data.shots} × {params.data.seeds}"],
        ["search", f"{params.sweep.search}, {len(data.all_trials)} trials ("
                   + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ")"],
        ["results", f"{data.results_dir} · {data.baselines_dir}"],
        ["MLflow", f"{params.tracking.uri}, experiment {params.tracking.experiment}"],
        ["generated", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {_commit()}"],
    ]
    warn = ""
    if pretrained is None:
        warn = ('<p class="warn">This backbone has random weights: every accuracy here shows that the pipeline runs, '
                "not what CoOp achieves. Set backbone.pretrained (e.g. openai) for real numbers.</p>")
    notes = "".join(f'<p class="warn">{escape(n)}</p>' for n in data.notes)
    return warn + notes + table(["", ""], rows, classes="meta")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:12px 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4;text-align:left}table.numbers td{text-align:right}table.numbers td:first-child,
table.numbers td:nth-child(2){text-align:left}table.meta th{display:none}table.meta td:first-child{font-weight:600}
table.words{font-size:11px}table.words td{padding:3px 5px}table.words td small{color:#888;margin-left:2px;
font-size:9px}table.words td:nth-child(2){white-space:nowrap}p.caption{color:#555;font-size:12px;margin-top:-6px}.scroll{overflow-x:auto}figure{margin:12px 0}figure img{max-width:100%}
figcaption{color:#555;font-size:12px}.empty{color:#777;font-style:italic}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:6px 10px}
"""


def render(data: ReportData) -> str:
    sections = [
        ("accuracy", "Accuracy against shots", section_shots(data)),
        ("published", "Our 16-shot results next to the published ones", section_published(data)),
        ("domain", "Domain generalisation", section_domain(data)),
        ("words", "Interpreting the learned contexts", section_words(data)),
        ("sweep", "The sweep: hyperparameters", section_sweep(data)),
    ]
    toc = " · ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    body = "\n".join(f'<h2 id="{key}">{escape(title)}</h2>\n{html}' for key, title, html in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>CoOp sweep report</title>'
            f"<style>{CSS}</style></head><body>\n<h1>CoOp sweep report</h1>\n<p>{toc}</p>\n{header_html(data)}\n"
            f"{body}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------- output


def write_report(params: Params, out_dir: Path | None = None, results_dir: Path | None = None,
                 baselines_dir: Path | None = None, tracking_uri: str | None = None, mlflow: bool = True) -> Path:
    """Build the page and write ``<out_dir>/index.html`` atomically; log it to MLflow unless `mlflow` is off."""
    from pipeline.atomic import write_text_atomic

    data = collect(params, results_dir, baselines_dir, tracking_uri)
    html = render(data)
    path = Path(out_dir or params.report.dir) / "index.html"
    write_text_atomic(path, html)
    log.info("report: %s (%d KiB, %d finished trials)", path, len(html) // 1024, len(data.trials))
    if mlflow:
        from pipeline.baselines_run import StageRun

        run = StageRun.start(params, "report", "report",
                             {"results_dir": str(data.results_dir), "baselines_dir": str(data.baselines_dir),
                              "trials": len(data.all_trials)}, tracking_uri)
        run.finish("FINISHED", [path], {"finished_trials": len(data.trials)})
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coop-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="folder for index.html (default: report.dir)")
    parser.add_argument("--results-dir", type=Path, help="the sweep's results folder (default: sweep.results_dir)")
    parser.add_argument("--baselines-dir", type=Path,
                        help="folder with baselines.csv and domain_shift.csv (default: "
                        "report.baselines_dir)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI, for the trials' artifacts and the report run (default: "
                        "MLFLOW_TRACKING_URI, else tracking.uri)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the page to MLflow")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.baselines_run import StageError

    try:
        params = load_params(args.params)
        write_report(params, args.out, args.results_dir, args.baselines_dir, args.tracking_uri, not args.no_mlflow)
    except (ParamsError, StageError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
