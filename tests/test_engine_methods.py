"""CoCoOp and KgCoOp against plain references through open_clip's own encode_text, training, artifacts, bad input."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem, teacher_means

from pipeline.engine.backbone import Backbone, weights_fingerprint
from pipeline.engine.cocoop import CoCoOp
from pipeline.engine.context import (
    CONTEXT_METHODS,
    ContextFileError,
    ContextMeta,
    context_model,
    load_context,
    load_learned,
    save_learned,
)
from pipeline.engine.kgcoop import KgCoOp, anchor_template
from pipeline.engine.methods import (
    METHOD_HYPERPARAMETERS,
    METHODS,
    OFFICIAL_RECIPES,
    MethodConfig,
    learned_model,
    saved_method,
    train_method,
    validate_method,
)
from pipeline.engine.prompt import CoOp, PromptConfig, resolve_n_ctx
from pipeline.engine.train import TrainConfig, train_coop

TEMPLATE = "a blurry photo of the {}."  # not the default: the test sees that the template given is the one used


# ---------------------------------------------------------------------------------------------------------------
# The reference: prompts written out as text with a placeholder word "X" for each context vector, tokenised to 77
# tokens, and run through open_clip's own CLIP.encode_text; a hook on the token embedding puts the context
# vectors where the placeholders are. One image at a time for CoCoOp, as the official forward loops.


def reference_prompt(name: str, n_ctx: int, position: str) -> str:
    name = name.replace("_", " ")
    words = ["X"] * n_ctx
    if position == "end":
        return " ".join(words + [name]) + "."
    if position == "middle":
        half = n_ctx // 2
        return " ".join(words[:half] + [name] + words[half:]) + "."
    return " ".join([name] + words) + "."


def reference_text_features(backbone: Backbone, texts: list[str], ctx: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text of `texts`, the embedding of the i-th placeholder of prompt n replaced by ctx[n, i]."""
    model = backbone.model
    tokens = open_clip.tokenize(texts)
    placeholder = open_clip.tokenize(["X"])[0, 1]
    where = tokens == placeholder
    assert (where.sum(dim=1) == ctx.shape[1]).all()

    def put_context(module, inputs, output):
        output = output.clone()
        output[where] = ctx.reshape(-1, ctx.shape[-1]).to(output.dtype)
        return output

    handle = model.token_embedding.register_forward_hook(put_context)
    try:
        return model.encode_text(tokens)
    finally:
        handle.remove()


def reference_coop_text(backbone, names, ctx, position) -> torch.Tensor:
    n_ctx = ctx.shape[-2]
    per_class = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(len(names), -1, -1)
    texts = [reference_prompt(n, n_ctx, position) for n in names]
    return F.normalize(reference_text_features(backbone, texts, per_class), dim=-1)


def reference_kgcoop(backbone, names, ctx, position, template, images, labels, kg_weight):
    """(loss, logits) as htyao89/KgCoOp's CustomCLIP + forward_backward: CE + W * (1 - mean cosine)."""
    text = reference_coop_text(backbone, names, ctx, position)
    with torch.no_grad():
        hand_crafted = backbone.model.encode_text(open_clip.tokenize([template.format(n.replace("_", " "))
                                                                      for n in names]))
    hand_crafted = hand_crafted / hand_crafted.norm(dim=-1, keepdim=True)
    logits = backbone.logit_scale * images @ text.t()
    score = 1.0 - F.cosine_similarity(text, hand_crafted, dim=1, eps=1e-7).mean()
    return F.cross_entropy(logits, labels) + kg_weight * score, logits


def reference_cocoop(backbone, names, ctx, weights, position, images) -> torch.Tensor:
    """Logits (B, C) as KaiyangZhou/CoOp's CoCoOp CustomCLIP: per image, its bias on every context vector."""
    w1, b1, w2, b2 = weights
    rows = []
    for image in images:
        bias = F.linear(F.relu(F.linear(image, w1, b1)), w2, b2)
        shifted = (ctx + bias).unsqueeze(0).expand(len(names), -1, -1)
        texts = [reference_prompt(n, ctx.shape[0], position) for n in names]
        text = F.normalize(reference_text_features(backbone, texts, shifted), dim=-1)
        rows.append(backbone.logit_scale * image @ text.t())
    return torch.stack(rows)


def _images(backbone, n, seed=0) -> torch.Tensor:
    return F.normalize(torch.randn(n, backbone.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _perturb(model: CoOp, seed: int = 5) -> None:
    """Word init starts from the same words everywhere; a perturbation makes the test see real differences."""
    with torch.no_grad():
        ctx = model.prompt_learner.ctx
        ctx.add_(0.02 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(seed)))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.abs().max() > 0
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------------
# KgCoOp


KG_VARIANTS = [("end", False, "a photo of a"), ("middle", False, ""), ("front", True, "")]


@pytest.mark.parametrize("variant", KG_VARIANTS, ids=lambda v: f"{v[0]}-{'csc' if v[1] else 'unified'}")
def test_kgcoop_loss_logits_and_context_gradient_equal_the_reference(tiny, variant):
    position, csc, init = variant
    cfg = PromptConfig(n_ctx=6, ctx_init=init, csc=csc, class_token_position=position)
    model = KgCoOp(tiny, CLASSNAMES, cfg, TEMPLATE, kg_weight=8.0, generator=torch.Generator().manual_seed(3))
    _perturb(model)
    images = _images(tiny, 9)
    labels = torch.arange(9) % len(CLASSNAMES)
    ctx_ref = model.prompt_learner.ctx.detach().clone().requires_grad_(True)

    loss, logits = model.loss(images, labels)
    loss_ref, logits_ref = reference_kgcoop(tiny, CLASSNAMES, ctx_ref, position, TEMPLATE, images, labels, 8.0)
    assert (logits - logits_ref).abs().max().item() <= 1e-5
    assert abs(loss.item() - loss_ref.item()) <= 1e-5
    assert model.knowledge_loss(model.text_features()).item() > 1e-3  # the regulariser is really in the loss

    loss.backward()
    loss_ref.backward()
    assert _relative(model.prompt_learner.ctx.grad, ctx_ref.grad) <= 1e-5


def test_kgcoop_knowledge_loss_is_half_the_papers_mean_squared_distance(tiny):
    """The official 1 - mean cos equals half the paper's mean over classes of ||w - w_clip||^2 (unit vectors)."""
    model = KgCoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=4), TEMPLATE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = model.text_features()
        squared_distance = (text - model.anchors).pow(2).sum(dim=-1).mean()
        assert model.knowledge_loss(text).item() == pytest.approx(0.5 * squared_distance.item(), rel=1e-5)
        assert model.knowledge_loss(model.anchors).abs().item() <= 1e-6


def test_kgcoop_anchors_use_its_own_template_table(tiny):
    assert anchor_template("DTD", "{} texture.") == "a photo of a {}, a type of texture."
    assert anchor_template("OxfordPets", "a photo of a {}, a type of pet.") == "a photo of a {}, a type of pet."
    data = separable_problem(tiny, CLASSNAMES, shots=1, views=1)
    data.dataset, data.template = "WorldPastel", TEMPLATE
    result = train_method(tiny, data, PromptConfig(n_ctx=4), TrainConfig(), MethodConfig("kgcoop"), epochs=1,
                          progress=False)
    expected = F.normalize(tiny.encode_text([TEMPLATE.format(n.replace("_", " ")) for n in CLASSNAMES]), dim=-1)
    assert torch.allclose(result.model.anchors, expected, atol=1e-6)


def _train(backbone, method: MethodConfig, epochs=3, batch=8, seed=1, data=None, prompt=None):
    data = data if data is not None else separable_problem(backbone, CLASSNAMES, shots=4, views=2)
    cfg = TrainConfig(lr=0.02, batch_size=batch, warmup_epochs=0, seed=seed)
    return train_method(backbone, data, prompt or PromptConfig(n_ctx=4), cfg, method, epochs=epochs, progress=False)


def test_kgcoop_with_zero_weight_trains_exactly_as_coop(tiny):
    data = separable_problem(tiny, CLASSNAMES, shots=4, views=2)
    cfg = TrainConfig(lr=0.02, batch_size=8, warmup_epochs=0, seed=1)
    coop = train_coop(tiny, data, PromptConfig(n_ctx=4), cfg, epochs=3, progress=False)  # CoOp's own entry point
    kgcoop = _train(tiny, MethodConfig("kgcoop", kg_weight=0.0), data=data)
    assert type(kgcoop.model) is KgCoOp
    assert torch.equal(coop.ctx, kgcoop.ctx)
    assert [e.loss for e in coop.epochs] == [e.loss for e in kgcoop.epochs]
    assert coop.test_acc == kgcoop.test_acc


def test_kgcoop_weight_keeps_text_features_nearer_the_hand_crafted_ones(tiny):
    free = _train(tiny, MethodConfig("kgcoop", kg_weight=0.0), epochs=8)
    pulled = _train(tiny, MethodConfig("kgcoop", kg_weight=8.0), epochs=8)
    with torch.no_grad():
        drift_free = free.model.knowledge_loss(free.model.text_features()).item()
        drift_pulled = pulled.model.knowledge_loss(pulled.model.text_features()).item()
    assert drift_pulled < 0.5 * drift_free


# ---------------------------------------------------------------------------------------------------------------
# CoCoOp


def _cocoop(backbone, position="end", shared=None, pack=None, seed=3, names=CLASSNAMES) -> CoCoOp:
    cfg = PromptConfig(n_ctx=4, ctx_init="a photo of a" if position == "end" else "", class_token_position=position)
    model = CoCoOp(backbone, names, cfg, "fp32", shared, torch.Generator().manual_seed(seed), pack)
    _perturb(model)
    return model


COCOOP_PATHS = [("end", True, True), ("end", True, False), ("end", False, True), ("end", False, False),
                ("middle", None, None), ("front", None, None)]


@pytest.mark.parametrize("path", COCOOP_PATHS,
                         ids=lambda p: p[0] if p[1] is None else f"{p[0]}-{'shared' if p[1] else 'truncated'}-{'packed' if p[2] else 'padded'}")
def test_cocoop_logits_and_gradients_equal_the_reference(tiny, path):
    position, shared, pack = path
    model = _cocoop(tiny, position, shared, pack)
    if shared is not None:
        assert (model.shared_prefix, model.pack_tokens) == (shared, pack)
    images = _images(tiny, 5)
    labels = torch.tensor([0, 3, 5, 1, 1])
    ctx_ref = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
    net = model.meta_net
    weights_ref = [t.detach().clone().requires_grad_(True)
                   for t in (net.linear1.weight, net.linear1.bias, net.linear2.weight, net.linear2.bias)]

    loss, logits = model.loss(images, labels)
    logits_ref = reference_cocoop(tiny, CLASSNAMES, ctx_ref, weights_ref, position, images)
    assert (logits - logits_ref).abs().max().item() <= 1e-5
    # Each image really has prompts of its own: its logits differ from those of the unshifted context.
    with torch.no_grad():
        plain = tiny.logit_scale * images @ reference_coop_text(tiny, CLASSNAMES, ctx_ref, position).t()
    assert (logits - plain).abs().max().item() > 1e-2

    loss.backward()
    F.cross_entropy(logits_ref, labels).backward()
    assert _relative(model.prompt_learner.ctx.grad, ctx_ref.grad) <= 1e-5
    ours = (net.linear1.weight, net.linear1.bias, net.linear2.weight, net.linear2.bias)
    for param, ref in zip(ours, weights_ref, strict=True):
        assert _relative(param.grad, ref.grad) <= 1e-5


def test_cocoop_with_a_zero_meta_network_equals_coop_with_its_context(tiny):
    model = _cocoop(tiny)
    with torch.no_grad():
        model.meta_net.linear2.weight.zero_()
        model.meta_net.linear2.bias.zero_()
    coop = CoOp(tiny, CLASSNAMES, model.prompt_learner.cfg)
    with torch.no_grad():
        coop.prompt_learner.ctx.copy_(model.prompt_learner.ctx)
        images = _images(tiny, 7)
        assert (model(images) - coop(images)).abs().max().item() <= 1e-5
        assert torch.equal(model.predict(images), coop.predict(images))


def test_cocoop_predicts_in_chunks_of_images_as_it_scores_them(tiny):
    model = _cocoop(tiny)
    images = _images(tiny, 11)
    with torch.no_grad():
        expected = model(images).argmax(dim=-1)
    assert torch.equal(model.predict(images, chunk=2 * len(CLASSNAMES)), expected)  # 2 images a chunk, 1 left over
    assert torch.equal(model.predict(images, chunk=1), expected)
    assert model.predict(images[:0]).shape == (0,)


def test_cocoop_trains_its_context_and_meta_network_only(tiny):
    before = weights_fingerprint(tiny.model, tiny.arch)
    prompt = PromptConfig(n_ctx=4)
    # What train_coop starts from: the model built with a generator seeded by TrainConfig.seed (1).
    initial = CoCoOp(tiny, CLASSNAMES, prompt, generator=torch.Generator().manual_seed(1)).learned_tensors()
    result = _train(tiny, MethodConfig("cocoop"), epochs=1, batch=4, prompt=prompt)
    trainable = sorted(name for name, p in result.model.named_parameters() if p.requires_grad)
    assert trainable == ["meta_net.linear1.bias", "meta_net.linear1.weight", "meta_net.linear2.bias",
                         "meta_net.linear2.weight", "prompt_learner.ctx"]
    assert weights_fingerprint(tiny.model, tiny.arch) == before
    learned = result.learned
    assert set(learned) == set(initial)
    assert all(not torch.equal(learned[name], initial[name]) for name in initial)


# ---------------------------------------------------------------------------------------------------------------
# Both: training, artifacts, bad input


@pytest.mark.parametrize("method", [MethodConfig("kgcoop"), MethodConfig("cocoop")], ids=lambda m: m.name)
def test_training_lowers_the_loss_and_raises_accuracy(tiny, method):
    prompt = PromptConfig(n_ctx=4, ctx_init="a photo of a")
    data = separable_problem(tiny, CLASSNAMES, shots=4, views=2, means=teacher_means(tiny, CLASSNAMES, prompt))
    result = _train(tiny, method, epochs=8, batch=4, data=data, prompt=prompt)
    first, last = result.epochs[0], result.epochs[-1]
    assert last.loss < 0.8 * first.loss
    assert last.train_acc > first.train_acc
    assert result.test_acc > 100.0 / len(CLASSNAMES) + 20


def _meta(backbone, model: CoOp, method: MethodConfig) -> ContextMeta:
    cfg = model.prompt_learner.cfg
    return ContextMeta(arch=backbone.arch, pretrained=None, fingerprint=backbone.fingerprint,
                       n_ctx=model.prompt_learner.n_ctx, class_token_position=cfg.class_token_position, csc=cfg.csc,
                       ctx_init=cfg.ctx_init, classnames=list(CLASSNAMES), method=method.name,
                       method_params=method.hyperparameters())


@pytest.mark.parametrize("method", [MethodConfig("kgcoop", kg_weight=2.5), MethodConfig("cocoop", meta_reduction=8)],
                         ids=lambda m: m.name)
def test_learned_parameters_round_trip_through_safetensors_and_json(tiny, tmp_path, method):
    result = _train(tiny, method, epochs=1, batch=4)
    path = save_learned(tmp_path / "ctx.safetensors", result.learned, _meta(tiny, result.model, method))
    saved = json.loads(path.with_suffix(".json").read_text())
    assert (saved["method"], saved["method_params"]) == (method.name, method.hyperparameters())

    tensors, meta = load_learned(path)
    assert saved_method(meta) == method
    assert all(torch.equal(tensors[name], t) for name, t in result.learned.items())
    model = learned_model(tiny, tensors, meta)
    images = _images(tiny, 6)
    with torch.no_grad():
        assert torch.equal(model(images), result.model(images))
    assert not any(p.requires_grad for p in model.parameters())

    if method.name == "kgcoop":  # only the context is learned: it is read and used as a CoOp context
        ctx, meta = load_context(path)
        assert type(context_model(tiny, ctx, meta)) is CoOp
    else:
        assert type(model) is CoCoOp and model.meta_net.linear1.out_features == tiny.embed_dim // 8
        with pytest.raises(ContextFileError, match="load_learned"):
            load_context(path)
        with pytest.raises(ContextFileError, match="methods.learned_model"):
            context_model(tiny, tensors["ctx"], meta)
        with pytest.raises(ContextFileError, match="meta_net.linear1.bias"):  # the meta-network is missing
            learned_model(tiny, {"ctx": tensors["ctx"]}, meta)


def test_context_files_without_a_method_are_coop(tiny, tmp_path):
    model = CoOp(tiny, CLASSNAMES, PromptConfig(n_ctx=4))
    path = save_learned(tmp_path / "ctx.safetensors", model.learned_tensors(), _meta(tiny, model, MethodConfig()))
    raw = json.loads(path.with_suffix(".json").read_text())
    del raw["method"], raw["method_params"]
    path.with_suffix(".json").write_text(json.dumps(raw))
    ctx, meta = load_context(path)
    assert saved_method(meta) == MethodConfig("coop")
    assert type(learned_model(tiny, {"ctx": ctx}, meta)) is CoOp
    raw["method"] = "maple"
    path.with_suffix(".json").write_text(json.dumps(raw))
    tensors, meta = load_learned(path)
    with pytest.raises(ContextFileError, match="unknown method 'maple'"):
        learned_model(tiny, tensors, meta)
    with pytest.raises(ContextFileError, match="methods.learned_model"):
        context_model(tiny, tensors["ctx"], meta)


def test_the_methods_a_context_alone_serves_are_methods():
    assert set(CONTEXT_METHODS) == set(METHODS) - {"cocoop"}


@pytest.mark.parametrize("name", sorted(OFFICIAL_RECIPES))
def test_official_recipes_are_valid_settings(name):
    recipe = OFFICIAL_RECIPES[name]
    method = MethodConfig(name, **{key: recipe[key] for key in METHOD_HYPERPARAMETERS[name]})
    prompt = PromptConfig(ctx_init=recipe["ctx_init"])
    validate_method(method, prompt)
    assert resolve_n_ctx(prompt) == 4
    assert TrainConfig(batch_size=recipe["batch_size"], epochs=recipe["epochs"]).lr == 0.002
    assert method == MethodConfig(name)  # the defaults are the official values


@pytest.mark.parametrize(("method", "prompt", "message"), [
    (MethodConfig("maple"), PromptConfig(), "unknown method 'maple'; choose one of coop, cocoop, kgcoop"),
    (MethodConfig("cocoop"), PromptConfig(csc=True), "csc: true does not apply"),
    (MethodConfig("cocoop", meta_reduction=0), PromptConfig(), "meta_reduction must be >= 1"),
    (MethodConfig("kgcoop", kg_weight=-1.0), PromptConfig(), "kg_weight must be a finite number >= 0"),
    (MethodConfig("kgcoop", kg_weight=float("nan")), PromptConfig(), "kg_weight"),
])
def test_bad_method_settings_are_named(method, prompt, message):
    with pytest.raises(ValueError, match=message):
        validate_method(method, prompt)


def test_bad_method_settings_stop_training_before_it_starts(tiny):
    data = separable_problem(tiny, CLASSNAMES, shots=1, views=1)
    with pytest.raises(ValueError, match="csc: true does not apply"):
        train_method(tiny, data, PromptConfig(n_ctx=4, csc=True), TrainConfig(), MethodConfig("cocoop"), epochs=1,
                     progress=False)
    with pytest.raises(ValueError, match="meta_reduction must be between 1 and the image feature width 64"):
        train_method(tiny, data, PromptConfig(n_ctx=4), TrainConfig(), MethodConfig("cocoop", meta_reduction=65),
                     epochs=1, progress=False)
    with pytest.raises(ValueError, match="CoCoOp trains its context and meta-network in fp32"):
        train_method(tiny, data, PromptConfig(n_ctx=4), TrainConfig(precision="fp16-official"),
                     MethodConfig("cocoop"), epochs=1, progress=False)
