"""How the report keys and names its series: methods, CoOp variants, hyperparameters and their values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.data.protocols import BASE2NEW, FEWSHOT, XD
from pipeline.evaluate.methods import ENSEMBLE, LEARNED_METHOD_NAMES, PROBE, ZERO_SHOT

METHOD_NAMES = {ZERO_SHOT: "Zero-shot CLIP", ENSEMBLE: "Zero-shot CLIP (prompt ensemble)", PROBE: "Linear probe CLIP"}
# The report's own series: per dataset x shots, the CoOp configuration with the best seed-averaged val accuracy.
COOP_BEST = "coop-best-by-val"
COOP_BEST_NAME = "CoOp, best configuration by val"
# Linear-probe rows are one series per protocol (baselines.csv's `protocol`): its method is "linear-probe/<protocol>".
# The page's short name of each protocol in params.BaselineParams.PROTOCOLS (which describes them).
PROBE_PROTOCOL_NAMES = {"lpclip": "official lpclip protocol", "grid": "our C grid on augmented views"}
HYPERPARAMETER_NAMES = {"n_ctx": "context length M", "ctx_init": "initialisation",
                        "csc": "class-specific context (CSC)", "class_token_position": "class token position",
                        "lr": "learning rate", "epochs": "epochs", "batch_size": "batch size",
                        "precision": "precision", "kg_weight": "KgCoOp weight λ",
                        "meta_reduction": "CoCoOp Meta-Net reduction r"}
# What trials.csv rows written before methods and protocols were sweep dimensions were: CoOp, few-shot.
DEFAULT_METHOD = "coop"
DEFAULT_PROTOCOL = FEWSHOT
PROTOCOL_NAMES = {FEWSHOT: "few-shot", BASE2NEW: "base-to-new", XD: "cross-dataset transfer"}


def probe_method(protocol: str) -> str:
    """The series name of a linear-probe row; rows from before protocols were recorded keep plain PROBE."""
    return f"{PROBE}/{protocol}" if protocol else PROBE


def is_probe(method: str) -> bool:
    return method == PROBE or method.startswith(PROBE + "/")


def method_name(method: str) -> str:
    """How the report labels a method: linear-probe numbers always say which protocol produced them."""
    if is_probe(method):
        protocol = method.partition("/")[2]
        return f"{METHOD_NAMES[PROBE]} ({PROBE_PROTOCOL_NAMES.get(protocol, protocol) or 'protocol not recorded'})"
    if method == COOP_BEST:
        return COOP_BEST_NAME
    return METHOD_NAMES.get(method, method)


def shots_text(shots: int) -> str:
    """'1 shot', '16 shots'; 0 is zero-shot."""
    return "0 shots (zero-shot)" if shots == 0 else f"{shots} shot" + ("" if shots == 1 else "s")


def learned_method_name(method: str) -> str:
    """The papers' name of a sweep method ('cocoop' -> 'CoCoOp'); an unknown id as it is."""
    return LEARNED_METHOD_NAMES.get(method, method)


def variant_label(row: dict[str, Any]) -> str:
    """The prompt variant of a trial as the papers name it: method (CoOp when the row has none), context length
    (or init words), position, CSC."""
    init = f"'{row['ctx_init']}' (M={row['n_ctx']})" if row["ctx_init"] else f"M={row['n_ctx']}"
    method = learned_method_name(row.get("method") or DEFAULT_METHOD)
    return f"{method} {init}, {row['class_token_position']}, {'CSC' if row['csc'] else 'unified'}"


def value_name(key: str, value: Any) -> str:
    """A hyperparameter value as the page shows it (a word initialisation quoted, CSC or unified)."""
    if key == "ctx_init":
        return f"'{value}'" if value else "random"
    if key == "csc":
        return "CSC" if value else "unified"
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_text(key: str, value: Any) -> str:
    """A hyperparameter and its value in a few words, understandable without the column name ('M=16', 'CSC',
    'random init', 'lr 0.002'): how the page says what a comparison holds fixed."""
    if key == "n_ctx":
        return f"M={value}"
    if key == "ctx_init":
        return f"init '{value}'" if value else "random init"
    if key == "csc":
        return value_name(key, value)
    if key == "class_token_position":
        return f"class token at {value}"
    if key == "epochs":
        return f"{value} epochs"
    if key == "lr":
        return f"lr {value_name(key, value)}"
    if key == "batch_size":
        return f"batch size {value}" if value is not None else "batch size train.batch_size"
    if key == "kg_weight":
        return f"λ={value_name(key, value)}" if value is not None else "no λ"
    if key == "meta_reduction":
        return f"r={value}" if value is not None else "no Meta-Net"
    return value_name(key, value)


def settings_text(keys: Sequence[str], values: Sequence[Any]) -> str:
    """Several hyperparameters' values, comma-separated ('M=4, init 'a photo of a'')."""
    return ", ".join(setting_text(k, v) for k, v in zip(keys, values, strict=True))


def factor_name(keys: Sequence[str]) -> str:
    """The page's name of one hyperparameter, or of several that the sweep only ever changed together."""
    names = [HYPERPARAMETER_NAMES.get(k, k) for k in keys]
    return names[0] if len(names) == 1 else " + ".join(names) + " (always changed together)"
