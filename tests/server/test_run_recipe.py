"""The loss, LAMP and preprocessing run settings: validation, the round config, and the plan
that every round checkpoint records for ``fedmed infer``."""

from __future__ import annotations

import json

import pytest
from fedmed.server.aggregate import SiteUpdate
from fedmed.server.federation import Federation, train_config

from fedmed.cli.infer import load_model
from fedmed.errors import ConfigError
from fedmed.plan import PreprocessingPlan
from fedmed.roundconfig import TrainConfig, trainer_config
from fedmed.runsettings.settings import RunSettings

LAMP = {"model": "lamp_unet", "model_features": "4,8,16", "patch_size": "16,16,16"}


def test_the_recipe_settings_travel_in_the_round_config():
    settings = RunSettings(
        loss="nr-dice",
        nr_gamma=2.0,
        nr_denominator="squared",
        self_ensembling=True,
        ema_decay=0.9,
        lamp_skips="none",
        target_spacing="2,2,4",
        hu_window="-500,500",
        **LAMP,
    )
    cfg = train_config(settings, 1)
    assert (cfg.loss, cfg.nr_gamma, cfg.nr_denominator) == ("nr-dice", 2.0, "squared")
    assert (cfg.self_ensembling, cfg.ema_decay, cfg.lamp_skips) == (True, 0.9, "none")
    assert (cfg.target_spacing, cfg.intensity) == ((2.0, 2.0, 4.0), "ct-window")
    assert cfg.hu_window == (-500.0, 500.0)
    assert TrainConfig.from_config(cfg.to_config()) == cfg
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    mr = train_config(RunSettings(intensity="zscore-nonzero", **LAMP), 1)
    assert mr.intensity == "zscore-nonzero" and mr.plan.pipeline_settings().intensity == (
        "zscore-nonzero"
    )


def test_the_default_loss_is_what_each_model_trained_with_before():
    assert RunSettings().loss_name == "nr-dice"
    assert RunSettings(model="unet3d").loss_name == "dice-ce"
    assert trainer_config(train_config(RunSettings(), 1)).loss == "nr_dice"
    assert trainer_config(train_config(RunSettings(**LAMP), 1)).loss == "dice_ce"


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"loss": "focal"}, "'loss' is 'focal': use one of auto, dice, dice-ce, nr-dice"),
        ({"nr-gamma": 2.5}, "'nr-gamma' is 2.5: it must be <= 2"),
        ({"nr-denominator": "cubic"}, "'nr-denominator' is 'cubic': use one of linear, squared"),
        (
            {"self-ensembling": True, "model": "unet3d"},
            "'self-ensembling' is true but the loss is 'dice-ce'",
        ),
        ({"ema-decay": 1.0}, "'ema-decay' is 1.0: it must be < 1"),
        ({"lamp-skips": "none"}, "'lamp-skips' is 'none' but model is 'coplenet'"),
        ({"lamp-skips": "some", "model": "lamp_unet"}, "'lamp-skips' is 'some'"),
        ({"target-spacing": "1,1"}, "target-spacing = '1,1' must be 3 comma-separated"),
        ({"intensity": "minmax"}, "intensity = 'minmax' is unknown"),
        ({"hu-window": "400,-1000"}, r"CT window \(400.0, -1000.0\) must be"),
        (
            {
                "self-ensembling": True,
                "dp-mode": "record",
                "dp-clip-norm": 1.0,
                "dp-noise-multiplier": 1.0,
                "model-norm": "group",
            },
            "'self-ensembling' is true but dp-mode is 'record'",
        ),
    ],
    ids=[
        "loss",
        "gamma",
        "denominator",
        "ensembling-loss",
        "ema",
        "skips-model",
        "skips",
        "spacing",
        "intensity",
        "window",
        "ensembling-dp",
    ],
)
def test_bad_recipe_settings_name_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        RunSettings.from_run_config(values)


def test_only_changed_recipe_settings_change_the_identity_hash():
    base = RunSettings().identity_hash()
    assert RunSettings(target_spacing="").identity_hash() == base  # "" is native
    assert RunSettings(target_spacing="1,1,2.5").identity_hash() != base
    assert RunSettings(loss="dice").identity_hash() != base


class _TwoSites(Federation):
    """Two sites that return the global model as their update; no grid, no final evaluation."""

    def wait_for_sites(self) -> list[int]:
        return [11, 12]

    def evaluate_final(self, weights, *, last_round=None) -> None:
        pass

    def run_round(self, server_round, attempt, nodes, weights):
        record = {"round": server_round, "attempt": attempt, "sites": {}, "rejected": {}}
        record["missing"] = []
        updates = [SiteUpdate(f"node-{n}", self.shared_weights(weights), 4, {}) for n in nodes]
        return record, updates


def test_every_round_checkpoint_records_the_plan_and_infer_prepares_images_with_it(tmp_path):
    # Prepare
    out = tmp_path / "run"
    settings = RunSettings(
        num_rounds=1,
        min_sites=2,
        lamp_skips="none",
        target_spacing="2.5,2.5,5",
        intensity="zscore",
        out_dir=str(out),
        **LAMP,
    )
    federation = _TwoSites(None, settings, holdout_fn=lambda weights, cfg: None)  # type: ignore[arg-type]
    # Execute
    federation.run()
    # Assert: round 0 and round 1 record the run's plan
    expected = train_config(settings, 0).plan
    for server_round in (0, 1):
        meta = json.loads((federation.store.round_dir(server_round) / "meta.json").read_text())
        assert PreprocessingPlan.from_metadata(meta, source="meta.json") == expected
    # fedmed infer rebuilds the skip-free LAMP model and the sites' preprocessing
    loaded = load_model(out, device="cpu")
    assert (loaded.settings.pixdim, loaded.settings.intensity) == ((2.5, 2.5, 5.0), "zscore")
    assert (loaded.cfg.model, loaded.cfg.lamp_skips) == ("lamp_unet", "none")
    assert (loaded.cfg.model_features, loaded.cfg.patch_size) == ((4, 8, 16), (16, 16, 16))
