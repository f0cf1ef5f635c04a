"""The report's figures (matplotlib, Agg): drawn as figures (draw_*), put on the page as inline PNG data URIs."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from pipeline.evaluate.methods import ENSEMBLE, ZERO_SHOT
from pipeline.report.labels import METHOD_NAMES, factor_name, is_probe, method_name, settings_text
from pipeline.report.statistics import AccuracyPoint, MatchedEffect, average_points, mean_std


def png_data_uri(fig: Any) -> str:
    """The figure as a base64 PNG data URI (the page needs no other file); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def agg_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: the report draws files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shots_figure(coop: Sequence[AccuracyPoint], baselines: Sequence[AccuracyPoint]) -> str | None:
    """draw_shots as an inline PNG."""
    fig = draw_shots(coop, baselines)
    return None if fig is None else png_data_uri(fig)


def draw_shots(coop: Sequence[AccuracyPoint], baselines: Sequence[AccuracyPoint]) -> Any:
    """Small multiples: test accuracy against shots per dataset, plus the average panel when there are several
    datasets; one legend below the panels. None without CoOp or linear-probe points."""
    probes = sorted({p.method for p in baselines if is_probe(p.method)})
    if not coop and not probes:
        return None
    plt = agg_pyplot()
    datasets = sorted({p.dataset for p in coop} | {p.dataset for p in baselines if is_probe(p.method)})
    shots = sorted({p.shots for p in coop} | {p.shots for p in baselines if p.shots > 0})
    position = {k: i + 1 for i, k in enumerate(shots)}  # 0 is zero-shot
    methods = sorted({p.method for p in coop}) + probes
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    panels = [*datasets, "Average"] if len(datasets) > 1 else datasets
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    # Constrained layout with the legend "outside": matplotlib reserves its room below the axes' labels.
    # 2.9 in per panel: four panels fit the page's ~1150 px column with 8 pt text still ~11 px on screen.
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols, 2.5 * rows + 0.5), squeeze=False, layout="constrained")
    average = average_points([*coop, *baselines], datasets)
    for ax, panel in zip(axes.flat, panels, strict=False):
        points = average if panel == "Average" else [p for p in (*coop, *baselines) if p.dataset == panel]
        for method in methods:
            curve = sorted((p for p in points if p.method == method and p.shots > 0), key=lambda p: p.shots)
            if not curve:
                continue
            xs = [position[p.shots] for p in curve]
            ys = [p.mean for p in curve]
            errs = [p.std if math.isfinite(p.std) else 0.0 for p in curve]
            style = "--" if is_probe(method) else "-"
            ax.errorbar(xs, ys, yerr=errs, fmt=style + "o", ms=3.5, capsize=2.5, lw=1.4, color=colours[method],
                        label=method_name(method))
        for method, marker in ((ZERO_SHOT, "*"), (ENSEMBLE, "^")):
            zero = [p for p in points if p.method == method]
            if zero:
                ax.plot([0], [zero[0].mean], marker, ms=11 if marker == "*" else 7, color="black" if marker == "*"
                        else "dimgray", label=METHOD_NAMES[method], ls="none")
                ax.axhline(zero[0].mean, color="lightgray", lw=0.8, ls=":", zorder=0)
        title = f"Average ({len(datasets)} datasets)" if panel == "Average" else panel
        ax.set_title(title, fontsize=9, fontweight="bold" if panel == "Average" else "normal")
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
    fig.legend([handles[label] for label in labels], labels, loc="outside lower center", ncol=min(3, len(labels)),
               fontsize=8, frameon=False)
    return fig


def comparison_label(effect: MatchedEffect) -> str:
    """'CSC − unified (M=16, random init)': the comparison and the settings it holds for."""
    condition = settings_text([k for k, _ in effect.condition], [v for _, v in effect.condition])
    head = f"{settings_text(effect.keys, effect.value)} − {settings_text(effect.keys, effect.reference)}"
    return head + (f" ({condition})" if condition else "")


def effects_figure(effects: Sequence[MatchedEffect]) -> str | None:
    """draw_effects as an inline PNG."""
    fig = draw_effects(effects)
    return None if fig is None else png_data_uri(fig)


def draw_effects(effects: Sequence[MatchedEffect]) -> Any:
    """One panel per hyperparameter: the matched test-accuracy difference (mean ± std over pairs) against shots,
    one line per comparison. None without comparisons."""
    if not effects:
        return None
    plt = agg_pyplot()
    factors = list(dict.fromkeys(e.keys for e in effects))
    shots = sorted({k for e in effects for k in e.shots})
    cols = min(3, len(factors))
    rows = math.ceil(len(factors) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    colours = plt.get_cmap("tab10").colors
    for ax, keys in zip(axes.flat, factors, strict=False):
        mine = [e for e in effects if e.keys == keys]
        for i, effect in enumerate(mine):
            present = [k for k in shots if effect.test_deltas_at(k)]
            stats = [mean_std(effect.test_deltas_at(k)) for k in present]
            ax.errorbar([shots.index(k) for k in present], [m for m, _, _ in stats],
                        yerr=[sd if math.isfinite(sd) else 0.0 for _, sd, _ in stats], fmt="-o", ms=3.5,
                        capsize=2.5, lw=1.4, color=colours[i % len(colours)], label=comparison_label(effect))
        ax.axhline(0, color="gray", lw=0.8, ls=":")
        ax.set_xticks(range(len(shots)), [str(k) for k in shots])
        ax.set_xlabel("shots per class", fontsize=8)
        ax.set_ylabel("Δ test accuracy (pp)", fontsize=8)
        ax.set_title(factor_name(keys).replace(" (always changed together)", ""), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    for ax in list(axes.flat)[len(factors):]:
        ax.axis("off")
    return fig
