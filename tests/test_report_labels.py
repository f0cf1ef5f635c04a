"""The report's names for what the stages write: every method and linear-probe protocol has one."""

from __future__ import annotations

from pipeline.evaluate.methods import ENSEMBLE, METHODS, PROBE, ZERO_SHOT
from pipeline.params import BaselineParams
from pipeline.report.labels import METHOD_NAMES, PROBE_PROTOCOL_NAMES, method_name, probe_method


def test_every_baseline_method_and_protocol_has_a_name_on_the_page() -> None:
    assert METHOD_NAMES.keys() == set(METHODS)
    assert PROBE_PROTOCOL_NAMES.keys() == BaselineParams.PROTOCOLS.keys()
    assert [method_name(m) for m in (ZERO_SHOT, ENSEMBLE)] == ["Zero-shot CLIP", "Zero-shot CLIP (prompt ensemble)"]
    assert method_name(probe_method("lpclip")) == "Linear probe CLIP (official lpclip protocol)"
    assert method_name(probe_method("grid")) == "Linear probe CLIP (our C grid on augmented views)"
    assert method_name(PROBE) == "Linear probe CLIP (protocol not recorded)"  # rows from before protocols
