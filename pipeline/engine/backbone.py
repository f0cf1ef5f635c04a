"""Load a frozen open_clip CLIP model: image encoder for the feature cache, text-tower parts for CoOp.

`pretrained` is an open_clip tag (``openai``, LAION tags), a local checkpoint file (``.pt``, ``.bin``,
``.safetensors``; loaded with ``weights_only=True``), or ``None`` for random weights. Random weights
are seeded, so two processes that load the same architecture get the same model (the feature cache
and the sweep's trials must agree), but accuracies are then meaningless and we say so loudly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from huggingface_hub import constants as hf_constants
from open_clip.model import CLIP
from torch import nn

from pipeline.errors import UserError
from pipeline.params import Params

log = logging.getLogger(__name__)

TINY_ARCH = "coop-tiny"
_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
_RANDOM_INIT_SEED = 0
_NO_WEIGHTS = {None, "", "none", "None", "random"}


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights could not be loaded (no network, unknown tag, missing file)."""


class DeviceUnavailableError(UserError, ValueError):
    """The requested device (e.g. cuda) is not visible on this machine."""


class BackboneError(UserError, ValueError):
    """backbone.arch names no open_clip architecture, or one whose text tower CoOp cannot drive."""


@cache
def register_project_models() -> None:
    """Make the project's own architectures (the tiny test/demo CLIP) known to open_clip."""
    open_clip.add_model_config(_MODEL_CONFIGS)


@dataclass
class Backbone:
    """A frozen CLIP model plus what CoOp needs to know about it."""

    model: CLIP
    arch: str
    pretrained: str | None
    fingerprint: str  # arch + sha256 of the weights; identifies feature caches and contexts

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.model.visual.preprocess_cfg["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.model.visual.preprocess_cfg["std"])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def context_length(self) -> int:
        return int(self.model.positional_embedding.shape[0])

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def embed_dim(self) -> int:
        proj = self.model.text_projection
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, embed_dim) fp32 features, not normalised."""
        return self.model.encode_image(images.to(self.device, memory_format=torch.channels_last)).float()

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Plain prompts -> (N, embed_dim) fp32 text features, not normalised (zero-shot baselines)."""
        tokens = tokenize(texts, self.context_length).to(self.device)
        return self.model.encode_text(tokens).float()

    def project_text(self, eos_states: torch.Tensor) -> torch.Tensor:
        """Final norm + projection of the EOS hidden states (N, width) -> (N, embed_dim)."""
        x = self.model.ln_final(eos_states)
        proj = self.model.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj.to(x.dtype)


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's tokenizer; (N, context_length) int64, zero padded, EOS at the argmax."""
    return open_clip.tokenize(texts, context_length=context_length)


def count_tokens(text: str) -> int:
    """BPE tokens of `text` without SOS/EOS."""
    return len(open_clip.tokenizer._tokenizer.encode(text))


def decode_tokens(token_ids: list[int]) -> list[str]:
    """Each id to its text, as the tokenizer's decode gives it, the end-of-word marker '</w>' dropped.

    CLIP's BPE vocabulary spells bytes as printable symbols ("ðŁĳĳ</w>" is the four UTF-8 bytes of 👑):
    they are turned back into bytes and decoded. A piece holding only part of a character's bytes shows
    them escaped ("\\xf0\\x9f"), where the tokenizer's own decode would print the same U+FFFD for all.
    """
    tokenizer = open_clip.tokenizer._tokenizer
    words = []
    for token_id in token_ids:
        piece = tokenizer.decoder[token_id].removesuffix("</w>")
        words.append(bytes(tokenizer.byte_decoder[c] for c in piece).decode("utf-8", errors="backslashreplace"))
    return words


def weights_fingerprint(model: nn.Module, arch: str) -> str:
    """Architecture name plus a content hash of every weight, in a stable order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{arch}:{digest.hexdigest()[:16]}"


@contextmanager
def _hf_offline() -> Iterator[None]:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; its module constant is what it consults.
    old = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = old


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds instead of a minute of retries."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _create(arch: str, pretrained: str | None) -> CLIP:
    if pretrained in _NO_WEIGHTS:
        warnings.warn(
            f"Backbone {arch} has RANDOM weights (pretrained=None): features are meaningless and so "
            "are all accuracies. Pass an open_clip tag (e.g. 'openai') or a checkpoint file for real results.",
            stacklevel=3,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_INIT_SEED)
            return open_clip.create_model(arch, pretrained=None)
    assert pretrained is not None
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        return _create_from_tag(arch, pretrained, tag_cfg)
    if os.path.isfile(pretrained):
        _check_checkpoint_arch(arch, pretrained)
        return open_clip.create_model(arch, pretrained=pretrained, weights_only=True)
    if _looks_like_path(pretrained):
        raise WeightsUnavailableError(f"Checkpoint file {pretrained!r} does not exist (backbone {arch}).")
    known = open_clip.list_pretrained_tags_by_model(arch)
    raise WeightsUnavailableError(
        f"{pretrained!r} is neither a pretrained tag of {arch} nor an existing file. "
        f"Known tags for {arch}: {known or 'none'}; or pass a local checkpoint path."
    )


def worker_weights(pretrained: str | None) -> str | None:
    """`pretrained` as a process in another working directory must pass it: a local checkpoint file's absolute
    path; a tag or None unchanged."""
    if pretrained is not None and os.path.isfile(pretrained):
        return os.path.abspath(pretrained)
    return pretrained


def _check_checkpoint_arch(arch: str, path: str) -> None:
    """A safetensors checkpoint that records its architecture (ours do: pipeline/pretrain.py) must match `arch`."""
    if not path.endswith(".safetensors"):
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        recorded = (f.metadata() or {}).get("arch")
    if recorded and recorded != arch:
        raise WeightsUnavailableError(
            f"Checkpoint {path} holds weights of architecture {recorded!r}, not {arch!r}: set backbone.arch: "
            f"{recorded} (or --arch {recorded}) to use it."
        )


def _create_from_tag(arch: str, tag: str, tag_cfg: dict) -> CLIP:
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        with _hf_offline():  # weights already in the local cache load without the network
            return open_clip.create_model(arch, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception as cached_error:
        source = f"{hf_constants.ENDPOINT}/" if tag_cfg.get("hf_hub") else tag_cfg.get("url", "")
        if os.environ.get("COOP_OFFLINE") == "1" or hf_constants.HF_HUB_OFFLINE or not _reachable(source):
            raise _download_error(arch, tag, cached_error, source) from None
    try:
        return open_clip.create_model(arch, pretrained=tag, force_quick_gelu=quick_gelu)
    except Exception as error:
        raise _download_error(arch, tag, error, source) from None


def _download_error(arch: str, tag: str, error: Exception, source: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"Could not load pretrained weights {arch}/{tag!r}: they are not in the local cache and {source} "
        f"cannot be reached or failed ({type(error).__name__}: {str(error)[:160]}). On a machine with internet run once "
        f"`python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\"` to fill the "
        f"cache, or download the checkpoint and pass its path instead of the tag "
        f"(backbone.pretrained: /path/to/{arch}.pt in params.yaml, or --pretrained /path/to/file)."
    )


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device when one is visible (under Ray: the trial's assigned GPU), else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {spec!r} requested but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


def load_backbone(arch: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Create `arch` with `pretrained` weights, frozen, in eval mode, on `device`."""
    register_project_models()
    if arch not in open_clip.list_models():
        raise BackboneError(
            f"Unknown backbone architecture {arch!r}. Known: {TINY_ARCH}, RN50, RN101, ViT-B-32, ViT-B-16, ... "
            "(see open_clip.list_models())."
        )
    model = _create(arch, pretrained)
    if not isinstance(model, CLIP):
        raise BackboneError(
            f"{arch} has a custom text tower ({type(model).__name__}); CoOp needs open_clip's built-in "
            "text transformer (CLIP class), e.g. RN50, ViT-B-16."
        )
    model.eval().requires_grad_(False)
    model.to(device)
    # Convolutions run faster on channels-last tensors (oneDNN on CPUs: 1.3x for RN50 here; tensor cores
    # on GPUs); the arithmetic is the same. Only 4-d weights change layout; the fingerprint ignores layout.
    model.visual.to(memory_format=torch.channels_last)
    pretrained_name = None if pretrained in _NO_WEIGHTS else pretrained
    return Backbone(model, arch, pretrained_name, weights_fingerprint(model, arch))


def load_params_backbone(params: Params, device: str | torch.device) -> Backbone:
    """params' backbone (the one the feature caches are built with), frozen, on `device`.

    Random weights (backbone.pretrained: null, the demo and test setup) are logged as one warning line
    instead of open_clip's UserWarning with its source location.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(params.backbone.arch, params.backbone.pretrained, device=device)
    if backbone.pretrained is None:
        log.warning("backbone %s has RANDOM weights: accuracies are meaningless (demo/test setup)", backbone.arch)
    return backbone
