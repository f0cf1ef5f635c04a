"""The evaluation methods as the result tables (baselines.csv, domain_shift.csv) name them in `method`."""

from __future__ import annotations

ZERO_SHOT = "zero-shot"  # CLIP with the dataset's hand-crafted prompt
ENSEMBLE = "zero-shot-ensemble"  # CLIP with the prompt ensemble (evaluate.zero_shot.ensemble_templates)
PROBE = "linear-probe"  # logistic regression on few-shot features, a row per baselines.linear_probe_protocols
# A learned prompt's row (domain_shift.csv: the sweep's source models on the shifted sets) names its method as
# the papers do, keyed by the engine's method ids (pipeline.engine.methods.METHODS; a test checks they agree:
# written out here so that the report's light imports do not load the engine).
LEARNED_METHOD_NAMES = {"coop": "CoOp", "cocoop": "CoCoOp", "kgcoop": "KgCoOp"}
COOP = LEARNED_METHOD_NAMES["coop"]  # a learned CoOp context
METHODS = (ZERO_SHOT, ENSEMBLE, PROBE)  # what the baselines stage runs (its --methods)
# baselines.csv's `protocol` of zero-shot's base-to-new rows (the base, the new half of the classes; a linear
# probe's row names its probe protocol there, other rows leave it empty)
BASE_CLASSES, NEW_CLASSES = "base", "new"


def learned_method_name(method: str) -> str:
    """The table's name of an engine method id ('cocoop' -> 'CoCoOp'); ValueError for an unknown one."""
    try:
        return LEARNED_METHOD_NAMES[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; the learned methods are {', '.join(LEARNED_METHOD_NAMES)}"
                         ) from None
