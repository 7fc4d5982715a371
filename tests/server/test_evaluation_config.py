"""The end-of-run evaluation message: the round config the sites train their own models with."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fedmed.server.evaluation import _message
from fedmed.server.federation import train_config

from fedmed.roundconfig import TrainConfig
from fedmed.runsettings.settings import RunSettings


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_end_of_run_training_uses_the_base_lr_not_the_annealed_last_round(schedule):
    # fine-tuning and the local-only baselines train at the site after the last round: under
    # a cosine schedule the last round's lr is near 0, which would leave them untrained
    settings = RunSettings(num_rounds=10, lr=0.004, lr_schedule=schedule)
    fed = SimpleNamespace(settings=settings, config=lambda r: train_config(settings, r))
    content = _message(fed, {"global-final": {"w": np.zeros(2, np.float32)}}, {})
    cfg = TrainConfig.from_config(dict(content.config_records["config"]))
    assert cfg.lr == 0.004 and cfg.server_round == 10
    if schedule == "cosine":
        assert train_config(settings, 10).lr < 0.0001
