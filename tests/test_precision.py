"""The official `PREC: fp16` semantics (fp16-official): an fp16 context updated by plain SGD, no loss scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES

from pipeline.engine.prompt import PromptConfig
from pipeline.engine.train import TrainConfig, TrainStep, build_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _batch(tiny, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(n, tiny.embed_dim, generator=g), dim=-1)
    return x, torch.randint(len(CLASSNAMES), (n,), generator=g)


@pytest.mark.parametrize("csc", [False, True])
def test_official_fp16_is_plain_sgd_on_an_fp16_context(tiny, csc):
    """One step equals SGD done by hand in fp16 arithmetic on the fp16 context (momentum buffer, weight decay)."""
    cfg = TrainConfig(precision="fp16-official", lr=0.002)
    model = build_model(tiny, CLASSNAMES, PromptConfig(n_ctx=4, csc=csc), cfg, torch.Generator().manual_seed(0))
    ctx = model.prompt_learner.ctx
    assert ctx.dtype == torch.float16
    step = TrainStep(model, cfg)
    assert not step.scaler.is_enabled()
    x, y = _batch(tiny)
    before = ctx.detach().clone()
    # The reference gradient: the same forward, autograd on the same fp16 parameter, no scaling.
    loss = F.cross_entropy(model(x).float(), y)
    (grad,) = torch.autograd.grad(loss, ctx)
    assert grad.dtype == torch.float16
    step(x, y)
    # SGD's update in fp16 tensors (each add rounds once, as torch's fused add does): d_p = g + wd * p, and
    # on the first step the momentum buffer is d_p itself.
    d_p = grad.add(before, alpha=cfg.weight_decay)
    expected = before.add(d_p, alpha=-cfg.lr)
    assert ctx.dtype == torch.float16
    assert torch.equal(ctx.detach(), expected)


def test_official_fp16_loses_updates_below_half_an_ulp(tiny):
    """The reason it is not our default: late, tiny updates vanish in fp16 but move an fp32 context."""
    x, y = _batch(tiny)
    moved = {}
    for precision in ("fp16-official", "fp32"):
        cfg = TrainConfig(precision=precision, lr=1e-7, weight_decay=0.0, momentum=0.0)
        model = build_model(tiny, CLASSNAMES, PromptConfig(n_ctx=4), cfg, torch.Generator().manual_seed(0))
        before = model.prompt_learner.ctx.detach().float().clone()
        TrainStep(model, cfg)(x, y)
        moved[precision] = int((model.prompt_learner.ctx.detach().float() != before).sum())
        n_values = before.numel()
    # Nearly every fp32 value moves; in fp16 only values so small that their ulp is below the update can.
    assert moved["fp32"] > 0.9 * n_values
    assert moved["fp16-official"] < 0.05 * n_values


def test_official_fp16_trains_and_saves_an_fp32_context(tiny):
    from conftest import separable_problem

    from pipeline.engine.train import train_coop

    data = separable_problem(tiny, CLASSNAMES)
    result = train_coop(tiny, data, PromptConfig(n_ctx=4), TrainConfig(precision="fp16-official", epochs=3),
                        progress=False)
    assert result.model.prompt_learner.ctx.dtype == torch.float16
    assert result.ctx.dtype == torch.float32
    assert torch.equal(result.ctx.half().float(), result.ctx)  # exactly the fp16 values
    assert result.test_acc == result.test_acc  # a number, not NaN


def test_official_fp16_is_a_precision_everywhere_params_go():
    from pipeline.params import ParamsError, params_from_dict
    from pipeline.sweep.space import build_space

    params = params_from_dict({"train": {"precision": "fp16-official"},
                               "sweep": {"space": {"precision": ["fp16", "fp16-official"]}}})
    assert params.train.precision == "fp16-official"
    assert build_space(params).values["precision"] == ("fp16", "fp16-official")
    with pytest.raises(ParamsError, match="train.precision must be one of .*fp16-official"):
        params_from_dict({"train": {"precision": "fp16_official"}})
