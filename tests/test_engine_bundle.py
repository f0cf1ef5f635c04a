"""Fused trial bundles: every member trains as it trains alone with train_coop; failures and stops stay per member."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem

from pipeline.engine import bundle as bundle_module
from pipeline.engine.bundle import BundleMember, BundleStep, train_bundle
from pipeline.engine.methods import MethodConfig
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.train import NonFiniteLossError, TrainConfig, build_model, train_coop

EPOCHS = 5
TOL = 1e-5  # fp32: max abs difference of contexts and of per-epoch losses

# Every variant in one bundle: unified/CSC, end/middle/front, random and word init, n_ctx 4 and 16, two learning
# rates, seeds 1-3 (each seed its own few-shot features and data order), with and without periodic validation.
MIXED = [
    (PromptConfig(16, "", False, "end"), 0.002, 1),
    (PromptConfig(16, "", False, "end"), 0.02, 2),  # shares member 0's prefix length: one shared-prefix pass
    (PromptConfig(4, "a photo of a", False, "middle"), 0.02, 3),
    (PromptConfig(16, "", False, "middle"), 0.02, 2),
    (PromptConfig(4, "a photo of a", False, "end"), 0.002, 3),
    (PromptConfig(4, "", False, "front"), 0.002, 1),
    (PromptConfig(4, "a photo of a", True, "end"), 0.02, 2),
    (PromptConfig(16, "", True, "middle"), 0.002, 3),
    (PromptConfig(4, "", True, "front"), 0.02, 1),
]


@pytest.fixture(scope="module")
def datas(tiny):
    """A different few-shot split (here: features) per seed, as a sweep's seeds draw."""
    return {seed: separable_problem(tiny, CLASSNAMES, seed=seed) for seed in (1, 2, 3)}


def _member(datas, prompt: PromptConfig, lr: float, seed: int, **cfg) -> BundleMember:
    train_cfg = TrainConfig(lr=lr, seed=seed, batch_size=8, eval_every=2 if seed != 2 else 0, **cfg)
    return BundleMember(datas[seed], prompt, train_cfg, EPOCHS)


def _alone(tiny, m: BundleMember):
    return train_coop(tiny, m.data, m.prompt, m.cfg, m.epochs, progress=False)


def _assert_same_training(bundled, alone) -> tuple[float, float]:
    """Context and per-epoch losses within TOL, accuracies equal; returns the two max abs differences."""
    ctx_diff = (bundled.ctx - alone.ctx).abs().max().item()
    loss_diff = max(abs(b.loss - a.loss) for b, a in zip(bundled.epochs, alone.epochs, strict=True))
    assert ctx_diff <= TOL
    assert loss_diff <= TOL
    assert [e.train_acc for e in bundled.epochs] == [e.train_acc for e in alone.epochs]
    assert [e.val_acc for e in bundled.epochs] == [e.val_acc for e in alone.epochs]
    assert [e.lr for e in bundled.epochs] == [e.lr for e in alone.epochs]
    assert (bundled.val_acc, bundled.test_acc) == (alone.val_acc, alone.test_acc)
    return ctx_diff, loss_diff


def test_one_batched_pass_gives_each_member_its_own_text_features(tiny):
    models = [CoOp(tiny, CLASSNAMES, prompt, generator=torch.Generator().manual_seed(seed)) for prompt, _, seed in MIXED]
    step = BundleStep(tiny, models, [TrainConfig()] * len(models))
    with torch.no_grad():
        bundled = step.text_features()  # (members, C, E)
    layout = {p.shared_len: p.members for p in step.passes}
    assert layout[17] == (0, 1)  # end, unified, 16 words: one pass with two prefixes
    assert layout[0] == (5, 6, 7, 8)  # front or CSC: one packed truncated pass
    assert all(p.pack for p in step.passes)
    assert sum(len(p.members) for p in step.passes) == len(MIXED)
    for model, features in zip(models, bundled, strict=True):
        with torch.no_grad():
            assert (model.text_features() - features).abs().max().item() <= 1e-6


def test_cpu_passes_hold_at_most_the_cap_of_prompts(tiny, monkeypatch):
    monkeypatch.setattr(bundle_module, "CPU_MAX_PASS_PROMPTS", 2 * len(CLASSNAMES))  # two members a pass
    models = [CoOp(tiny, CLASSNAMES, prompt, generator=torch.Generator().manual_seed(seed)) for prompt, _, seed in MIXED]
    step = BundleStep(tiny, models, [TrainConfig()] * len(models))
    with torch.no_grad():
        bundled = step.text_features()
    assert [(p.shared_len, p.members) for p in step.passes if not p.shared_len] == [(0, (5, 6)), (0, (7, 8))]
    for model, features in zip(models, bundled, strict=True):
        with torch.no_grad():
            assert (model.text_features() - features).abs().max().item() <= 1e-6


def test_bundle_trains_every_member_as_it_trains_alone(tiny, datas):
    members = [_member(datas, prompt, lr, seed) for prompt, lr, seed in MIXED]
    reported: dict[int, list] = {}
    outcomes = train_bundle(tiny, members, on_epoch=lambda m, e: reported.setdefault(m, []).append(e), progress=False)
    worst = [0.0, 0.0]
    for i, (member, outcome) in enumerate(zip(members, outcomes, strict=True)):
        assert outcome.error is None and not outcome.stopped
        alone = _alone(tiny, member)
        ctx_diff, loss_diff = _assert_same_training(outcome.result, alone)
        worst = [max(worst[0], ctx_diff), max(worst[1], loss_diff)]
        assert reported[i] == outcome.result.epochs
        assert not torch.equal(outcome.result.ctx, _alone_init(tiny, member))  # it really trained
    print(f"max abs difference over {len(members)} members: context {worst[0]:.2e}, epoch loss {worst[1]:.2e}")


def _alone_init(tiny, m: BundleMember) -> torch.Tensor:
    torch.manual_seed(m.cfg.seed)
    model = build_model(tiny, m.data.classnames, m.prompt, m.cfg, torch.Generator().manual_seed(m.cfg.seed))
    return model.prompt_learner.ctx.detach().clone()


def test_a_diverging_member_fails_alone_and_the_others_match(tiny, datas):
    members = [_member(datas, *MIXED[i]) for i in (0, 1, 6)]
    members[1] = dataclasses.replace(members[1], cfg=dataclasses.replace(members[1].cfg, lr=1e6, warmup_epochs=0))
    with pytest.raises(NonFiniteLossError) as alone_error:
        _alone(tiny, members[1])
    assert "epoch 2" in str(alone_error.value)  # it diverges mid-run, after a full epoch
    outcomes = train_bundle(tiny, members, progress=False)
    failed = outcomes[1]
    assert failed.result is None
    assert isinstance(failed.error, NonFiniteLossError)
    assert str(failed.error) == str(alone_error.value)
    for i in (0, 2):
        _assert_same_training(outcomes[i].result, _alone(tiny, members[i]))
    (alone_in_bundle,) = train_bundle(tiny, [members[1]], progress=False)  # no member left: the bundle ends
    assert str(alone_in_bundle.error) == str(alone_error.value)


def test_a_member_stopped_by_on_epoch_stops_and_the_others_match(tiny, datas):
    members = [_member(datas, *MIXED[i]) for i in (2, 4, 8)]
    calls: list[tuple[int, int]] = []

    def on_epoch(member: int, metrics) -> bool | None:
        calls.append((member, metrics.epoch))
        if member == 2 and metrics.epoch == 1:
            raise RuntimeError("reporting failed")
        return False if (member, metrics.epoch) == (1, 2) else None

    outcomes = train_bundle(tiny, members, on_epoch=on_epoch, progress=False)
    assert [e for m, e in calls if m == 1] == [1, 2]
    assert [e for m, e in calls if m == 2] == [1]
    stopped = outcomes[1]
    assert stopped.stopped and stopped.error is None
    assert [e.epoch for e in stopped.result.epochs] == [1, 2]
    assert math.isnan(stopped.result.test_acc)
    assert stopped.result.val_acc == stopped.result.epochs[-1].val_acc  # eval_every 2: validated at epoch 2
    assert isinstance(outcomes[2].error, RuntimeError) and outcomes[2].result is None

    # Alone, the stopped member's context after 2 of its 5 epochs (the schedule runs to 5):
    built: list[CoOp] = []
    at_epoch_2: list[torch.Tensor] = []

    def build(*args):
        built.append(build_model(*args))
        return built[-1]

    def snapshot(metrics) -> None:
        if metrics.epoch == 2:
            at_epoch_2.append(built[0].prompt_learner.ctx.detach().clone())

    m = members[1]
    alone = train_coop(tiny, m.data, m.prompt, m.cfg, m.epochs, on_epoch=snapshot, progress=False, build=build)
    assert (stopped.result.ctx - at_epoch_2[0]).abs().max().item() <= TOL
    assert [e.loss for e in stopped.result.epochs] == pytest.approx([e.loss for e in alone.epochs[:2]], abs=TOL)
    _assert_same_training(outcomes[0].result, _alone(tiny, members[0]))


def _changed(datas, field_name: str, value) -> list[BundleMember]:
    members = [_member(datas, *MIXED[0]), _member(datas, *MIXED[1])]
    second = members[1]
    if field_name in ("epochs", "method"):
        members[1] = dataclasses.replace(second, **{field_name: value})
    elif field_name in ("batch_size", "precision"):
        members[1] = dataclasses.replace(second, cfg=dataclasses.replace(second.cfg, **{field_name: value}))
    else:
        members[1] = dataclasses.replace(second, data=value(second.data))
    return members


@pytest.mark.parametrize(
    ("field_name", "value", "message"),
    [
        ("epochs", 3, r"share the epochs: member 0 has 5, member 1 has 3"),
        ("batch_size", 16, r"share the batch size: member 0 has 8, member 1 has 16"),
        ("data", lambda d: dataclasses.replace(d, train=d.train[:36], train_labels=d.train_labels[:36]),
         r"share the steps per epoch: member 0 has '6 \(48 training images / batch 8\)', member 1 has '4 \(36"),
        ("data", lambda d: dataclasses.replace(d, dataset="other"),
         r"share the dataset: member 0 has 'synthetic', member 1 has 'other'"),
        ("data", lambda d: dataclasses.replace(d, classnames=[*d.classnames[:-1], "zebra"]), r"share the class names"),
        ("precision", "bf16", r"share the precision: member 0 has 'fp32', member 1 has 'bf16'"),
        ("method", MethodConfig("cocoop"), r"member 1 trains method 'cocoop': bundles train CoOp only"),
        ("method", MethodConfig("kgcoop"), r"member 1 trains method 'kgcoop': bundles train CoOp only"),
    ],
    ids=["epochs", "batch", "steps", "dataset", "classnames", "precision", "cocoop", "kgcoop"],
)
def test_members_that_do_not_share_the_problem_are_refused(tiny, datas, field_name, value, message):
    with pytest.raises(ValueError, match=message):
        train_bundle(tiny, _changed(datas, field_name, value), progress=False)


def test_bad_members_are_refused_naming_the_member(tiny, datas):
    with pytest.raises(ValueError, match="at least one member"):
        train_bundle(tiny, [], progress=False)
    bad = dataclasses.replace(_member(datas, *MIXED[0]), prompt=PromptConfig(n_ctx=0))
    with pytest.raises(ValueError, match=r"bundle member 1: n_ctx must be >= 1"):
        train_bundle(tiny, [_member(datas, *MIXED[0]), bad], progress=False)
    unset = dataclasses.replace(_member(datas, *MIXED[0]), epochs=None)
    with pytest.raises(ValueError, match=r"bundle member 0: epochs is not set"):
        train_bundle(tiny, [unset], progress=False)


def test_bundle_step_loss_is_each_members_cross_entropy(tiny):
    """One step's losses and correct counts equal each member's own CoOp.loss on its batch."""
    models = [CoOp(tiny, CLASSNAMES, prompt, generator=torch.Generator().manual_seed(seed)) for prompt, _, seed in MIXED]
    step = BundleStep(tiny, models, [TrainConfig()] * len(models))
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(len(models), 8, tiny.embed_dim, generator=g), dim=-1)
    y = torch.randint(len(CLASSNAMES), (len(models), 8), generator=g)
    with torch.no_grad():
        expected = [model.loss(x[i], y[i]) for i, model in enumerate(models)]
    losses, correct = step(x, y)
    assert losses == pytest.approx([loss.item() for loss, _ in expected], abs=1e-6)
    assert correct == [int((logits.argmax(-1) == y[i]).sum()) for i, (_, logits) in enumerate(expected)]
