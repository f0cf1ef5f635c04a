"""Importing official CoOp (Dassl) checkpoints: the context survives exactly, and pickled code is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, _LRScheduler

from pipeline.engine.backbone import Backbone, tokenize
from pipeline.engine.context import context_model, load_context
from pipeline.engine.reference import official_logits
from pipeline.tools.import_context import CheckpointError, import_context, load_checkpoint, main

CLASSNAMES = ["cat", "golden_retriever", "sports car", "oak tree"]


class ConstantWarmupScheduler(_LRScheduler):
    """Dassl's warm-up scheduler (dassl/optim/lr_scheduler.py): it keeps its successor as an attribute, so
    the successor (and through it the optimizer) ends up pickled inside the checkpoint's scheduler state."""

    def __init__(self, optimizer: torch.optim.Optimizer, successor: _LRScheduler, warmup_epoch: int,
                 cons_lr: float) -> None:
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


class PromptLearner(torch.nn.Module):
    """The official prompt learner's saved state: ctx plus the frozen token_prefix / token_suffix buffers."""

    def __init__(self, ctx: torch.Tensor, n_cls: int, width: int) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(ctx)
        n_ctx = ctx.shape[-2]
        self.register_buffer("token_prefix", torch.zeros(n_cls, 1, width, dtype=ctx.dtype))
        self.register_buffer("token_suffix", torch.zeros(n_cls, 77 - 1 - n_ctx, width, dtype=ctx.dtype))


def dassl_checkpoint(path: Path, ctx: torch.Tensor, n_cls: int, epoch: int = 50) -> None:
    """Save the way Dassl's TrainerBase.save_model does: state_dict, epoch, optimizer and scheduler state."""
    learner = PromptLearner(ctx, n_cls, ctx.shape[-1])
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    learner.ctx.grad = torch.ones_like(learner.ctx)
    optimizer.step()  # momentum buffers in the optimizer state, as after training
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    scheduler = ConstantWarmupScheduler(optimizer, CosineAnnealingLR(optimizer, float(epoch)), 1, 1e-5)
    torch.save({"state_dict": learner.state_dict(), "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": None}, path)


def classnames_file(tmp_path: Path, names: list[str] = CLASSNAMES) -> Path:
    path = tmp_path / "classnames.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def test_dassl_checkpoint_holds_pickled_scheduler_objects(tmp_path: Path) -> None:
    # The premise of the inert-placeholder loader: a plain weights_only load refuses real Dassl checkpoints.
    path = tmp_path / "model.pth.tar-50"
    dassl_checkpoint(path, torch.randn(16, 64).half(), len(CLASSNAMES))
    with pytest.raises(Exception, match="CosineAnnealingLR"):
        torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 50 and set(loaded["state_dict"]) == {"ctx", "token_prefix", "token_suffix"}


@pytest.mark.parametrize("position", ["end", "middle"])
def test_unified_context_imports_exactly_and_classifies_like_the_official_code(
    tmp_path: Path, tiny: Backbone, position: str
) -> None:
    ctx = (0.02 * torch.randn(16, tiny.text_width, generator=torch.Generator().manual_seed(3))).half()
    checkpoint = tmp_path / "prompt_learner" / "model.pth.tar-50"
    checkpoint.parent.mkdir()
    dassl_checkpoint(checkpoint, ctx, len(CLASSNAMES))
    out = tmp_path / "ctx" / "imported.safetensors"
    code = main(["--checkpoint", str(checkpoint), "--arch", "coop-tiny", "--pretrained", "none",
                 "--dataset", "Toy", "--classnames", str(classnames_file(tmp_path)), "--position", position,
                 "--n-ctx", "16", "--shots", "16", "--seed", "1", "--out", str(out)])
    assert code == 0
    loaded, meta = load_context(out)
    assert torch.equal(loaded, ctx.float())  # fp16 -> fp32 is exact
    assert (meta.n_ctx, meta.csc, meta.class_token_position) == (16, False, position)
    assert meta.classnames == CLASSNAMES and meta.dataset == "Toy" and meta.shots == 16
    assert meta.fingerprint == tiny.fingerprint
    assert meta.extra["epoch"] == 50 and meta.extra["ignored_keys"] == ["token_prefix", "token_suffix"]

    features = torch.nn.functional.normalize(torch.randn(8, tiny.embed_dim), dim=-1)
    ours = context_model(tiny, loaded, meta)(features)
    reference = official_logits(tiny, CLASSNAMES, loaded, position, features)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_class_specific_context_is_inferred_from_its_shape(tmp_path: Path, tiny: Backbone) -> None:
    ctx = 0.02 * torch.randn(len(CLASSNAMES), 4, tiny.text_width)
    checkpoint = tmp_path / "model.pth.tar-200"
    dassl_checkpoint(checkpoint, ctx, len(CLASSNAMES), epoch=200)
    path, meta = import_context(checkpoint, tmp_path / "csc.safetensors", "coop-tiny", None, CLASSNAMES,
                                ctx_init="a photo of a")
    assert meta.csc and meta.n_ctx == 4 and meta.ctx_init == "a photo of a"
    loaded, _ = load_context(path)
    assert loaded.shape == (len(CLASSNAMES), 4, tiny.text_width)


def test_class_names_from_a_prepare_stage_test_list(tmp_path: Path, tiny: Backbone) -> None:
    splits = tmp_path / "splits" / "Toy"
    splits.mkdir(parents=True)
    (splits / "test.json").write_text(json.dumps({
        "format_version": 1, "dataset": "Toy", "classnames": CLASSNAMES, "template": "a photo of a {}.",
        "imagenet_labels": None, "test_only": False, "test": [["a.png", 0, "cat"]]}))
    checkpoint = tmp_path / "model.pth.tar-50"
    dassl_checkpoint(checkpoint, torch.randn(16, tiny.text_width), len(CLASSNAMES))
    out = tmp_path / "ctx.safetensors"
    assert main(["--checkpoint", str(checkpoint), "--arch", "coop-tiny", "--pretrained", "none", "--dataset", "Toy",
                 "--splits-dir", str(tmp_path / "splits"), "--out", str(out)]) == 0
    assert load_context(out)[1].classnames == CLASSNAMES


@pytest.mark.parametrize(
    ("shape", "kwargs", "message"),
    [
        ((16, 64), {"n_ctx": 8}, "has 16 vectors"),
        ((16, 64), {"csc": True}, "unified"),
        ((3, 16, 64), {}, "3 class rows but 4 class names"),
        ((16, 32), {}, "width 32 does not match"),
        ((16, 64), {"ctx_init": "a photo of a"}, "4 tokens but the context has 16"),
    ],
)
def test_inconsistent_checkpoints_are_rejected_with_the_reason(
    tmp_path: Path, shape: tuple[int, ...], kwargs: dict, message: str
) -> None:
    checkpoint = tmp_path / "model.pth.tar-50"
    dassl_checkpoint(checkpoint, torch.randn(*shape), len(CLASSNAMES))
    out = tmp_path / "ctx.safetensors"
    with pytest.raises(CheckpointError, match=message):
        import_context(checkpoint, out, "coop-tiny", None, CLASSNAMES, load_weights=False, **kwargs)
    assert not out.exists()


class _Payload:
    """A pickle that runs code when loaded: it would write `marker` if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran while loading the checkpoint"))


@pytest.mark.parametrize("where", ["top", "state_dict", "scheduler"])
def test_checkpoint_with_a_pickled_object_is_refused_and_runs_nothing(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned.txt"
    checkpoint = tmp_path / "model.pth.tar-50"
    state = {"state_dict": {"ctx": torch.randn(16, 64)}, "epoch": 50, "optimizer": None, "scheduler": {}}
    if where == "top":
        state["extra"] = _Payload(marker)
    elif where == "state_dict":
        state["state_dict"]["token_prefix"] = _Payload(marker)
    else:
        state["scheduler"] = {"successor": _Payload(marker)}
    torch.save(state, checkpoint)
    out = tmp_path / "ctx.safetensors"
    code = main(["--checkpoint", str(checkpoint), "--arch", "coop-tiny", "--no-weights",
                 "--classnames", str(classnames_file(tmp_path)), "--out", str(out)])
    assert code == 2
    assert not marker.exists(), "unpickling executed code from the checkpoint"
    assert not out.exists()
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(checkpoint)


def test_not_a_checkpoint_and_missing_ctx_are_reported(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|cannot be read"):
        load_checkpoint(garbage)
    no_ctx = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 1}, no_ctx)
    with pytest.raises(CheckpointError, match="expected one 'ctx' tensor"):
        import_context(no_ctx, tmp_path / "x.safetensors", "coop-tiny", None, CLASSNAMES, load_weights=False)


def test_tokenizer_sanity_for_placeholder_prompts() -> None:
    # The import relies on "X X X X <name>." and "a photo of a <name>." placing the class name at the same
    # positions (both 4 tokens), which is what makes recording ctx_init alone enough.
    a = tokenize(["X X X X cat."])[0]
    b = tokenize(["a photo of a cat."])[0]
    assert int(a.argmax()) == int(b.argmax()) and torch.equal(a[5:7], b[5:7])


def test_bad_position_and_malformed_class_names_exit_2_naming_them(tmp_path: Path, caplog) -> None:
    checkpoint = tmp_path / "model.pth.tar-50"
    dassl_checkpoint(checkpoint, torch.randn(16, 64), len(CLASSNAMES))
    common = ["--checkpoint", str(checkpoint), "--arch", "coop-tiny", "--no-weights", "--out",
              str(tmp_path / "ctx.safetensors")]
    assert main([*common, "--classnames", str(classnames_file(tmp_path)), "--position", "back"]) == 2
    assert "--position must be one of end, middle, front, got 'back'" in caplog.text
    wrong_shape = tmp_path / "names.json"
    wrong_shape.write_text(json.dumps({"names": CLASSNAMES}))  # neither a list nor a test.json
    assert main([*common, "--classnames", str(wrong_shape)]) == 2
    assert "KeyError: 'classnames'" in caplog.text
    assert not (tmp_path / "ctx.safetensors").exists()
