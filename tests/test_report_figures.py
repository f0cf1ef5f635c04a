"""The report's figures as drawn: panels per dataset (an average only over several), a legend clear of every
axis label, the matched comparisons' lines named with what they hold fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from report_helpers import DEMO_DATASETS, build_demo_report_workspace

from pipeline.report.collect import collect
from pipeline.report.figures import agg_pyplot, draw_effects, draw_shots
from pipeline.report.statistics import matched_effects


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return collect(build_demo_report_workspace(tmp_path_factory.mktemp("figures"))["params"])


def visible_axes(fig: Any) -> list[Any]:
    return [ax for ax in fig.axes if ax.axison]


def overlaps(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def assert_legends_clear(fig: Any) -> None:
    """No legend box overlaps any axes' tight box (its tick labels and axis labels included), nor leaves the
    figure (whose saved image is cropped to its contents)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in visible_axes(fig):
            parts = [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), ax.patch]
            for part in parts:
                assert not overlaps(box, part.get_window_extent(renderer)), (legend, ax.get_title(), part)


def test_one_panel_per_dataset_and_their_average(demo_data: Any) -> None:
    fig = draw_shots(demo_data.coop_points, demo_data.baseline_points)
    titles = [ax.get_title() for ax in visible_axes(fig)]
    assert titles == [*sorted(DEMO_DATASETS), "Average (3 datasets)"]
    assert all(ax.get_xlabel() == "shots per class" for ax in visible_axes(fig))
    assert_legends_clear(fig)
    agg_pyplot().close(fig)


def test_a_single_dataset_has_no_average_panel(demo_data: Any) -> None:
    coop = [p for p in demo_data.coop_points if p.dataset == "WorldSketch"]
    baselines = [p for p in demo_data.baseline_points if p.dataset == "WorldSketch"]
    fig = draw_shots(coop, baselines)
    assert [ax.get_title() for ax in visible_axes(fig)] == ["WorldSketch"]
    assert_legends_clear(fig)
    agg_pyplot().close(fig)


def test_effects_figure_names_each_comparison_and_orders_shots_numerically(demo_data: Any) -> None:
    effects, _ = matched_effects(demo_data.finished_trials)
    fig = draw_effects(effects)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["context length M + initialisation", "class-specific context (CSC)"]
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in axes]
    assert labels == [["M=16, random init − M=4, init 'a photo of a' (unified)"], ["CSC − unified (M=16, random init)"]]
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1", "2", "4", "8", "16"]
    assert_legends_clear(fig)
    agg_pyplot().close(fig)


def test_no_points_no_figure(tmp_path: Path) -> None:
    assert draw_shots([], []) is None and draw_effects([]) is None
