"""The end-of-run evaluation message: the round config the sites train their own models with."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fedmed.server.evaluation import _message
from fedmed.server.federation import Federation, train_config

from fedmed import wire
from fedmed.roundconfig import TrainConfig
from fedmed.runsettings.settings import RunSettings


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_end_of_run_training_uses_the_base_lr_not_the_annealed_last_round(schedule):
    # fine-tuning and the local-only baselines train at the site after the last round: under
    # a cosine schedule the last round's lr is near 0, which would leave them untrained
    settings = RunSettings(num_rounds=10, lr=0.004, lr_schedule=schedule)
    fed = SimpleNamespace(
        settings=settings, config=lambda r: train_config(settings, r), shared_weights=lambda w: w
    )
    content = _message(fed, {"global-final": {"w": np.zeros(2, np.float32)}}, {})
    cfg = TrainConfig.from_config(dict(content.config_records["config"]))
    assert cfg.lr == 0.004 and cfg.server_round == 10
    if schedule == "cosine":
        assert train_config(settings, 10).lr < 0.0001


def test_under_fedbn_the_sites_evaluate_the_global_models_with_their_own_statistics(tmp_path):
    # the server's running statistics were never trained (SiloBN keeps them at the sites): sent
    # along, they replaced the site's and its validation Dice of the global model fell to ~0
    settings = RunSettings(
        fedbn=True, model_features="4,8,16,32,64", patch_size="32,32", out_dir=str(tmp_path)
    )
    fed = Federation(None, settings)  # type: ignore[arg-type]
    weights = fed.initial_weights
    stats = set(fed.local_keys)
    assert stats and stats <= set(weights)

    content = _message(fed, {"global-final": weights, "centralized": weights}, {})

    sent = set(wire.unpack_content(content))
    assert not {k for k in sent if k.startswith("global-final::") and k[14:] in stats}
    assert {f"global-final::{k}" for k in set(weights) - stats} <= sent
    assert {f"centralized::{k}" for k in stats} <= sent  # a model with its own statistics
