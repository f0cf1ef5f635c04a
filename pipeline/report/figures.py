"""The report's figures (matplotlib, Agg), each returned as an inline PNG data URI."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from pipeline.evaluate.methods import ENSEMBLE, ZERO_SHOT
from pipeline.report.labels import (
    HYPERPARAMETER_NAMES,
    METHOD_NAMES,
    is_probe,
    method_name,
    value_name,
)
from pipeline.report.statistics import AccuracyPoint, ValueEffect, average_points


def png_data_uri(fig: Any) -> str:
    """The figure as a base64 PNG data URI (the page needs no other file); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def agg_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: the report draws files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shots_figure(coop: Sequence[AccuracyPoint], baselines: Sequence[AccuracyPoint]) -> str | None:
    """Small multiples: test accuracy against shots per dataset plus the average panel."""
    probes = sorted({p.method for p in baselines if is_probe(p.method)})
    if not coop and not probes:
        return None
    plt = agg_pyplot()
    datasets = sorted({p.dataset for p in coop} | {p.dataset for p in baselines if is_probe(p.method)})
    shots = sorted({p.shots for p in coop} | {p.shots for p in baselines if p.shots > 0})
    position = {k: i + 1 for i, k in enumerate(shots)}  # 0 is zero-shot
    methods = sorted({p.method for p in coop}) + probes
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    panels = [*datasets, "Average"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
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
    return png_data_uri(fig)


def effects_figure(effects: dict[str, list[ValueEffect]]) -> str | None:
    """One box plot per varied hyperparameter: test accuracy minus the setting mean, by value."""
    if not effects:
        return None
    plt = agg_pyplot()
    fig, axes = plt.subplots(1, len(effects), figsize=(3.4 * len(effects), 3.2), squeeze=False)
    for ax, (key, values) in zip(axes.flat, effects.items(), strict=True):
        names = [value_name(key, e.value) for e in values]
        ax.boxplot([[d for d in e.test_deltas if math.isfinite(d)] or [0.0] for e in values], widths=0.5)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20 if max(map(len, names)) > 8 else 0, fontsize=8)
        ax.axhline(0, color="gray", lw=0.8, ls=":")
        ax.set_title(HYPERPARAMETER_NAMES.get(key, key), fontsize=10)
        ax.set_ylabel("test acc. − setting mean (pp)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25, axis="y")
    fig.tight_layout()
    return png_data_uri(fig)
