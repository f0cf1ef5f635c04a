"""CoOp training on cached image features: CoOp's recipe (SGD, cosine schedule, constant warm-up).

The image encoder is frozen, so each image's features come from the cache; an epoch draws, for every
training image, one of its V cached augmented views. Each step runs the text tower over all class
prompts (the only real cost) and updates the context vectors alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.engine.backbone import Backbone
from pipeline.engine.prompt import CoOp, PromptConfig
from pipeline.features import FewShotFeatures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the official CoOp recipe. epochs=None picks CoOp's per-shot value."""

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int | None = None
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int = 32
    eval_every: int = 0  # evaluate on val every k epochs; 0: only at the end
    precision: str = "fp32"  # fp32 | bf16 | fp16 | amp | fp16-official (prompt.PRECISIONS)
    seed: int = 1
    shared_prefix: bool | None = None  # None: the faster exact text path for the device
    pack_tokens: bool | None = None  # None: skip prompts' padding where that is faster on the device
    cuda_graph: bool = True  # on CUDA (not amp): replay the text path as one CUDA graph

    def to_dict(self) -> dict:
        return asdict(self)


def default_epochs(dataset: str, shots: int) -> int:
    """CoOp's max epochs: 50 for ImageNet and for 1 shot, 100 for 2/4 shots, 200 for 8/16 shots."""
    if dataset.lower() == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def lr_at_epoch(epoch: int, cfg: TrainConfig, max_epochs: int) -> float:
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max=max_epochs), stepped per epoch."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / max_epochs))


@dataclass
class EpochMetrics:
    epoch: int  # 1-based
    loss: float
    train_acc: float
    lr: float
    seconds: float
    val_acc: float | None = None


@dataclass
class TrainResult:
    model: CoOp
    epochs: list[EpochMetrics] = field(default_factory=list)
    val_acc: float = float("nan")
    test_acc: float = float("nan")
    train_seconds: float = 0.0

    @property
    def ctx(self) -> torch.Tensor:
        return self.model.prompt_learner.ctx.detach().float().cpu()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the trial cannot continue."""


@torch.no_grad()
def evaluate(model: CoOp, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> float:
    """Top-1 accuracy (%) of normalised features (N, E); text features are computed once."""
    if len(labels) == 0:
        return float("nan")
    text = model.text_features()
    correct = 0
    for start in range(0, len(labels), chunk):
        logits = features[start : start + chunk] @ text.t()
        correct += int((logits.argmax(dim=-1) == labels[start : start + chunk]).sum())
    return 100.0 * correct / len(labels)


def build_model(
    backbone: Backbone,
    classnames: list[str],
    prompt_cfg: PromptConfig,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
) -> CoOp:
    """The CoOp model a training config runs: its precision and exact text path, CUDA-graphed where set."""
    model = CoOp(backbone, classnames, prompt_cfg, cfg.precision, cfg.shared_prefix, generator, cfg.pack_tokens)
    if cfg.cuda_graph and backbone.device.type == "cuda" and cfg.precision != "amp":
        model.capture_cuda_graph()
    return model


class TrainStep:
    """One step of CoOp's recipe on a batch of cached features: forward, backward, SGD update of the context."""

    def __init__(self, model: CoOp, cfg: TrainConfig) -> None:
        self.model = model
        self.use_amp = cfg.precision == "amp"
        self.device_type = model.prompt_learner.ctx.device.type
        self.optimizer = torch.optim.SGD([model.prompt_learner.ctx], lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        # Loss scaling guards our fp16 (fp32 master context); the official fp16 runs plain SGD without it.
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision in ("fp16", "amp"))

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, E), labels (B,) -> (loss, logits (B, C)), after updating the context."""
        with torch.autocast(self.device_type, dtype=torch.float16, enabled=self.use_amp):
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits


def _prepare(data: FewShotFeatures, device: torch.device) -> dict[str, torch.Tensor]:
    def norm(t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t.to(device=device, dtype=torch.float32), dim=-1)

    return {
        "train": norm(data.train),
        "train_labels": data.train_labels.to(device),
        "val": norm(data.val),
        "val_labels": data.val_labels.to(device),
        "test": norm(data.test),
        "test_labels": data.test_labels.to(device),
    }


def train_coop(
    backbone: Backbone,
    data: FewShotFeatures,
    prompt_cfg: PromptConfig,
    cfg: TrainConfig,
    epochs: int | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a CoOp context on cached features; returns the model, per-epoch curves and accuracies.

    `epochs` defaults to `cfg.epochs`; one of them must be set (CoOp's schedule: `default_epochs`).
    """
    epochs = epochs if epochs is not None else cfg.epochs
    if epochs is None:
        raise ValueError("epochs is not set: pass epochs or TrainConfig.epochs (CoOp's: default_epochs(dataset, shots))")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1 (got {epochs})")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {cfg.batch_size})")
    device = backbone.device
    n_cls = len(data.classnames)
    if len(data.train_labels) == 0:
        raise ValueError("the few-shot training split is empty")
    if int(data.train_labels.max()) >= n_cls or int(data.train_labels.min()) < 0:
        raise ValueError(f"training labels fall outside 0..{n_cls - 1} ({n_cls} class names)")

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_model(backbone, data.classnames, prompt_cfg, cfg, generator)
    train_step = TrainStep(model, cfg)
    tensors = _prepare(data, device)
    train_x, train_y = tensors["train"], tensors["train_labels"]
    n_train, n_views = train_x.shape[0], train_x.shape[1]
    # Dassl drops the last incomplete batch when there is at least one full batch.
    batch = min(cfg.batch_size, n_train)
    steps = n_train // batch

    result = TrainResult(model)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="CoOp epochs", disable=not progress, leave=False)
    for epoch in bar:
        lr = lr_at_epoch(epoch, cfg, epochs)
        train_step.set_lr(lr)
        t0 = time.perf_counter()
        order = torch.randperm(n_train, generator=generator).to(device)
        views = torch.randint(n_views, (n_train,), generator=generator).to(device)
        loss_sum, correct = 0.0, 0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            x, y = train_x[idx, views[idx]], train_y[idx]
            try:
                loss, logits = train_step(x, y)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e} at epoch {epoch + 1}, step {step + 1}") from None
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(dim=-1) == y).sum())
        seen = steps * batch
        metrics = EpochMetrics(epoch + 1, loss_sum / seen, 100.0 * correct / seen, lr, time.perf_counter() - t0)
        last = epoch + 1 == epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            metrics.val_acc = evaluate(model, tensors["val"], tensors["val_labels"])
        result.epochs.append(metrics)
        bar.set_postfix(loss=f"{metrics.loss:.3f}", acc=f"{metrics.train_acc:.1f}")
        if on_epoch is not None:
            on_epoch(metrics)
    result.train_seconds = time.perf_counter() - start
    result.val_acc = result.epochs[-1].val_acc  # type: ignore[assignment]
    result.test_acc = evaluate(model, tensors["test"], tensors["test_labels"])
    return result
