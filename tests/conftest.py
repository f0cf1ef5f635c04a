"""Shared fixtures: the tiny random-weight CLIP and a small separable few-shot problem on it."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (fixtures_data, ...)

from pipeline.engine.backbone import Backbone, load_backbone  # noqa: E402
from pipeline.engine.inputs import FewShotFeatures  # noqa: E402
from pipeline.engine.prompt import CoOp, PromptConfig  # noqa: E402

CLASSNAMES = ["cat", "golden_retriever", "sports car", "oak tree", "sail boat", "lighthouse"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the demo workspace run the real prepare and features stages as processes: mark them slow."""
    for item in items:
        if "demo_ws" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_ws(tmp_path_factory: pytest.TempPathFactory):
    """The bundled demo after the real prepare and features stages: built once per test session."""
    from sweep_helpers import build_demo_workspace

    return build_demo_workspace(tmp_path_factory.mktemp("demo_ws"))


@pytest.fixture
def report_workspace(tmp_path: Path) -> dict:
    """Hand-made trials.csv and baselines.csv for the report tests (report_helpers.build_report_workspace)."""
    from report_helpers import build_report_workspace

    return build_report_workspace(tmp_path)


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
        backbone = load_backbone("coop-tiny", None)
        logging.getLogger().setLevel(logging.WARNING)
    return backbone


def teacher_means(backbone: Backbone, classnames: list[str], cfg: PromptConfig, seed: int = 99) -> torch.Tensor:
    """Class text features of a CoOp model with a hidden random context: a target `cfg` can represent."""
    teacher = CoOp(backbone, classnames, cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ctx = teacher.prompt_learner.ctx
        ctx.copy_(torch.empty(ctx.shape).normal_(0, 0.05, generator=torch.Generator().manual_seed(seed)))
        return teacher.text_features()


def separable_problem(
    backbone: Backbone,
    classnames: list[str],
    shots: int = 8,
    views: int = 2,
    seed: int = 0,
    means: torch.Tensor | None = None,
) -> FewShotFeatures:
    """Image features scattered tightly around class directions (random unless `means` is given)."""
    g = torch.Generator().manual_seed(seed)
    dim = backbone.embed_dim
    if means is None:
        means = torch.nn.functional.normalize(torch.randn(len(classnames), dim, generator=g), dim=-1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(len(classnames)).repeat_interleave(n)
        return means[y] + 0.3 * torch.randn(len(y), dim, generator=g) / dim**0.5, y

    train, train_y = sample(shots * views)
    val, val_y = sample(4)
    test, test_y = sample(10)
    return FewShotFeatures(
        classnames=list(classnames),
        train=train.view(len(classnames), shots, views, dim).flatten(0, 1),
        train_labels=train_y.view(len(classnames), shots, views)[:, :, 0].flatten(),
        val=val,
        val_labels=val_y,
        test=test,
        test_labels=test_y,
        dataset="synthetic",
    )
