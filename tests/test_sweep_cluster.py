"""What the sweep gives a trial: its online image-decoding processes (the Ray cluster itself: test_cluster.py)."""

from __future__ import annotations

import pytest

from pipeline.params import params_from_dict
from pipeline.sweep.cluster import online_workers


@pytest.mark.parametrize(("cpus_per_trial", "given", "workers"), [
    (1, None, 0),  # one CPU: the trial decodes in its own process
    (2, None, 1), (4.5, None, 3),  # all whole CPUs but the trial's own
    (0.5, None, 0),
    (4, 0, 0), (1, 8, 8),  # features.online_workers wins
])
def test_online_trial_decodes_with_all_its_cpus_but_one_unless_params_say(cpus_per_trial: float, given: int | None,
                                                                          workers: int) -> None:
    params = params_from_dict({"features": {"views": "online", "online_workers": given},
                               "sweep": {"cpus_per_trial": cpus_per_trial}})
    assert online_workers(params) == workers
