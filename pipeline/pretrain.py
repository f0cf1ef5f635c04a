"""Pretrain a small CLIP on the synthetic world: open_clip's model and ClipLoss, AdamW + cosine, on the CPU.

The corpus (pipeline/data/synthetic) is rendered once into memory; every step encodes a batch of images
and captions, and open_clip's contrastive loss with the model's learned temperature pulls matching pairs
together. Runs are deterministic: weights and batch order come from `PretrainParams.seed`, the data
from `corpus_seed`, and torch's deterministic algorithms are on while training. The result is a
safetensors checkpoint (fp16) that `engine.backbone.load_backbone(arch, pretrained=<path>)` loads, and
a JSON card beside it (corpus, steps, losses, zero-shot accuracies, SHA-256 of the checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.atomic import atomic_write, write_json_atomic
from pipeline.data.synthetic.corpus import attribute_set, make_corpus, render_images
from pipeline.data.synthetic.world import TEMPLATES
from pipeline.engine.backbone import register_project_models, tokenize
from pipeline.errors import UserError
from pipeline.params import PretrainParams

log = logging.getLogger(__name__)

CARD_VERSION = 1
ZERO_SHOT_TASKS = ("shape", "colour")  # held-out attribute tasks scored with world.TEMPLATES
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 100
EVAL_BATCH = 512


class PretrainError(UserError, ValueError):
    """The pretraining settings name an architecture this module cannot train."""


@dataclass
class PretrainResult:
    """What a run produced: the trained model (fp32, eval mode) and its measured figures."""

    model: CLIP
    params: PretrainParams
    final_loss: float  # mean training loss over the last eval interval
    heldout_loss: float
    zero_shot: dict[str, float]  # task -> top-1 accuracy (%) with the hand-crafted template
    chance: dict[str, float]  # task -> 100 / classes
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """torch's deterministic algorithms on and a fixed thread count (reductions split by thread), then restored."""
    was, old_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(old_threads)


def create_model(arch: str, seed: int) -> CLIP:
    """A randomly initialised open_clip model of a registered architecture, seeded."""
    register_project_models()
    if arch not in open_clip.list_models():
        raise PretrainError(f"pretrain.arch {arch!r} is not an open_clip architecture; e.g. coop-tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    if not isinstance(model, CLIP):
        raise PretrainError(f"pretrain.arch {arch!r} has a custom text tower; pick a CLIP architecture")
    return model


def encode_text(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `CLIP.encode_text`, run on the first L = last EOS + 1 positions only.

    Attention is causal and the feature is read at each caption's EOS (the argmax token), so later
    positions never reach a feature: the result is the 77-position one at a third of the cost.
    """
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type)
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 tensor, normalised per batch later."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - mean) / std


def _preprocess_stats(model: CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.visual.preprocess_cfg
    return torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)


def image_size_of(model: CLIP) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _optimizer(model: CLIP, p: PretrainParams) -> torch.optim.AdamW:
    # As open_clip's training: no weight decay on gains, biases and the temperature (1-d parameters).
    decay = [t for n, t in model.named_parameters() if t.ndim >= 2 and "logit_scale" not in n]
    rest = [t for n, t in model.named_parameters() if not (t.ndim >= 2 and "logit_scale" not in n)]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, p: PretrainParams) -> float:
    """Linear warm-up to `lr`, then a cosine to 0 at the last step (open_clip's cosine_lr)."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * p.lr


@dataclass
class _EvalSet:
    pixels: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, data: _EvalSet, template: str, mean: torch.Tensor,
                       std: torch.Tensor) -> float:
    """Top-1 accuracy (%) of the hand-crafted prompt `template` over the class names."""
    text = F.normalize(model.encode_text(tokenize([template.format(c) for c in data.classnames])), dim=-1)
    correct = 0
    for start in range(0, len(data.labels), EVAL_BATCH):
        images = _normalise(data.pixels[start : start + EVAL_BATCH], mean, std)
        features = F.normalize(model.encode_image(images), dim=-1)
        correct += int(((features @ text.T).argmax(-1) == data.labels[start : start + EVAL_BATCH]).sum())
    return 100.0 * correct / len(data.labels)


@torch.no_grad()
def contrastive_loss(model: CLIP, pixels: torch.Tensor, tokens: torch.Tensor, batch: int, mean: torch.Tensor,
                     std: torch.Tensor, loss_fn: torch.nn.Module) -> float:
    """Mean ClipLoss over consecutive batches of `batch` pairs (the last partial batch dropped if any full)."""
    losses = []
    stop = max(batch, len(tokens) - len(tokens) % batch)
    for start in range(0, min(stop, len(tokens)), batch):
        images = F.normalize(model.encode_image(_normalise(pixels[start : start + batch], mean, std)), dim=-1)
        text = F.normalize(encode_text(model, tokens[start : start + batch]), dim=-1)
        losses.append(float(loss_fn(images, text, model.logit_scale.detach().exp())))
    return float(np.mean(losses))


def _evaluate(model: CLIP, heldout: tuple[torch.Tensor, torch.Tensor], tasks: dict[str, _EvalSet],
              p: PretrainParams, mean: torch.Tensor, std: torch.Tensor,
              loss_fn: torch.nn.Module) -> tuple[float, dict[str, float]]:
    model.eval()
    heldout_loss = contrastive_loss(model, *heldout, p.batch_size, mean, std, loss_fn)
    accuracy = {task: zero_shot_accuracy(model, data, TEMPLATES[task], mean, std) for task, data in tasks.items()}
    model.train()
    return heldout_loss, accuracy


def pretrain(p: PretrainParams, progress: bool = True) -> PretrainResult:
    """Train `p.arch` from seeded random weights on the world's corpus; the model comes back in eval mode."""
    start = time.perf_counter()
    model = create_model(p.arch, p.seed)
    size = image_size_of(model)
    mean, std = _preprocess_stats(model)
    context = int(model.positional_embedding.shape[0])

    log.info("rendering %d training + %d held-out pairs at %d px (corpus seed %d)", p.corpus_size,
             p.heldout_size, size, p.corpus_seed)
    corpus = make_corpus(p.corpus_seed, p.corpus_size, "train")
    pixels = _pixels(corpus.images(size))
    tokens = tokenize(corpus.captions, context)
    heldout_corpus = make_corpus(p.corpus_seed, p.heldout_size, "heldout")
    heldout = (_pixels(heldout_corpus.images(size)), tokenize(heldout_corpus.captions, context))
    tasks = {}
    for task in ZERO_SHOT_TASKS:
        scenes, labels, classnames = attribute_set(p.corpus_seed, p.zero_shot_size, task)
        tasks[task] = _EvalSet(_pixels(render_images(scenes, size)), torch.tensor(labels), classnames)
    log.info("data ready in %.0f s", time.perf_counter() - start)

    optimizer = _optimizer(model, p)
    loss_fn = open_clip.ClipLoss()
    order = torch.Generator().manual_seed(p.seed)
    batches_per_epoch = p.corpus_size // p.batch_size
    permutation = torch.randperm(p.corpus_size, generator=order)
    history: list[dict[str, float]] = []
    recent: list[float] = []
    heldout_loss, accuracy = math.nan, {}
    model.train()
    with deterministic(p.threads), tqdm(total=p.steps, desc="pretrain", unit="step", disable=not progress) as bar:
        for step in range(p.steps):
            if step > 0 and step % batches_per_epoch == 0:
                permutation = torch.randperm(p.corpus_size, generator=order)
            index = permutation[(step % batches_per_epoch) * p.batch_size :][: p.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, p)
            images = F.normalize(model.encode_image(_normalise(pixels[index], mean, std)), dim=-1)
            text = F.normalize(encode_text(model, tokens[index]), dim=-1)
            loss = loss_fn(images, text, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            recent.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{recent[-1]:.3f}")
            if (step + 1) % p.eval_every == 0 or step + 1 == p.steps:
                heldout_loss, accuracy = _evaluate(model, heldout, tasks, p, mean, std, loss_fn)
                row = {"step": step + 1, "loss": float(np.mean(recent)), "heldout_loss": heldout_loss,
                       "logit_scale": float(model.logit_scale.detach().exp()), "lr": lr_at(step, p),
                       **{f"zero_shot_{k}": v for k, v in accuracy.items()}}
                history.append(row)
                log.info("step %d: loss %.3f, held-out loss %.3f, temperature 1/%.1f, zero-shot %s", step + 1,
                         row["loss"], heldout_loss, row["logit_scale"],
                         ", ".join(f"{k} {v:.1f}%" for k, v in accuracy.items()))
                recent = []
    model.eval()
    chance = {task: 100.0 / len(data.classnames) for task, data in tasks.items()}
    return PretrainResult(model, p, history[-1]["loss"], heldout_loss, accuracy, chance,
                          time.perf_counter() - start, history)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(checkpoint: Path) -> Path:
    """The JSON card beside a checkpoint: same name, .json."""
    return Path(checkpoint).with_suffix(".json")


def save(result: PretrainResult, checkpoint: Path) -> dict[str, Any]:
    """Write the fp16 safetensors checkpoint and its card (atomically); returns the card."""
    checkpoint = Path(checkpoint)
    state = {k: (v.half() if v.is_floating_point() else v).detach().contiguous().clone()
             for k, v in result.model.state_dict().items()}
    atomic_write(checkpoint, lambda tmp: save_file(state, tmp, metadata={"arch": result.params.arch}))
    card = {
        "version": CARD_VERSION,
        "arch": result.params.arch,
        "checkpoint": checkpoint.name,
        "sha256": sha256_of(checkpoint),
        "bytes": checkpoint.stat().st_size,
        "dtype": "fp16",
        "licence": "generated by this project's code from a seed (pipeline/data/synthetic): the project's own",
        "params": dataclasses.asdict(result.params),
        "corpus": {"seed": result.params.corpus_seed, "size": result.params.corpus_size,
                   "heldout_size": result.params.heldout_size, "image_size": image_size_of(result.model)},
        "steps": result.params.steps,
        "final_loss": round(result.final_loss, 4),
        "heldout_loss": round(result.heldout_loss, 4),
        "zero_shot": {task: {"accuracy": round(acc, 2), "chance": round(result.chance[task], 2),
                             "template": TEMPLATES[task], "images": result.params.zero_shot_size}
                      for task, acc in result.zero_shot.items()},
        "wall_s": round(result.wall_s, 1),
        "history": [{k: round(v, 4) for k, v in row.items()} for row in result.history],
    }
    write_json_atomic(card_path(checkpoint), card)
    return card
