"""The centralized baseline's budget per round-equivalent matches one federated round."""

from __future__ import annotations

import pytest
from fedmed.simulation.centralized import centralized_steps

from fedmed.runsettings.settings import RunSettings


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (RunSettings(min_sites=2), 0),  # every site trains: local-epochs whole pooled epochs
        (RunSettings(min_sites=2, local_steps=3), 12),  # 3 steps x 4 sites
        (RunSettings(min_sites=2, local_steps=3, sites_per_round=2), 6),  # 3 x 2 sampled
        # 2 of 4 sites, 1 epoch of 100 samples at batch 4 (25 steps): half of it
        (RunSettings(min_sites=2, sites_per_round=2, batch_size=4), 12),
        (RunSettings(min_sites=2, sites_per_round=2, batch_size=4, local_epochs=2), 25),
        (RunSettings(min_sites=2, sites_per_round=8), 0),  # more than there are: all train
    ],
    ids=["all-epochs", "all-steps", "sampled-steps", "sampled-epoch", "sampled-2-epochs", "cap"],
)
def test_budget_follows_the_sites_that_train_in_a_round(settings, expected):
    assert centralized_steps(settings, sites=4, samples_per_epoch=100) == expected
