"""CoOp's prompt learner and model: M learnable context vectors around each class name, frozen CLIP.

Prompt layout, as in the official CoOp code (positions in tokens, M = n_ctx):

    end:    [SOS] v1 ... vM [CLASS] . [EOS]
    middle: [SOS] v1 ... v(M//2) [CLASS] v(M//2+1) ... vM . [EOS]
    front:  [SOS] [CLASS] v1 ... vM . [EOS]

Unified context: one (M, D) tensor for all classes; CSC: one (C, M, D) tensor, a context per class.
Only the context is a parameter; the frozen token embeddings of SOS, class names, "." and EOS are
buffers, laid out once by index so a forward is a single gather.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.datasets import duplicate_classnames
from pipeline.engine.backbone import Backbone, count_tokens, tokenize
from pipeline.engine.text import TextTower
from pipeline.params import OFFICIAL_FP16

log = logging.getLogger(__name__)

POSITIONS = ("end", "middle", "front")


@dataclass(frozen=True)
class PromptConfig:
    """The CoOp variant. `ctx_init` words set n_ctx to their token count and initialise from them."""

    n_ctx: int = 16
    ctx_init: str = ""
    csc: bool = False
    class_token_position: str = "end"

    def to_dict(self) -> dict:
        return asdict(self)


# Class lists whose duplicate names were already reported in this process: a sweep worker or the
# domain-shift stage builds many models over one class list, and one warning says all there is to say.
_duplicates_reported: set[tuple[str, ...]] = set()


def prompt_classnames(classnames: Sequence[str]) -> list[str]:
    """Class names as they appear in prompts ('_' -> ' '); rejects empty names.

    A class is its label index, as in the official code: names shared by several labels (CLIP's ImageNet
    list calls two classes 'missile' and two 'sunglasses') give those classes equal prompts, and with CSC
    separate contexts. That is logged once per class list and process.
    """
    if not classnames:
        raise ValueError("class names are empty: CoOp needs at least one class")
    names = [str(n).replace("_", " ").strip() for n in classnames]
    for label, (raw, name) in enumerate(zip(classnames, names, strict=True)):
        if not name:
            raise ValueError(
                f"class name {raw!r} (label {label}) is empty; every class needs a name for its prompt"
            )
    duplicates = duplicate_classnames(names)
    if duplicates and tuple(names) not in _duplicates_reported:
        _duplicates_reported.add(tuple(names))
        shown = "; ".join(f"{name!r} = labels {', '.join(map(str, labels))}"
                          for name, labels in list(duplicates.items())[:10])
        log.warning(
            "%d class name(s) are each given to several of the %d labels: %s%s. As in the official CoOp code "
            "each label stays its own class: with a unified context their prompts are equal, so the "
            "classifier cannot tell them apart; with CSC each has its own context",
            len(duplicates), len(names), shown, "; ..." if len(duplicates) > 10 else "",
        )
    return names


def resolve_n_ctx(cfg: PromptConfig) -> int:
    """The context length a config really trains: the token count of ctx_init when it is given."""
    if cfg.ctx_init.strip():
        return count_tokens(cfg.ctx_init.strip())
    if cfg.n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1 (got {cfg.n_ctx}); CoOp learns at least one context vector")
    return cfg.n_ctx


def validate_prompt_config(cfg: PromptConfig) -> None:
    if cfg.class_token_position not in POSITIONS:
        raise ValueError(
            f"unknown class_token_position {cfg.class_token_position!r}; choose one of {', '.join(POSITIONS)}"
        )
    resolve_n_ctx(cfg)


class PromptLearner(nn.Module):
    """Assembles prompt embeddings (positional embedding included) from the learnable context."""

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        cfg: PromptConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        validate_prompt_config(cfg)
        names = prompt_classnames(classnames)
        n_ctx = resolve_n_ctx(cfg)
        init_words = cfg.ctx_init.strip()
        context_length = backbone.context_length
        name_lens = [count_tokens(n) for n in names]
        for name, n_tok in zip(names, name_lens, strict=True):
            needed = 1 + n_ctx + n_tok + 2  # SOS, context, class name, ".", EOS
            if needed > context_length:
                raise ValueError(
                    f"prompt for class {name!r} needs {needed} tokens ({n_ctx} context + {n_tok} for the name) "
                    f"but the model's context holds {context_length}; shorten n_ctx or the class name"
                )
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.n_cls = len(names)
        self.classnames = names
        self.position = cfg.class_token_position
        self.csc = cfg.csc

        placeholder = init_words or " ".join(["X"] * n_ctx)
        tokens = tokenize([f"{placeholder} {name}." for name in names], context_length)
        eos = tokens.argmax(dim=-1)
        length = int(eos.max()) + 1
        embedding = backbone.model.token_embedding
        with torch.no_grad():
            token_emb = embedding(tokens[:, :length].to(backbone.device)).float()  # (C, L, D)
        width = token_emb.shape[-1]

        if init_words:
            with torch.no_grad():
                init = embedding(tokenize([init_words], context_length).to(backbone.device))[0, 1 : 1 + n_ctx]
            init = init.float().clone()
            ctx = init.expand(self.n_cls, -1, -1).clone() if cfg.csc else init
        else:
            shape = (self.n_cls, n_ctx, width) if cfg.csc else (n_ctx, width)
            # Drawn on the CPU so a seed gives the same context on every device.
            ctx = torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(backbone.device)
        self.ctx = nn.Parameter(ctx)

        # Where each output position of each prompt comes from: a context vector or a frozen token.
        is_ctx = torch.zeros(self.n_cls, length, dtype=torch.bool)
        ctx_index = torch.zeros(self.n_cls, length, dtype=torch.long)
        arranged = torch.zeros_like(token_emb)
        half = n_ctx // 2
        for c, n_tok in enumerate(name_lens):
            original = token_emb[c]  # [SOS] ctx(M) name(n_tok) . EOS pad...
            name = original[1 + n_ctx : 1 + n_ctx + n_tok]
            tail = original[1 + n_ctx + n_tok :]  # ". EOS" and padding up to L
            if self.position == "end":
                layout = [("tok", original[:1]), ("ctx", range(n_ctx)), ("tok", name), ("tok", tail)]
            elif self.position == "middle":
                layout = [
                    ("tok", original[:1]),
                    ("ctx", range(half)),
                    ("tok", name),
                    ("ctx", range(half, n_ctx)),
                    ("tok", tail),
                ]
            else:
                layout = [("tok", original[:1]), ("tok", name), ("ctx", range(n_ctx)), ("tok", tail)]
            pos = 0
            for kind, part in layout:
                n = len(part)
                if kind == "ctx":
                    is_ctx[c, pos : pos + n] = True
                    ctx_index[c, pos : pos + n] = torch.tensor(list(part), dtype=torch.long)
                else:
                    arranged[c, pos : pos + n] = part
                pos += n
            assert pos == length

        pos_emb = backbone.model.positional_embedding[:length].detach().float()
        self.register_buffer("token_part", arranged + pos_emb, persistent=False)
        self.register_buffer("pos_emb", pos_emb, persistent=False)
        self.register_buffer("is_ctx", is_ctx.to(backbone.device), persistent=False)
        self.register_buffer("ctx_index", ctx_index.to(backbone.device), persistent=False)
        self.lengths = tuple(int(e) + 1 for e in eos)  # tokens of each prompt up to and including EOS
        # Positions identical in every prompt: SOS, plus the context before the class name if unified.
        shared_ctx = 0 if cfg.csc else {"end": n_ctx, "middle": half, "front": 0}[self.position]
        self.shared_len = 1 + shared_ctx

    @property
    def length(self) -> int:
        return int(self.token_part.shape[1])

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """All prompts (C, L, D), positional embedding added; L = longest EOS + 1. `ctx` defaults to ours."""
        ctx = self.ctx if ctx is None else ctx
        ctx = ctx if self.csc else ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        index = self.ctx_index.unsqueeze(-1).expand(-1, -1, ctx.shape[-1])
        from_ctx = torch.gather(ctx, 1, index) + self.pos_emb
        return torch.where(self.is_ctx.unsqueeze(-1), from_ctx, self.token_part)

    def image_prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """Prompts (B, C, L, D) for B unified contexts (B, M, D), e.g. one per image (CoCoOp)."""
        if self.csc:
            raise ValueError("per-image prompts need a unified context (csc: false)")
        from_ctx = ctx[:, self.ctx_index] + self.pos_emb  # (B, C, L, D): context vector of each position
        return torch.where(self.is_ctx.unsqueeze(-1), from_ctx, self.token_part)


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX); else bf16 is emulated."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """Weight/activation dtype of the text path for a precision setting (amp keeps fp32 weights)."""
    device_type = torch.device(device).type
    if precision in ("fp32", "amp"):
        if precision == "amp" and device_type != "cuda":
            raise ValueError("precision 'amp' (fp16 autocast) needs a CUDA device; on the CPU use 'bf16'")
        return torch.float32
    if precision == "bf16":
        if device_type == "cpu" and not native_cpu_bf16():
            log.warning(
                "precision bf16 on a CPU without native bf16 matrix units (%s): PyTorch emulates it, which is "
                "far slower than fp32 here; use fp32 on this machine", torch.backends.cpu.get_cpu_capability()
            )
        return torch.bfloat16
    if precision == "fp16":
        if device_type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device (CPU fp16 matmuls are slow); use 'bf16'")
        return torch.float16
    if precision == OFFICIAL_FP16:
        if device_type != "cuda":
            log.warning("precision %s on the CPU: runs, slowly; it exists to reproduce the paper's GPU runs",
                        OFFICIAL_FP16)
        return torch.float16
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16, fp16, amp or {OFFICIAL_FP16}")


# On a GPU the shared-prefix path costs two dependent passes per layer (prefix, then suffixes), so it
# pays only when it saves enough tokens: (classes - 1) x (shared length - 1). Thresholds from CUDA-graphed
# steps of the RN50 tower on an H100 (BENCHMARKS.md): fp32 between 144 and 792 saved tokens, bf16/fp16
# between 2392 and 4784. On the CPU the step is compute-bound and fewer tokens always win.
GPU_MIN_SAVED_TOKENS = {"fp32": 500, "bf16": 4000, "fp16": 4000, "amp": 4000, OFFICIAL_FP16: 4000}


def prefers_shared_prefix(device_type: str, precision: str, n_cls: int, shared_len: int) -> bool:
    """Whether the shared-prefix path is the faster exact path for this problem on this device."""
    if shared_len <= 1:
        return False
    if device_type != "cuda":
        return True
    return (n_cls - 1) * (shared_len - 1) >= GPU_MIN_SAVED_TOKENS[precision]


def prefers_packing(device_type: str, precision: str, padded_tokens: int, real_tokens: int) -> bool:
    """Whether running only the real tokens (text.Packing) beats running the padded grid.

    On the CPU the step is compute-bound and the index copies and zero-fill cost 1-3% of it (profiled;
    bench/packing.py: 1.2x with 36% of positions padding, 2.2x with 68%, within noise at 8%), so it packs
    whenever a token is saved. On a GPU packing adds three index kernels per layer; a second pass per
    layer (the shared prefix) adds more kernels than that, so its measured crossover bounds packing's from
    above. Not yet measured on a GPU by itself.
    """
    saved = padded_tokens - real_tokens
    if saved <= 0:
        return False
    return device_type != "cuda" or saved >= GPU_MIN_SAVED_TOKENS[precision]


class CoOp(nn.Module):
    """Prompt learner + frozen text tower; logits for (normalised) cached image features.

    The methods built on it (pipeline/engine/methods.py) override the training hooks: `loss`,
    `trained_parameters`, `learned_tensors`, `predict`.
    """

    graphable = True  # the text path's shapes never change, so a CUDA graph can replay it

    def __init__(
        self,
        backbone: Backbone,
        classnames: list[str],
        cfg: PromptConfig,
        precision: str = "fp32",
        shared_prefix: bool | None = None,
        generator: torch.Generator | None = None,
        pack_tokens: bool | None = None,
    ) -> None:
        """`shared_prefix`, `pack_tokens`: None picks what is faster for the device; True/False force it."""
        super().__init__()
        self.prompt_learner = PromptLearner(backbone, classnames, cfg, generator)
        self.logit_scale = backbone.logit_scale
        device_type = backbone.device.type
        learner = self.prompt_learner
        if shared_prefix is None:
            shared_prefix = prefers_shared_prefix(device_type, precision, len(classnames), learner.shared_len)
        # Sharing SOS alone saves nothing worth a second code path.
        self.shared_prefix = shared_prefix and learner.shared_len > 1
        skipped = learner.shared_len if self.shared_prefix else 0  # positions the per-class pass skips
        padded = learner.n_cls * (learner.length - skipped)
        real = sum(learner.lengths) - learner.n_cls * skipped
        self.per_class_tokens = (real, padded)  # of the per-class pass: up to each EOS, and padded to L
        if pack_tokens is None:
            pack_tokens = prefers_packing(device_type, precision, padded, real)
        self.pack_tokens = pack_tokens and real < padded
        self.text = TextTower(backbone, compute_dtype(precision, backbone.device), self.pack_tokens)
        if precision == OFFICIAL_FP16:  # the official code builds the context in CLIP's fp16
            with torch.no_grad():
                learner.ctx.data = learner.ctx.data.half()
        self._graphed: Callable[[torch.Tensor], torch.Tensor] | None = None

    def text_features(self) -> torch.Tensor:
        """(C, E) L2-normalised class text features, fp32."""
        encode = self._graphed if self._graphed is not None else self._encode
        return encode(self.prompt_learner.ctx)

    def _encode(self, ctx: torch.Tensor) -> torch.Tensor:
        prompts = self.prompt_learner(ctx)
        lengths = self.prompt_learner.lengths
        if self.shared_prefix:
            p = self.prompt_learner.shared_len
            features = self.text.forward_shared(prompts[:1, :p], prompts[:, p:], [n - p for n in lengths])
        else:
            features = self.text(prompts, lengths)
        return F.normalize(features, dim=-1)

    def capture_cuda_graph(self) -> None:
        """Record the text path (forward and backward) as a CUDA graph and replay it from then on.

        A CoOp step is a few hundred small kernels; on a GPU their launch cost exceeds their work unless
        the number of classes is large, and a graph replays them with one launch. Shapes never change
        during training, which is what graphs need.
        """
        if self.prompt_learner.ctx.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        sample = self.prompt_learner.ctx.detach().clone().requires_grad_(True)
        self._graphed = torch.cuda.make_graphed_callables(self._encode, (sample,))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised image features (B, E) -> logits (B, C)."""
        return self.logit_scale * image_features @ self.text_features().t()

    def loss(self, image_features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective on a batch: (loss, logits (B, C)); CoOp's is cross-entropy."""
        logits = self(image_features)
        return F.cross_entropy(logits.float(), labels), logits

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimiser updates: the context."""
        return [self.prompt_learner.ctx]

    def learned_tensors(self) -> dict[str, torch.Tensor]:
        """What a learned-context file holds (pipeline/engine/context.py): ``ctx``, fp32 on the CPU."""
        return {"ctx": self.prompt_learner.ctx.detach().float().cpu()}

    @torch.no_grad()
    def predict(self, image_features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Predicted labels (N,) of normalised image features; the text features are computed once."""
        text = self.text_features()
        labels = [(image_features[start : start + chunk] @ text.t()).argmax(dim=-1)
                  for start in range(0, len(image_features), chunk)]
        return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=image_features.device)
