"""The report page: one self-contained HTML document (inline CSS and figures) built from ReportData."""

from __future__ import annotations

import math
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape
from statistics import fmean
from typing import Any

from pipeline.evaluate.methods import ENSEMBLE, ZERO_SHOT
from pipeline.report.collect import ReportData
from pipeline.report.figures import effects_figure, shots_figure
from pipeline.report.labels import (
    HYPERPARAMETER_NAMES,
    is_probe,
    method_name,
    value_name,
    variant_label,
)
from pipeline.report.statistics import domain_shift_table, hyperparameter_effects, mean_std, param_importances

PAGE_CSS = """
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


def mean_std_text(mean: float, std: float = math.nan, n: int = 0) -> str:
    """'mean ± std' with two decimals (no std for a single value), '–' when there is no number."""
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.2f}"
    if math.isfinite(std) and n > 1:
        text += f" ± {std:.2f}"
    return text


def difference_text(value: float) -> str:
    """A difference with its sign, '–' when there is none."""
    return "–" if not math.isfinite(value) else f"{value:+.2f}"


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "", classes: str = "") -> str:
    """An HTML table; cells are escaped, except those given as ('html', markup) tuples."""
    def cell(tag: str, value: Any) -> str:
        if isinstance(value, tuple) and value and value[0] == "html":
            return f"<{tag}>{value[1]}</{tag}>"
        return f"<{tag}>{escape(str(value))}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    body = "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows)
    # The caption goes below as a paragraph: a <caption> is as narrow as its table.
    caption_html = f'<p class="caption">{escape(caption)}</p>' if caption else ""
    return (f'<div class="scroll"><table class="{classes}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{caption_html}")


def empty_note(text: str) -> str:
    """The one line a section without data shows instead of an empty table."""
    return f'<p class="empty">{escape(text)}</p>'


def figure_html(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{escape(alt)}"><figcaption>{escape(caption)}</figcaption></figure>'


def section_shots(data: ReportData) -> str:
    coop, baselines = data.coop_points, data.baseline_points
    uri = shots_figure(coop, baselines)
    if uri is None:
        return empty_note("No CoOp trials or linear-probe results yet: run the sweep and the baselines stage.")
    parts = [figure_html(uri, "Test accuracy against shots per dataset",
                         "Test accuracy (%) against shots per class: CoOp variants and the linear probe (its protocol "
                         "in the legend) as mean ± std over seeds, zero-shot CLIP at 0 shots (★ hand-crafted prompt, "
                         "▲ prompt ensemble). Average: mean of the per-dataset means over the datasets shown.")]
    shots = sorted({p.shots for p in (*coop, *baselines)})
    probes = sorted({p.method for p in baselines if is_probe(p.method)})
    rows = []
    for dataset in sorted({p.dataset for p in (*coop, *baselines)}):
        for method in [ZERO_SHOT, ENSEMBLE, *probes, *sorted({p.method for p in coop})]:
            points = {p.shots: p for p in (*coop, *baselines) if p.dataset == dataset and p.method == method}
            if points:
                rows.append([dataset, method_name(method), *[
                    mean_std_text(points[k].mean, points[k].std, points[k].n) if k in points else "" for k in shots]])
    parts.append(table_html(["dataset", "method", *[f"{k} shots" if k else "0 shots" for k in shots]], rows,
                            "Test accuracy (%), mean ± std over seeds", "numbers"))
    return "\n".join(parts)


def section_published(data: ReportData) -> str:
    published = data.published
    coop = published["coop_16shot"]
    shots = coop["shots"]
    published_variant = variant_label(coop["variant"])
    ours = {p.dataset: p for p in data.coop_points if p.shots == shots and p.method == published_variant}
    zero = {p.dataset: p for p in data.baseline_points if p.method == ZERO_SHOT}
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
        rows.append([dataset, mean_std_text(mean, mine.std if mine else math.nan, mine.n if mine else 0),
                     f"{value:.2f}", difference_text(mean - value), mean_std_text(zm),
                     "" if not math.isfinite(zp) else f"{zp:.2f}", difference_text(zm - zp)])
    if not rows:
        return empty_note(f"No {shots}-shot CoOp (M={coop['variant']['n_ctx']}, end, unified) or zero-shot results "
                          f"on the published datasets ({', '.join(coop['accuracy'])}).")
    if pairs:
        ours_avg = fmean(p[0] for p in pairs)
        pub_avg = fmean(p[1] for p in pairs)
        rows.append([f"average ({len(pairs)} datasets)", f"{ours_avg:.2f}", f"{pub_avg:.2f}",
                     difference_text(ours_avg - pub_avg), "", "", ""])
    backbone = f"{data.params.backbone.arch}/{data.params.backbone.pretrained or 'random weights'}"
    reference = f"{coop['backbone']['arch']}/{coop['backbone']['pretrained']}"
    notes = [f"<p>Published: {escape(coop['source'])}; zero-shot: {escape(published['zero_shot']['source'])}. "
             f"The published average over all 11 datasets is {coop['average']:.2f}.</p>"]
    if backbone != reference:
        notes.append(f'<p class="warn">Our backbone is {escape(backbone)}, the published numbers are for '
                     f"{escape(reference)}: the differences below are not a reproduction result.</p>")
    return "\n".join(notes) + table_html(
        ["dataset", f"ours CoOp {shots}-shot", "published", "Δ", "ours zero-shot", "published zero-shot", "Δ"], rows,
        f"CoOp M={coop['variant']['n_ctx']}, end, unified, {shots} shots (mean ± std over seeds) and zero-shot "
        "CLIP with the hand-crafted prompt, test accuracy (%)", "numbers")


def section_domain(data: ReportData) -> str:
    summary = domain_shift_table(data.domain_shift_rows)
    if summary is None:
        shift = data.params.domain_shift
        return empty_note(f"No domain-shift results: they need {shift.source} trials (domain_shift.source) and "
                          f"its shifted sets ({', '.join(shift.targets)}: domain_shift.targets) in data.datasets "
                          "(run python -m stages.domain_shift).")
    rows = []
    for name, by_target in summary.accuracy.items():
        cells = [mean_std_text(*by_target[t]) if t in by_target else "" for t in summary.targets]
        rows.append([name, *cells, mean_std_text(summary.target_average[name])])
    header = ["method", *[f"{t} (source)" if t == summary.source else t for t in summary.targets],
              "average (targets)"]
    caption = (f"Contexts learned on {summary.source} with {', '.join(map(str, summary.coop_shots))} shots, "
               "evaluated on its test set and on the shifted test sets (mean ± std over seeds); a set of a subset "
               "of the classes (ImageNet-A, -R: 200 classes) uses the contexts' rows of its classes. Test accuracy (%).")
    return table_html(header, rows, caption, "numbers")


def first_class_context(vectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The vectors of the first class's context (all of a unified one). Classes are told apart by label, as
    two may share a name (ImageNet's 'missile'); files written before labels were recorded have the name only."""
    key = "label" if "label" in vectors[0] else "class"
    return [v for v in vectors if v.get(key) == vectors[0][key]]


def section_words(data: ReportData) -> str:
    if not data.context_words:
        return empty_note("No learned contexts to interpret (no finished trials, or their artifacts are unavailable).")
    width = max(len(first_class_context(w["vectors"])) for w in data.context_words.values())
    rows = []
    for dataset, entry in data.context_words.items():
        trial = entry["trial"]
        vectors = entry["vectors"]
        owner = vectors[0]["class"]
        cells = []
        for v in first_class_context(vectors):  # CSC: the first class's context
            top = v["words"]
            title = ", ".join(f"{w['word']} ({w['distance']:.3f})" for w in top)
            cells.append(("html", f'<span title="{escape(title)}">{escape(top[0]["word"])}</span>'
                                  f'<small>{top[0]["distance"]:.2f}</small>'))
        cells += [""] * (width - len(cells))
        label = variant_label(trial).removeprefix("CoOp ") + (f", class '{owner}'" if owner else "")
        rows.append([dataset, ("html", f"{escape(label)}<br><small>{trial['shots']} shots, seed {trial['seed']}, "
                                       f"val {trial['val_acc']:.1f}%</small>"), *cells])
    return table_html(["dataset", "context", *[f"v{i + 1}" for i in range(width)]], rows,
                      "Nearest vocabulary word (Euclidean distance in the token-embedding space) of each learned "
                      "context vector of each dataset's best context by validation accuracy; hover a word for its "
                      "top-k.", "words")


def section_sweep(data: ReportData) -> str:
    if not data.finished_trials:
        return empty_note("No finished trials: nothing to say about hyperparameters yet.")
    effects = hyperparameter_effects(data.finished_trials)
    parts = []
    uri = effects_figure(effects)
    if uri is None:
        parts.append(empty_note("The sweep varied no hyperparameter within a dataset × shots × seed setting."))
    else:
        parts.append(figure_html(uri, "Accuracy against each hyperparameter",
                                 "Test accuracy of each trial minus the mean of its dataset × shots × seed setting, "
                                 "by the value of each hyperparameter the sweep varied (boxes over all settings)."))
        rows = []
        for key, values in effects.items():
            for effect in values:
                rows.append([HYPERPARAMETER_NAMES.get(key, key), value_name(key, effect.value),
                             str(len(effect.test_deltas)), difference_text(mean_std(effect.val_deltas)[0]),
                             difference_text(mean_std(effect.test_deltas)[0])])
        parts.append(table_html(["hyperparameter", "value", "trials", "Δ val acc", "Δ test acc"], rows,
                                "Mean accuracy difference to the setting mean (percentage points)", "numbers"))
    importances, why = param_importances(data.finished_trials, list(effects))
    if importances is None:
        parts.append(empty_note(f"Parameter importances: not computed ({why})."))
    else:
        search = data.params.sweep.search
        parts.append(table_html(
            ["hyperparameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.items()],
            f"fANOVA importances (optuna.importance, seed 0) on an Optuna study rebuilt from the "
            f"{len(data.finished_trials)} finished trials of this {search} sweep; objective: val accuracy "
            "minus its dataset × shots × seed mean.", "numbers"))
    return "\n".join(parts)


def git_short_commit() -> str:
    """The short HEAD commit of the working directory's checkout, 'unknown' outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header_html(data: ReportData) -> str:
    """What the page reports on (backbone, datasets, trials by state, folders) and its warnings."""
    params = data.params
    states: dict[str, int] = defaultdict(int)
    for r in data.trial_rows:
        states[r.get("state", "?")] += 1
    pretrained = params.backbone.pretrained
    rows = [
        ["backbone", f"{params.backbone.arch} / {pretrained or 'random weights'}"],
        ["datasets", ", ".join(params.data.datasets)],
        ["shots × seeds", f"{params.data.shots} × {params.data.seeds}"],
        ["search", f"{params.sweep.search}, {len(data.trial_rows)} trials ("
                   + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ")"],
        ["results", f"{data.results_dir} · {data.baselines_dir}"],
        ["MLflow", f"{params.tracking.uri}, experiment {params.tracking.experiment}"],
        ["generated", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {git_short_commit()}"],
    ]
    warn = ""
    if pretrained is None:
        warn = ('<p class="warn">This backbone has random weights: every accuracy here shows that the pipeline runs, '
                "not what CoOp achieves. Set backbone.pretrained (e.g. openai) for real numbers.</p>")
    notes = "".join(f'<p class="warn">{escape(n)}</p>' for n in data.notes)
    return warn + notes + table_html(["", ""], rows, classes="meta")


def render(data: ReportData) -> str:
    """The whole page: header, table of contents and the five sections."""
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
            f"<style>{PAGE_CSS}</style></head><body>\n<h1>CoOp sweep report</h1>\n<p>{toc}</p>\n{header_html(data)}\n"
            f"{body}\n</body></html>\n")
