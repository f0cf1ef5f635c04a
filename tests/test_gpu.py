"""The GPU path: device choice everywhere, and on a CUDA machine exactness, fp16/amp/bf16 training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CLASSNAMES, separable_problem, teacher_means

from pipeline.engine.backbone import load_backbone, resolve_device
from pipeline.engine.prompt import CoOp, PromptConfig, compute_dtype
from pipeline.engine.reference import official_logits
from pipeline.engine.train import TrainConfig, train_coop

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_device_follows_cuda_visibility():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            resolve_device("cuda")


def test_precision_to_dtype_per_device():
    assert compute_dtype("fp32", "cpu") == torch.float32
    assert compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype("fp16", "cuda") == torch.float16
    assert compute_dtype("amp", "cuda") == torch.float32  # amp keeps fp32 weights, autocasts the step
    for precision in ("fp16", "amp"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            compute_dtype(precision, "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        compute_dtype("fp8", "cpu")


@pytest.fixture(scope="module")
def tiny_cuda():
    return load_backbone("coop-tiny", None, "cuda")


@cuda
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_cuda_fast_paths_equal_reference_fp32(tiny_cuda, position, csc, pack):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = CoOp(tiny_cuda, CLASSNAMES, PromptConfig(6, "", csc, position), generator=torch.Generator().manual_seed(0),
                 pack_tokens=pack)
    assert model.pack_tokens == pack
    images = F.normalize(torch.randn(9, tiny_cuda.embed_dim, device="cuda"), dim=-1)
    with torch.no_grad():
        ref = official_logits(tiny_cuda, CLASSNAMES, model.prompt_learner.ctx, position, images)
        assert (model(images) - ref).abs().max().item() <= 1e-5


@cuda
@pytest.mark.parametrize("precision", ["fp16", "amp", "bf16", "fp16-official"])
def test_cuda_reduced_precision_trains_like_fp32(tiny_cuda, precision):
    cfg = PromptConfig(n_ctx=4, csc=True)
    data = separable_problem(tiny_cuda, CLASSNAMES, means=teacher_means(tiny_cuda, CLASSNAMES, cfg).cpu())
    train = TrainConfig(lr=0.02, batch_size=16, warmup_epochs=0)
    fp32 = train_coop(tiny_cuda, data, cfg, train, epochs=20, progress=False)
    low = train_coop(tiny_cuda, data, cfg, TrainConfig(**{**train.to_dict(), "precision": precision}), epochs=20,
                     progress=False)
    # Only the official semantics keep the context itself in fp16 (graphed, since it is not amp).
    assert low.model.prompt_learner.ctx.dtype == (torch.float16 if precision == "fp16-official" else torch.float32)
    assert low.model.prompt_learner.ctx.device.type == "cuda"
    assert low.epochs[-1].loss < 0.75 * low.epochs[0].loss
    assert low.test_acc >= fp32.test_acc - 5.0


@cuda
@pytest.mark.parametrize(("shared", "pack"), [(False, False), (True, False), (False, True), (True, True)])
def test_cuda_graph_replays_the_eager_text_path(tiny_cuda, shared, pack):
    cfg = PromptConfig(n_ctx=4, class_token_position="middle")
    eager = CoOp(tiny_cuda, CLASSNAMES, cfg, shared_prefix=shared, generator=torch.Generator().manual_seed(0),
                 pack_tokens=pack)
    graphed = CoOp(tiny_cuda, CLASSNAMES, cfg, shared_prefix=shared, generator=torch.Generator().manual_seed(0),
                   pack_tokens=pack)
    graphed.capture_cuda_graph()
    images = F.normalize(torch.randn(5, tiny_cuda.embed_dim, device="cuda"), dim=-1)
    for step in range(3):  # replays see the context's in-place updates
        for model in (eager, graphed):
            model.prompt_learner.ctx.grad = None
            model(images).square().sum().backward()
            with torch.no_grad():
                model.prompt_learner.ctx.add_(0.1 * model.prompt_learner.ctx.grad)
        assert torch.allclose(eager.prompt_learner.ctx, graphed.prompt_learner.ctx, atol=1e-5), step
    with torch.no_grad():
        assert torch.allclose(eager(images), graphed(images), atol=1e-4)


@cuda
def test_training_with_and_without_cuda_graph_agree(tiny_cuda):
    cfg = PromptConfig(n_ctx=4)
    data = separable_problem(tiny_cuda, CLASSNAMES, means=teacher_means(tiny_cuda, CLASSNAMES, cfg).cpu())
    runs = [train_coop(tiny_cuda, data, cfg, TrainConfig(lr=0.02, cuda_graph=g), epochs=5, progress=False)
            for g in (False, True)]
    assert runs[1].model._graphed is not None and runs[0].model._graphed is None
    assert torch.allclose(runs[0].ctx, runs[1].ctx, atol=1e-4)
    assert runs[0].test_acc == runs[1].test_acc


@cuda
@pytest.mark.parametrize("graph", [True, False], ids=["cuda_graph", "eager"])
def test_cuda_bundle_trains_every_member_as_it_trains_alone(tiny_cuda, graph):
    """Every variant in one bundle on the GPU (its text pass one CUDA graph, recaptured when a member drops): each
    member's context within 1e-5 of the same configuration trained alone on the GPU (fp32, no TF32)."""
    from test_engine_bundle import EPOCHS, MIXED

    from pipeline.engine.bundle import BundleMember, train_bundle

    torch.backends.cuda.matmul.allow_tf32 = False
    datas = {seed: separable_problem(tiny_cuda, CLASSNAMES, seed=seed) for seed in (1, 2, 3)}
    members = [BundleMember(datas[seed], prompt, TrainConfig(lr=lr, seed=seed, batch_size=8, eval_every=2,
                                                             cuda_graph=graph), EPOCHS)
               for prompt, lr, seed in MIXED]
    members.append(BundleMember(datas[1], PromptConfig(4, "", False, "end"),
                                TrainConfig(lr=1e30, seed=1, batch_size=8, cuda_graph=graph), EPOCHS))  # diverges
    outcomes = train_bundle(tiny_cuda, members, progress=False)
    assert outcomes[-1].error is not None  # the diverging member failed alone
    for member, outcome in zip(members[:-1], outcomes[:-1], strict=True):
        assert outcome.error is None
        alone = train_coop(tiny_cuda, member.data, member.prompt, member.cfg, member.epochs, progress=False)
        assert (outcome.result.ctx - alone.ctx).abs().max().item() <= 1e-5
        assert (outcome.result.val_acc, outcome.result.test_acc) == (alone.val_acc, alone.test_acc)
