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

from pipeline.data.protocols import BASE2NEW, XD
from pipeline.data.published import base_to_new_rows, cross_dataset_rows
from pipeline.evaluate.methods import ENSEMBLE, LEARNED_METHOD_NAMES, ZERO_SHOT
from pipeline.report.collect import TRANSFER_FILE, ReportData
from pipeline.report.figures import effects_figure, shots_figure
from pipeline.report.labels import (
    COOP_BEST,
    COOP_BEST_NAME,
    DEFAULT_METHOD,
    METHOD_NAMES,
    PROTOCOL_NAMES,
    factor_name,
    is_probe,
    learned_method_name,
    method_name,
    settings_text,
    shots_text,
    variant_label,
)
from pipeline.report.statistics import (
    AccuracyPoint,
    BaseNewResult,
    MatchedEffect,
    TransferRow,
    average_points,
    base_to_new_averages,
    base_to_new_results,
    ci95,
    domain_shift_table,
    importance_trials,
    matched_effects,
    mean_std,
    param_importances,
    transfer_table,
    varied_hyperparameters,
    zero_shot_base_new,
)

PAGE_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:1.05em;margin:18px 0 4px}
table{border-collapse:collapse;margin:12px 0;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4;text-align:left}table.numbers td{text-align:right}table.numbers td:first-child,
table.numbers td:nth-child(2){text-align:left}table.meta th{display:none}table.meta td:first-child{font-weight:600}
table.paper td{text-align:right;white-space:nowrap}table.paper td:first-child{text-align:left}
table.paper td small{display:block;color:#888;font-size:10px}table.paper th{text-align:center}
table.paper tr.selected td{background:#f7fbff}table.b2n td:nth-child(2),table.b2n td:nth-child(3){text-align:left}
table.effects td:nth-child(3){text-align:left}table.effects td:nth-child(n+4){white-space:nowrap}
table.words{font-size:11px}table.words td{padding:3px 4px}table.words td small{display:block;color:#888;
font-size:9px}table.words td:nth-child(2){white-space:nowrap}p.caption{color:#555;font-size:12px;margin-top:-6px}
.scroll{overflow-x:auto}figure{margin:12px 0}figure img{max-width:100%}
figcaption{color:#555;font-size:12px}.empty{color:#777;font-style:italic}.note{color:#555}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:6px 10px}
details{margin:10px 0}summary{cursor:pointer;color:#245;font-weight:600}
"""
CI_RULE = "1.96 × std / √n, as CoOp's parse_test_res.py --ci95 computes it (population std, ddof=0)"


def mean_std_text(mean: float, std: float = math.nan, n: int = 0) -> str:
    """'mean ± std' with two decimals (no std for a single value), '–' when there is no number."""
    if not math.isfinite(mean):
        return "–"
    text = f"{mean:.2f}"
    if math.isfinite(std) and n > 1:
        text += f" ± {std:.2f}"
    return text


def ci_title(std: float, n: int) -> str:
    """The tooltip of a mean over seeds: how many, and the 95% CI."""
    ci = ci95(std, n)
    return f"{n} seeds; 95% CI ± {ci:.2f}" if math.isfinite(ci) else f"{n} value" + ("" if n == 1 else "s")


def seeds_cell(mean: float, std: float, n: int) -> tuple[str, str]:
    """A mean ± std cell whose tooltip gives the number of seeds and the 95% CI."""
    return ("html", f'<span title="{escape(ci_title(std, n))}">{escape(mean_std_text(mean, std, n))}</span>')


def difference_text(value: float) -> str:
    """A difference with its sign, '–' when there is none."""
    return "–" if not math.isfinite(value) else f"{value:+.2f}"


def table_html(header: Sequence[Any], rows: Sequence[Sequence[Any]], caption: str = "", classes: str = "",
               row_classes: Sequence[str] = ()) -> str:
    """An HTML table; cells are escaped, except those given as ('html', markup) tuples."""
    def cell(tag: str, value: Any) -> str:
        if isinstance(value, tuple) and value and value[0] == "html":
            return f"<{tag}>{value[1]}</{tag}>"
        return f"<{tag}>{escape(str(value))}</{tag}>"

    head = "".join(cell("th", h) for h in header)
    classes_of = list(row_classes) + [""] * (len(rows) - len(row_classes))
    body = "".join((f'<tr class="{c}">' if c else "<tr>") + "".join(cell("td", v) for v in row) + "</tr>"
                   for row, c in zip(rows, classes_of, strict=True))
    # The caption goes below as a paragraph: a <caption> is as narrow as its table.
    caption_html = f'<p class="caption">{escape(caption)}</p>' if caption else ""
    return (f'<div class="scroll"><table class="{classes}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{caption_html}")


def empty_note(text: str) -> str:
    """The one line a section without data shows instead of an empty table."""
    return f'<p class="empty">{escape(text)}</p>'


def figure_html(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{escape(alt)}"><figcaption>{escape(caption)}</figcaption></figure>'


def selection_text() -> str:
    """How the page picks the CoOp numbers it shows, stated once at the top of the results."""
    return ("<p><b>Selection:</b> per dataset × shots, the configuration with the best validation accuracy averaged "
            "over seeds (among those finished on the most seeds); test accuracy never selects. "
            f"<i>{escape(COOP_BEST_NAME)}</i> picks among all the sweep's configurations (listed under Selected "
            "configurations), each CoOp variant row among that variant's (e.g. learning rates). "
            "<b>Numbers:</b> test accuracy (%), mean ± std over seeds; below it the 95% confidence interval, "
            f"{escape(CI_RULE)}.</p>")


def paper_cell(point: AccuracyPoint | None, best: float) -> Any:
    """A results-table cell: mean ± std over seeds with the 95% CI below; the column's best in bold."""
    if point is None or not math.isfinite(point.mean):
        return "–"
    text = escape(mean_std_text(point.mean, point.std, point.n))
    if math.isfinite(best) and round(point.mean, 2) >= round(best, 2):
        text = f"<b>{text}</b>"
    ci = point.ci95
    below = f"<small>CI ± {ci:.2f}</small>" if math.isfinite(ci) else ""
    return ("html", f'<span title="{escape(ci_title(point.std, point.n))}">{text}</span>{below}')


def paper_table(points: Sequence[AccuracyPoint], methods: Sequence[str], datasets: Sequence[str], shots: int) -> str:
    """The table as the papers print it: one row per method, one column per dataset and their average."""
    chosen = [p for p in points if p.shots in (0, shots)]
    average = average_points(chosen, datasets) if len(datasets) > 1 else []
    columns = [*datasets, "Average"] if average else list(datasets)
    cell_of = {(p.method, p.dataset): p for p in (*chosen, *average)}
    best = {c: max((p.mean for (_, d), p in cell_of.items() if d == c and math.isfinite(p.mean)), default=math.nan)
            for c in columns}
    rows, classes = [], []
    for method in methods:
        if not any((method, c) in cell_of for c in columns):
            continue
        rows.append([method_name(method), *[paper_cell(cell_of.get((method, c)), best[c]) for c in columns]])
        classes.append("selected" if method == COOP_BEST else "")
    header = ["method", *[f"{c} ({len(datasets)} datasets)" if c == "Average" else c for c in columns]]
    return table_html(header, rows, classes="paper", row_classes=classes)


def best_config_table(best: Sequence[AccuracyPoint], datasets: Sequence[str], shots: Sequence[int]) -> str:
    """Which configuration the val selection picked per dataset x shots, with the val and test accuracy."""
    cell_of = {(p.dataset, p.shots): p for p in best}
    rows = []
    for dataset in datasets:
        cells: list[Any] = [dataset]
        for k in shots:
            p = cell_of.get((dataset, k))
            cells.append("" if p is None else ("html", f"{escape(p.config)}<br><small>val "
                                                       f"{mean_std_text(p.val_mean)} · test "
                                                       f"{mean_std_text(p.mean)} · {p.n} seeds</small>"))
        rows.append(cells)
    return table_html(["dataset", *map(shots_text, shots)], rows,
                      "The configuration selected per dataset × shots: the best validation accuracy averaged over "
                      "seeds (val and test: means over its seeds, %).", "words")


def section_shots(data: ReportData) -> str:
    coop, baselines, best = data.coop_points, data.baseline_points, data.best_points
    uri = shots_figure(coop, baselines)
    if uri is None:
        return empty_note("No CoOp trials or linear-probe results yet: run the sweep and the baselines stage.")
    all_points = [*baselines, *coop, *best]
    datasets = sorted({p.dataset for p in (*coop, *baselines) if p.shots > 0})
    shots = sorted({p.shots for p in all_points if p.shots > 0})
    probes = sorted({p.method for p in baselines if is_probe(p.method)})
    variants = sorted({p.method for p in coop})
    methods = [ZERO_SHOT, ENSEMBLE, *probes, *variants, *([COOP_BEST] if best else [])]
    parts = [selection_text(), f"<h3>{escape(shots_text(shots[-1]))} per class</h3>",
             paper_table(all_points, methods, datasets, shots[-1])]
    if len(shots) > 1:
        others = "".join(f"<h3>{escape(shots_text(k))} per class</h3>" + paper_table(all_points, methods, datasets, k)
                         for k in reversed(shots[:-1]))
        listed = ", ".join(map(str, shots[:-1]))
        parts.append(f"<details><summary>The same table at {listed} shot{'s' if shots[:-1] != [1] else ''}</summary>"
                     f"{others}</details>")
    parts.append("<h3>Accuracy against shots</h3>" + figure_html(
        uri, "Test accuracy against shots per dataset",
        "Test accuracy (%) against shots per class: CoOp variants and the linear probe (its protocol in the legend) "
        "as mean ± std over seeds (error bars: std), zero-shot CLIP at 0 shots (★ hand-crafted prompt, ▲ prompt "
        "ensemble)." + (" Average: mean of the per-dataset means." if len(datasets) > 1 else "")))
    if best:
        parts.append("<h3>Selected configurations</h3>" + best_config_table(best, datasets, shots))
    long_shots = sorted({p.shots for p in (*coop, *baselines)})
    rows = []
    for dataset in sorted({p.dataset for p in (*coop, *baselines)}):
        for method in [ZERO_SHOT, ENSEMBLE, *probes, *variants]:
            points = {p.shots: p for p in (*coop, *baselines) if p.dataset == dataset and p.method == method}
            if points:
                rows.append([dataset, method_name(method), *[
                    seeds_cell(points[k].mean, points[k].std, points[k].n) if k in points else "" for k in long_shots]])
    parts.append("<details><summary>The figure's numbers: every method at every shot count</summary>"
                 + table_html(["dataset", "method", *map(shots_text, long_shots)], rows,
                              "Test accuracy (%), mean ± std over seeds (hover a number for the 95% CI)", "numbers")
                 + "</details>")
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
        return empty_note(f"No domain-shift results ({shift.source} → {', '.join(shift.targets)}): "
                          f"{data.domain_shift_gap}")
    rows = []
    for name, by_target in summary.accuracy.items():
        cells = [seeds_cell(*by_target[t]) if t in by_target else "" for t in summary.targets]
        rows.append([name, *cells, mean_std_text(summary.target_average[name])])
    header = ["method", *[f"{t} (source)" if t == summary.source else t for t in summary.targets],
              "average (targets)"]
    caption = (f"Contexts learned on {summary.source} with {', '.join(map(str, summary.coop_shots))} shots (every "
               "finished trial of each variant), evaluated on its test set and on the shifted test sets (mean ± std "
               "over seeds; hover a number for the 95% CI); a set of a subset of the classes (ImageNet-A, -R: 200 "
               "classes) uses the contexts' rows of its classes. Test accuracy (%).")
    return table_html(header, rows, caption, "numbers")


def first_class_context(vectors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The vectors of the first class's context (all of a unified one). Classes are told apart by label, as
    two may share a name (ImageNet's 'missile'); files written before labels were recorded have the name only."""
    key = "label" if "label" in vectors[0] else "class"
    return [v for v in vectors if v.get(key) == vectors[0][key]]


def section_words(data: ReportData) -> str:
    if not data.context_words:
        return empty_note("No learned contexts to interpret (no finished trials, or their artifacts are unavailable).")
    entries = [(dataset, entry) for dataset, listed in data.context_words.items() for entry in listed]
    width = max(len(first_class_context(entry["vectors"])) for _, entry in entries)
    rows = []
    for dataset, entry in entries:
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
        rows.append([dataset, ("html", f"<b>{escape(entry['role'])}</b>: {escape(label)}<br><small>{trial['shots']} "
                                       f"shots, seed {trial['seed']}, val {trial['val_acc']:.1f}%</small>"), *cells])
    return table_html(["dataset", "context", *[f"v{i + 1}" for i in range(width)]], rows,
                      "Nearest vocabulary word (Euclidean distance in the token-embedding space) of each learned "
                      "context vector. Per dataset, at its largest shot count: the trial with the best validation "
                      "accuracy, whatever its variant (a class-specific context shows its first class's vectors), and, "
                      "when that one is class-specific, also the best unified context (one context for all classes, "
                      "as in the paper's interpretation table). Hover a word for its top-k.", "words")


def effects_table(effects: Sequence[MatchedEffect]) -> str:
    """The matched comparisons: pooled Δ val and Δ test, and Δ test per shot count (effects often grow or flip
    with the shots)."""
    shots = sorted({k for e in effects for k in e.shots})
    rows = []
    for e in effects:
        condition = settings_text([k for k, _ in e.condition], [v for _, v in e.condition])
        wins = sum(d > 0 for d in e.test_deltas if math.isfinite(d))
        by_shots = [difference_text(mean_std(e.test_deltas_at(k))[0]) for k in shots]
        rows.append([factor_name(e.keys), f"{settings_text(e.keys, e.value)} − {settings_text(e.keys, e.reference)}",
                     condition or "–", str(len(e.test_deltas)), mean_std_text(*mean_std(e.val_deltas)),
                     mean_std_text(*mean_std(e.test_deltas)), f"{wins}/{len(e.test_deltas)}", *by_shots])
    return table_html(["hyperparameter", "difference", "with these fixed", "pairs", "Δ val acc", "Δ test acc",
                       "first better (test)", *[f"Δ test at {shots_text(k)}" for k in shots]], rows,
                      "Matched comparisons: each pair is two trials of the same dataset, shots and seed that differ "
                      "only in this hyperparameter (every other one equal, including those the sweep did not vary); "
                      "Δ = first − second in percentage points, mean ± std over the pairs, pooled over datasets, shot "
                      "counts and seeds, then the mean per shot count. A difference holds for the settings in 'with "
                      "these fixed' only.", "numbers effects")


def section_sweep(data: ReportData) -> str:
    if not data.finished_trials:
        return empty_note("No finished trials: nothing to say about hyperparameters yet.")
    trials = data.finished_trials
    effects, unmatched = matched_effects(trials)
    parts = [f"<p>{len(trials)} finished trials of a {escape(data.search)} search "
             f"(<small>{escape(data.search_source)}</small>).</p>"]
    uri = effects_figure(effects)
    if uri is None:
        parts.append(empty_note("The sweep varied no hyperparameter with everything else fixed (same dataset, shots, "
                                "seed and other hyperparameters): there is no matched comparison to show."))
    else:
        parts.append(figure_html(uri, "Matched accuracy differences per hyperparameter against shots",
                                 "Test-accuracy difference (percentage points) between trials that differ only in "
                                 "one hyperparameter (same dataset, shots, seed and all other hyperparameters), mean "
                                 "± std over the pairs at each shot count, one line per comparison; the settings "
                                 "held fixed in parentheses."))
        parts.append(effects_table(effects))
    for keys in unmatched:
        parts.append(f'<p class="note">{escape(factor_name(keys))}: no two trials differ in it alone (same dataset, '
                     "shots, seed and other hyperparameters), so its effect cannot be told apart from the others'; "
                     "a grid over it would.</p>")
    covering, left_out = importance_trials(trials)
    keys = varied_hyperparameters(covering)
    if not covering:
        parts.append(empty_note("Parameter importances: not computed. All the trials come from "
                                f"{'Optuna TPE' if data.search == 'optuna' else data.search} sampling, which "
                                "concentrates on the regions it found good; fANOVA assumes trials that cover the "
                                "space. Run a grid or random sweep for importances."))
        return "\n".join(parts)
    importances, why = param_importances(covering, keys)
    if importances is None:
        parts.append(empty_note(f"Parameter importances: not computed ({why})."))
    else:
        parts.append(table_html(
            ["hyperparameter", "importance"], [[k, f"{v:.3f}"] for k, v in importances.items()],
            f"fANOVA importances (optuna.importance, seed 0) on an Optuna study rebuilt from the {len(covering)} "
            "finished grid/random-search trials; objective: val accuracy minus its dataset × shots × seed mean. "
            "Hyperparameters the sweep only changed together share one importance"
            + (f"; {left_out}." if left_out else "."), "numbers"))
    return "\n".join(parts)


def method_order(method: str) -> tuple[int, str]:
    """The learned methods in the papers' order (CoOp, CoCoOp, KgCoOp), unknown ids after them."""
    known = list(LEARNED_METHOD_NAMES)
    return (known.index(method), "") if method in known else (len(known), method)


def backbone_text(arch: str, pretrained: str | None) -> str:
    return f"{arch}/{pretrained or 'random weights'}"


def published_note(data: ReportData, block: dict[str, Any]) -> str:
    """Where a published table comes from, and why its numbers are reference points and not ours to beat."""
    theirs = backbone_text(block["backbone"]["arch"], block["backbone"]["pretrained"])
    ours = backbone_text(data.params.backbone.arch, data.params.backbone.pretrained)
    text = (f"<p><b>Published</b>: {escape(block['source'])}; backbone {escape(theirs)}, {block['shots']} shots, the "
            "papers' datasets.</p>")
    if ours != theirs:
        return text + (f'<p class="warn">Our backbone is {escape(ours)}, the published numbers are {escape(theirs)} '
                       "on the papers' real datasets: they are reference points for the methods' ranking and the "
                       "size of their gaps, not numbers comparable with ours.</p>")
    return text + ('<p class="note">Same backbone as ours, but the datasets, splits and recipe may differ: reference '
                   "points, not a reproduction target.</p>")


def selected_cell(config: str, val: float, what: str) -> Any:
    """The selected configuration and the seed-averaged val accuracy it was selected on."""
    return ("html", f"{escape(config)}<br><small>{escape(what)} val {mean_std_text(val)}</small>")


def h_cell(result: BaseNewResult) -> Any:
    """H of the seed-mean base and new accuracies; below it, the trials' own H (mean ± std over seeds)."""
    if not math.isfinite(result.h):
        return "–"
    mean, std, n = result.seed_h
    below = f"<small>per seed {escape(mean_std_text(mean, std, n))}</small>" if n else ""
    return ("html", f"{result.h:.2f}{below}")


def base_new_method_name(method: str) -> str:
    return METHOD_NAMES[ZERO_SHOT] if method == ZERO_SHOT else learned_method_name(method)


def base_new_order(method: str) -> tuple[int, tuple[int, str]]:
    return (0, (0, "")) if method == ZERO_SHOT else (1, method_order(method))  # CLIP first, as Table 1


def base_to_new_table(results: Sequence[BaseNewResult], averages: Sequence[BaseNewResult],
                      datasets: Sequence[str]) -> str:
    """Rows: dataset x method (zero-shot CLIP, then each method's selected configuration), then each method's
    average over the datasets."""
    rows = []
    for dataset in datasets:
        for r in sorted((r for r in results if r.base.dataset == dataset), key=lambda r: base_new_order(r.base.method)):
            selected = ("hand-crafted prompt" if r.base.method == ZERO_SHOT
                        else selected_cell(r.base.config, r.base.val_mean, "base"))
            rows.append([dataset, base_new_method_name(r.base.method), selected,
                         paper_cell(r.base, math.nan), paper_cell(r.new, math.nan), h_cell(r)])
    for r in sorted(averages, key=lambda r: base_new_order(r.base.method)):
        rows.append([f"Average ({len(datasets)} datasets)", base_new_method_name(r.base.method), "",
                     mean_std_text(r.base.mean), mean_std_text(r.new.mean), h_cell(r)])
    return table_html(["dataset", "method", "selected configuration", "Base", "New", "H"], rows,
                      "Test accuracy (%) on the base classes (Base) and on the new classes (New), mean ± std over "
                      "seeds with the 95% CI below; H = 2·Base·New / (Base + New) of the seed means (as CoCoOp's "
                      "Table 1), with each trial's own H below. Average: mean over the datasets of the per-dataset "
                      "means, H of those averages.", "paper b2n")


def published_base_to_new_table(data: ReportData, datasets: Sequence[str]) -> str:
    """The published base-to-new rows of the sweep's datasets, then the papers' 11-dataset averages."""
    published = base_to_new_rows(data.published)
    rows = []
    for dataset in datasets:
        for p in published:
            if dataset in p.datasets:
                cell = p.datasets[dataset]
                rows.append([dataset, f"{p.name} (published)", f"{cell.base:.2f}", f"{cell.new:.2f}", f"{cell.h:.2f}"])
    count = max(len(p.datasets) for p in published)
    for p in published:
        rows.append([f"Average ({count} datasets)", f"{p.name} (published)", f"{p.average.base:.2f}",
                     f"{p.average.new:.2f}", f"{p.average.h:.2f}"])
    block = data.published["base_to_new"]
    return table_html(["dataset", "method", "Base", "New", "H"], rows,
                      "Published base-to-new results, as printed: "
                      + "; ".join(f"{p.name}: {p.text}" + ("" if p.source == block["source"] else f" ({p.source})")
                                  for p in published)
                      + f". Where the numbers were read: {block['found_in']} {block['rounding']}", "numbers")


def section_base_to_new(data: ReportData) -> str:
    results = base_to_new_results(data.finished_trials)
    if not results:
        return empty_note("The sweep has base-to-new trials (protocol base2new) but none finished.")
    block = data.published["base_to_new"]
    parts = ["<p><b>Selection:</b> per method × dataset × shots, the base-to-new configuration with the best "
             "validation accuracy on the base classes averaged over seeds (among those finished on the most seeds); "
             "the new classes are never seen in training nor used to select. <b>Numbers:</b> test accuracy (%), "
             f"mean ± std over seeds, 95% CI {escape(CI_RULE)}.</p>"]
    for shots in sorted({r.base.shots for r in results}, reverse=True):
        mine = [r for r in results if r.base.shots == shots]
        datasets = sorted({r.base.dataset for r in mine})
        mine += [r for r in zero_shot_base_new(data.baseline_rows, shots) if r.base.dataset in datasets]
        averages = base_to_new_averages(mine, datasets) if len(datasets) > 1 else []
        parts.append(f"<h3>{escape(shots_text(shots))} per class</h3>" + base_to_new_table(mine, averages, datasets))
    datasets = sorted({r.base.dataset for r in results})
    parts.append("<h3>Published (CoCoOp's and KgCoOp's Table 1)</h3>" + published_note(data, block)
                 + published_base_to_new_table(data, datasets))
    return "\n".join(parts)


def transfer_source_table(rows: Sequence[TransferRow], source: str, targets: Sequence[str],
                          zero_shot: dict[str, float]) -> str:
    """One source's transfer table: zero-shot CLIP on each dataset (`zero_shot`, where the baselines have it),
    then a row per method (and shot count), its source accuracy, each target, the targets' average."""
    several_shots = len({r.shots for r in rows}) > 1
    body = []
    if source in zero_shot and all(t in zero_shot for t in targets):
        body.append([("html", f"{escape(METHOD_NAMES[ZERO_SHOT])}<br><small>hand-crafted prompt</small>"),
                     f"{zero_shot[source]:.2f}", *[f"{zero_shot[t]:.2f}" for t in targets],
                     mean_std_text(fmean(zero_shot[t] for t in targets)) if targets else "–"])
    for r in sorted(rows, key=lambda r: (method_order(r.method), r.shots)):
        name = learned_method_name(r.method) + (f", {shots_text(r.shots)}" if several_shots else "")
        cells = [seeds_cell(*r.targets[t]) if t in r.targets else "–" for t in targets]
        body.append([("html", f"{escape(name)}<br><small>{escape(r.config)} · val {mean_std_text(r.val_mean)}"
                              "</small>"), seeds_cell(*r.source_acc), *cells, mean_std_text(r.target_average)])
    return table_html(["method (selected configuration)", f"{source} (source)", *targets, "average (targets)"], body,
                      f"Contexts learned on {source} (all its classes), test accuracy (%) on {source}'s test set and "
                      "on each target dataset, mean ± std over seeds (hover a number for the 95% CI); average: mean "
                      "of the per-target means, shown only when every target has a result.", "numbers")


def published_transfer_table(data: ReportData) -> str:
    block = data.published["cross_dataset"]
    published = cross_dataset_rows(data.published)
    targets = list(published[0].targets)
    rows = [[f"{p.name} (published)", f"{p.source_accuracy:.2f}", *[f"{p.targets[t]:.2f}" for t in targets],
             f"{p.average:.2f}"] for p in published]
    return table_html(["method", f"{block['source_dataset']} (source)", *targets, "average (targets)"], rows,
                      f"Published cross-dataset transfer, as printed. {block['not_recorded']} Where the numbers "
                      f"were read: {block['found_in']}", "numbers")


def section_transfer(data: ReportData) -> str:
    rows, targets = transfer_table(data.finished_trials, data.transfer_rows)
    if not rows:
        return empty_note("The sweep has cross-dataset trials (protocol xd) but none finished.")
    parts = ["<p><b>Selection:</b> per method × source × shots, the cross-dataset configuration with the best "
             "validation accuracy on the source averaged over seeds (among those finished on the most seeds); the "
             "targets never select.</p>"]
    zero_shot = {p.dataset: p.mean for p in data.baseline_points if p.method == ZERO_SHOT}
    for source in sorted({r.source for r in rows}):
        mine = [r for r in rows if r.source == source]
        parts.append(f"<h3>Source: {escape(source)}</h3>")
        if source not in targets:
            parts.append(empty_note(
                f"{data.results_dir / TRANSFER_FILE} has no {source} rows (the sweep writes one per cross-dataset "
                "trial and target: transfer.targets, null for every other dataset of data.datasets): only the "
                "accuracy on the source is known."))
        parts.append(transfer_source_table(mine, source, targets.get(source, []), zero_shot))
    parts.append("<h3>Published (CoCoOp's Table 2)</h3>" + published_note(data, data.published["cross_dataset"])
                 + published_transfer_table(data))
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
        ["shots, seeds", f"shots {', '.join(map(str, params.data.shots))}; seeds "
                         f"{', '.join(map(str, params.data.seeds))}"],
        ["search", f"{data.search}, {len(data.trial_rows)} trials ("
                   + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ")"],
        ["results", f"{data.results_dir} · {data.baselines_dir}"],
        ["MLflow", f"{params.tracking.uri}, experiment {params.tracking.experiment}"],
        ["generated", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {git_short_commit()}"],
    ]
    protocols: dict[str, int] = defaultdict(int)
    methods: set[str] = set()
    for r in data.trial_rows:
        if r.get("protocol"):
            protocols[r["protocol"]] += 1
            methods.add(r.get("method") or DEFAULT_METHOD)
    if protocols:  # trials.csv from a sweep with methods and protocols as dimensions
        order = [p for p in PROTOCOL_NAMES if p in protocols] + sorted(set(protocols) - set(PROTOCOL_NAMES))
        counts = ", ".join(f"{PROTOCOL_NAMES.get(p, p)} {protocols[p]}" for p in order)
        names = ", ".join(learned_method_name(m) for m in sorted(methods, key=method_order))
        rows.insert(4, ["protocols, methods", f"{counts} trials; {names}"])
    warn = ""
    if pretrained is None:
        warn = ('<p class="warn">This backbone has random weights: every accuracy here shows that the pipeline runs, '
                "not what CoOp achieves. Set backbone.pretrained (e.g. openai) for real numbers.</p>")
    notes = "".join(f'<p class="warn">{escape(n)}</p>' for n in data.notes)
    return warn + notes + table_html(["", ""], rows, classes="meta")


def render(data: ReportData) -> str:
    """The whole page: header, table of contents and the sections (base-to-new and cross-dataset transfer only
    when the sweep has trials of those protocols)."""
    protocols = {r.get("protocol") for r in data.trial_rows}
    sections = [
        ("accuracy", "Test accuracy per dataset and against shots", section_shots(data)),
        ("published", "Our 16-shot results next to the published ones", section_published(data)),
        *([("base2new", "Base-to-new generalisation", section_base_to_new(data))] if BASE2NEW in protocols else []),
        *([("transfer", "Cross-dataset transfer", section_transfer(data))] if XD in protocols else []),
        ("domain", "Domain generalisation", section_domain(data)),
        ("words", "Interpreting the learned contexts", section_words(data)),
        ("sweep", "The sweep: hyperparameters", section_sweep(data)),
    ]
    toc = " · ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    body = "\n".join(f'<h2 id="{key}">{escape(title)}</h2>\n{html}' for key, title, html in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>CoOp sweep report</title>'
            f"<style>{PAGE_CSS}</style></head><body>\n<h1>CoOp sweep report</h1>\n<p>{toc}</p>\n{header_html(data)}\n"
            f"{body}\n</body></html>\n")
