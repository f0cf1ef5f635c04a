"""The CoOp engine: exactness of the fast text paths, training behaviour, variants, and bad input."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem, teacher_means

from pipeline.engine.backbone import (
    WeightsUnavailableError,
    count_tokens,
    load_backbone,
    load_params_backbone,
    weights_fingerprint,
)
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.engine.reference import official_logits
from pipeline.engine.train import TrainConfig, default_epochs, lr_at_epoch, train_coop

VARIANTS = list(itertools.product(["end", "middle", "front"], [False, True], ["", "a photo of a"]))


def _variant_id(v: tuple) -> str:
    pos, csc, init = v
    return f"{pos}-{'csc' if csc else 'unified'}-{'words' if init else 'random'}"


def _model(backbone, classnames, variant, n_ctx=6, shared=True, seed=3, precision="fp32", pack=None) -> CoOp:
    pos, csc, init = variant
    cfg = PromptConfig(n_ctx=n_ctx, ctx_init=init, csc=csc, class_token_position=pos)
    model = CoOp(backbone, classnames, cfg, precision, shared, torch.Generator().manual_seed(seed), pack)
    if init:  # word init starts every class from the same words; perturb so the test sees real differences
        with torch.no_grad():
            model.prompt_learner.ctx.add_(
                0.02
                * torch.randn(model.prompt_learner.ctx.shape, generator=torch.Generator().manual_seed(seed))
            )
    return model


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("shared", [False, True], ids=["truncated", "shared-prefix"])
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_fast_paths_equal_official_77_token_reference(tiny, variant, shared, pack):
    model = _model(tiny, CLASSNAMES, variant, shared=shared, pack=pack)
    assert model.pack_tokens == pack  # CLASSNAMES are 1 and 2 tokens long: there is padding to skip
    pos, _, init = variant
    images = F.normalize(torch.randn(9, tiny.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    ctx_ref = model.prompt_learner.ctx.detach().clone().requires_grad_(True)

    ours = model(images)
    ref = official_logits(tiny, CLASSNAMES, ctx_ref, pos, images, init)
    assert model.prompt_learner.length < 77  # the fast path really is truncated
    assert (ours - ref).abs().max().item() <= 1e-5

    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    grad, grad_ref = model.prompt_learner.ctx.grad, ctx_ref.grad
    assert grad_ref.abs().max() > 0
    assert ((grad - grad_ref).norm() / grad_ref.norm()).item() <= 1e-5


def test_shared_prefix_is_used_exactly_where_it_applies(tiny):
    for variant in VARIANTS:
        pos, csc, init = variant
        model = _model(tiny, CLASSNAMES, variant, n_ctx=6)
        expected = not csc and pos in ("end", "middle")
        assert model.shared_prefix == expected, variant
        if expected:
            n_ctx = 4 if init else 6  # "a photo of a" is 4 tokens
            assert model.prompt_learner.shared_len == 1 + (n_ctx if pos == "end" else n_ctx // 2)


@pytest.fixture(scope="module")
def rn50():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone("RN50", None)


@pytest.mark.parametrize(
    "variant", [("end", False, ""), ("middle", False, ""), ("front", True, "")], ids=_variant_id
)
def test_rn50_text_tower_matches_reference(rn50, variant):
    """The real RN50 text tower (12 layers, width 512; random weights cost the same)."""
    names = ["airplane", "golden retriever", "a rather long and unusual class name", "x", "tabby_cat"]
    model = _model(rn50, names, variant, n_ctx=16)
    images = F.normalize(torch.randn(4, rn50.embed_dim), dim=-1)
    with torch.no_grad():
        ours = model(images)
        ref = official_logits(rn50, names, model.prompt_learner.ctx, variant[0], images)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_only_the_context_is_trained(tiny):
    data = separable_problem(tiny, CLASSNAMES)
    before = weights_fingerprint(tiny.model, tiny.arch)
    result = train_coop(tiny, data, PromptConfig(n_ctx=4), TrainConfig(), epochs=2, progress=False)
    trainable = [name for name, p in result.model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_learner.ctx"]
    assert all(p.grad is None for p in tiny.model.parameters())
    assert weights_fingerprint(tiny.model, tiny.arch) == before
    assert result.model.prompt_learner.ctx.grad is not None


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_training_lowers_loss_and_raises_accuracy(tiny, variant):
    pos, csc, init = variant
    cfg = PromptConfig(n_ctx=4, ctx_init=init, csc=csc, class_token_position=pos)
    data = separable_problem(tiny, CLASSNAMES, means=teacher_means(tiny, CLASSNAMES, cfg))
    result = train_coop(
        tiny, data, cfg, TrainConfig(lr=0.02, batch_size=16, warmup_epochs=0), epochs=25, progress=False
    )
    first, last = result.epochs[0], result.epochs[-1]
    assert last.loss < 0.75 * first.loss
    assert last.train_acc > first.train_acc
    assert result.test_acc > 100 / len(CLASSNAMES) * 2  # well above chance


def test_same_seed_gives_bitwise_identical_context(tiny):
    data = separable_problem(tiny, CLASSNAMES)
    cfg = PromptConfig(n_ctx=4, csc=True, class_token_position="middle")
    runs = [train_coop(tiny, data, cfg, TrainConfig(seed=s), epochs=3, progress=False).ctx for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_epoch_curves_and_periodic_validation(tiny):
    data = separable_problem(tiny, CLASSNAMES)
    seen = []
    result = train_coop(
        tiny,
        data,
        PromptConfig(n_ctx=2),
        TrainConfig(eval_every=2),
        epochs=5,
        on_epoch=seen.append,
        progress=False,
    )
    assert [m.epoch for m in seen] == [1, 2, 3, 4, 5]
    assert [m.val_acc is not None for m in seen] == [False, True, False, True, True]
    assert seen[0].lr == pytest.approx(1e-5)
    assert seen[1].lr == pytest.approx(0.002)
    assert result.val_acc == seen[-1].val_acc


def test_lr_schedule_matches_torch_warmup_plus_cosine():
    """Reference: a constant warm-up epoch, then torch's CosineAnnealingLR stepped once per epoch."""
    cfg = TrainConfig(lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
    epochs = 10
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    expected = [1e-5]
    for _ in range(1, epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert [lr_at_epoch(e, cfg, epochs) for e in range(epochs)] == pytest.approx(expected)


def test_default_epochs_follow_coop():
    assert [default_epochs("Caltech101", k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert default_epochs("ImageNet", 16) == 50


def test_word_init_sets_n_ctx_to_token_count_and_starts_from_the_words(tiny):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=16, ctx_init="a photo of a"))
    ctx = model.prompt_learner.ctx
    assert ctx.shape == (count_tokens("a photo of a"), tiny.text_width) == (4, tiny.text_width)
    table = tiny.model.token_embedding.weight
    photo = tiny.model.token_embedding(torch.tensor([[49406, 320, 1125, 539, 320]]))[0, 1:]
    assert torch.equal(ctx.detach(), photo)
    assert table.shape[0] == 49408


def test_random_init_is_normal_002(tiny):
    model = CoOp(
        tiny, CLASSNAMES * 1, PromptConfig(n_ctx=16, csc=True), generator=torch.Generator().manual_seed(0)
    )
    ctx = model.prompt_learner.ctx.detach()
    assert ctx.shape == (len(CLASSNAMES), 16, tiny.text_width)
    assert abs(ctx.std().item() - 0.02) < 0.002
    assert abs(ctx.mean().item()) < 0.002


def test_bf16_logits_close_to_fp32(tiny):
    fp32 = _model(tiny, CLASSNAMES, ("end", False, ""))
    bf16 = _model(tiny, CLASSNAMES, ("end", False, ""), precision="bf16")
    images = F.normalize(torch.randn(5, tiny.embed_dim), dim=-1)
    with torch.no_grad():
        diff = (fp32(images) - bf16(images)).abs().max().item()
    assert 0 < diff < 0.1 * fp32.logit_scale  # bf16 differs, but only in the last bits of the cosine


def test_bf16_training_reaches_fp32_accuracy(tiny):
    data = separable_problem(tiny, CLASSNAMES, seed=5)
    cfg = PromptConfig(n_ctx=4, csc=True)
    results = {
        p: train_coop(
            tiny, data, cfg, TrainConfig(lr=0.02, precision=p, warmup_epochs=0), epochs=20, progress=False
        )
        for p in ("fp32", "bf16")
    }
    assert results["bf16"].model.prompt_learner.ctx.dtype == torch.float32  # the parameter stays fp32
    assert results["bf16"].test_acc >= results["fp32"].test_acc - 5.0


@pytest.mark.parametrize(
    ("kwargs", "names", "message"),
    [
        ({"n_ctx": 0}, CLASSNAMES, "n_ctx must be >= 1"),
        ({"class_token_position": "back"}, CLASSNAMES, "unknown class_token_position 'back'"),
        ({}, [], "class names are empty"),
        ({}, ["cat", "  "], r"'  ' \(label 1\) is empty"),
        ({"n_ctx": 60}, ["cat", "a " * 14 + "long name"], "prompt for class 'a a a"),
    ],
)
def test_bad_prompt_input_is_refused_before_work(tiny, kwargs, names, message):
    with pytest.raises(ValueError, match=message):
        CoOp(tiny, names, PromptConfig(**kwargs))


def test_cpu_refuses_fp16_with_advice(tiny):
    with pytest.raises(ValueError, match="bf16"):
        CoOp(tiny, CLASSNAMES, PromptConfig(), precision="fp16")


def test_non_finite_loss_stops_training(tiny):
    from pipeline.engine.train import NonFiniteLossError

    data = separable_problem(tiny, CLASSNAMES)
    data.train[0, 0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="epoch 1"):
        train_coop(tiny, data, PromptConfig(n_ctx=2), TrainConfig(), epochs=2, progress=False)


def test_missing_checkpoint_and_unreachable_tag_fail_fast(monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_backbone("coop-tiny", "/nonexistent/coop-tiny.safetensors")
    with pytest.raises(WeightsUnavailableError, match="neither a pretrained tag"):
        load_backbone("RN50", "laion9000")
    monkeypatch.setenv("COOP_OFFLINE", "1")  # no network attempt in tests
    with pytest.raises(WeightsUnavailableError, match=r"RN50/'openai'.*pass its path"):
        load_backbone("RN50", "openai")


def test_local_checkpoint_file_loads_the_same_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "coop-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_backbone("coop-tiny", str(path))
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.pretrained == str(path)


def test_params_backbone_is_the_params_model_and_says_once_that_its_weights_are_random(tiny, caplog):
    from pipeline.params import Params

    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        backbone = load_params_backbone(Params(), "cpu")  # coop-tiny, pretrained: null
    assert (backbone.arch, backbone.pretrained, backbone.fingerprint) == ("coop-tiny", None, tiny.fingerprint)
    assert backbone.device == torch.device("cpu")
    assert not raised  # open_clip-level UserWarning replaced by one log line
    assert [r.levelname for r in caplog.records if "RANDOM weights" in r.getMessage()] == ["WARNING"]


def test_training_results_unchanged_by_the_exact_fast_paths(tiny):
    """Every combination of shared prefix and token packing follows the plain truncated path's trajectory
    up to float rounding."""
    cfg = PromptConfig(n_ctx=4, class_token_position="middle")
    data = separable_problem(tiny, CLASSNAMES, means=teacher_means(tiny, CLASSNAMES, cfg))
    runs = {
        (shared, pack): train_coop(
            tiny, data, cfg, TrainConfig(lr=0.02, shared_prefix=shared, pack_tokens=pack, warmup_epochs=0),
            epochs=10, progress=False,
        )
        for shared in (False, True) for pack in (False, True)
    }
    plain = runs[False, False]
    for (shared, pack), run in runs.items():
        assert (run.model.shared_prefix, run.model.pack_tokens) == (shared, pack)
        assert torch.allclose(plain.ctx, run.ctx, atol=1e-4)
        assert run.test_acc == plain.test_acc
        assert [m.loss for m in run.epochs] == pytest.approx([m.loss for m in plain.epochs], rel=1e-4)


def test_packing_runs_only_real_tokens_and_is_chosen_where_it_pays(tiny):
    from pipeline.engine.prompt import prefers_packing
    from pipeline.engine.text import Packing

    packing, eos = Packing.build([3, 1, 2], 3, torch.device("cpu"), pack=True)
    assert packing.index.tolist() == [0, 1, 2, 3, 6, 7]  # rows b * 3 + t for t < lengths[b]
    assert eos.tolist() == [2, 3, 5]  # the last real token of each prompt among the packed rows
    unpacked, eos = Packing.build([3, 3], 3, torch.device("cpu"), pack=True)
    assert unpacked is None and eos.tolist() == [2, 5]  # nothing padded: nothing to pack
    # CPU: any saved token pays; GPU: only past the saved-token count where a second pass per layer pays.
    assert prefers_packing("cpu", "fp32", 101, 100) and not prefers_packing("cpu", "fp32", 100, 100)
    assert not prefers_packing("cuda", "fp32", 400, 100) and prefers_packing("cuda", "fp32", 700, 100)
    assert not prefers_packing("cuda", "bf16", 3000, 100) and prefers_packing("cuda", "bf16", 5000, 100)
    # Names of one token each ("cat", "dog") leave no padding, so the engine does not pack them.
    assert not CoOp(tiny, ["cat", "dog"], PromptConfig(n_ctx=4)).pack_tokens
    assert CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=4)).pack_tokens


def test_automatic_path_choice_follows_the_measured_gpu_crossover(tiny):
    from pipeline.engine.prompt import prefers_shared_prefix

    # CPU: compute-bound, the shared prefix always wins when there is one.
    assert prefers_shared_prefix("cpu", "fp32", 2, 2) and not prefers_shared_prefix("cpu", "fp32", 100, 1)
    # H100 measurements (RN50, graphed): end = 17 shared positions, middle = 9.
    for precision, n_cls, shared_len, faster in [
        ("fp32", 10, 17, False), ("fp32", 100, 17, True), ("fp32", 10, 9, False), ("fp32", 100, 9, True),
        ("bf16", 100, 17, False), ("bf16", 300, 17, True), ("bf16", 300, 9, False), ("bf16", 1000, 9, True),
    ]:
        assert prefers_shared_prefix("cuda", precision, n_cls, shared_len) == faster, (precision, n_cls)
    auto = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=4))  # None: the CPU rule
    forced_off = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=4), shared_prefix=False)
    assert auto.shared_prefix and not forced_off.shared_prefix


def test_epochs_come_from_the_argument_or_the_config(tiny):
    data = separable_problem(tiny, CLASSNAMES)
    assert len(train_coop(tiny, data, PromptConfig(n_ctx=2), TrainConfig(epochs=3), progress=False).epochs) == 3
    assert len(train_coop(tiny, data, PromptConfig(n_ctx=2), TrainConfig(epochs=3), 2, progress=False).epochs) == 2
    with pytest.raises(ValueError, match="epochs is not set"):
        train_coop(tiny, data, PromptConfig(n_ctx=2), TrainConfig(), progress=False)


def test_demo_accuracy_unchanged_by_the_exact_paths_and_close_in_bf16(demo_ws):
    """The bundled demo (Fashion-MNIST, features from the real prepare/features stages): a fixed number of
    steps gives the same test accuracy with every exact path, and within 5 points of it in bf16."""
    from pipeline.params import load_params
    from pipeline.sweep.inputs import load_inputs

    inputs = load_inputs(load_params(demo_ws.params("paths")), [("FashionMNIST", 2, 1)])
    data = next(iter(inputs.features.values()))
    cfg = PromptConfig(n_ctx=4)  # end, unified: every exact path applies

    def train(**kwargs):
        return train_coop(inputs.backbone, data, cfg, TrainConfig(lr=0.02, warmup_epochs=0, **kwargs), epochs=30,
                          progress=False)

    plain = train(shared_prefix=False, pack_tokens=False)
    assert plain.model.prompt_learner.lengths != (plain.model.prompt_learner.length,) * 10  # names differ
    for shared, pack in [(True, False), (False, True), (True, True)]:
        run = train(shared_prefix=shared, pack_tokens=pack)
        assert run.test_acc == plain.test_acc, (shared, pack)
        assert torch.allclose(run.ctx, plain.ctx, atol=1e-4)
    assert abs(train(precision="bf16").test_acc - plain.test_acc) <= 5.0


def test_channels_last_image_encoder_matches_plain_open_clip(tiny, rn50):
    """The backbone runs its image tower channels-last (faster convolutions); features equal open_clip's own
    contiguous-layout forward with the same weights."""
    import copy

    for backbone in (tiny, rn50):
        conv = next(m for m in backbone.model.visual.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        plain = copy.deepcopy(backbone.model).to(memory_format=torch.contiguous_format)
        assert not next(m for m in plain.visual.modules() if isinstance(m, torch.nn.Conv2d)).weight.is_contiguous(
            memory_format=torch.channels_last
        )
        images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = plain.encode_image(images)
        ours = backbone.encode_images(images)
        assert (ours - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
