"""The evaluation methods as the result tables (baselines.csv, domain_shift.csv) name them in `method`."""

from __future__ import annotations

ZERO_SHOT = "zero-shot"  # CLIP with the dataset's hand-crafted prompt
ENSEMBLE = "zero-shot-ensemble"  # CLIP with the prompt ensemble (evaluate.zero_shot.ensemble_templates)
PROBE = "linear-probe"  # logistic regression on few-shot features, a row per baselines.linear_probe_protocols
COOP = "CoOp"  # a learned context (domain_shift.csv: the sweep's ImageNet contexts on the variants)
METHODS = (ZERO_SHOT, ENSEMBLE, PROBE)  # what the baselines stage runs (its --methods)
