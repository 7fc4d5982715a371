"""One federated round at a site: federated evaluation first, SiloBN state, Ditto, SCAFFOLD."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedmed.crosssite import own_models
from fedmed.globalmodel import build_network, local_norm_keys, model_arrays
from fedmed.roundconfig import TrainConfig
from fedmed.scaffold import zero_controls
from fedmed.siteround import SiteState, run_site_round
from fedmed.task import SiteTask

CFG = TrainConfig(
    model="coplenet",
    model_features=(4, 8, 16, 32, 64),
    patch_size=(32, 32),
    local_steps=2,
    batch_size=2,
    val_fraction=0.34,
    run_id="cd" * 32,
    server_round=1,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def task(demo_root) -> SiteTask:
    return SiteTask(demo_root / "site-A", val_fraction=CFG.val_fraction, seed=0, device="cpu")


@pytest.fixture(scope="module")
def start() -> dict[str, np.ndarray]:
    return model_arrays(build_network(CFG, seed=0))


def test_the_received_model_is_evaluated_before_training(task, start):
    result = run_site_round(task, start, CFG, SiteState(run_id=CFG.run_id))
    before = task.evaluate(task.model(CFG, start), CFG)
    assert result.metrics["global-val-dice"] == pytest.approx(before["dice"])
    assert result.metrics["global-val-n_cases"] == task.num_val_cases
    assert "val-dice" in result.metrics and set(result.arrays) == set(start)
    assert result.state.samples == 2 * CFG.batch_size and result.state.rounds == 1


def test_siloBN_keeps_the_statistics_and_uses_them_next_round(task, start):
    cfg = dataclasses.replace(CFG, fedbn=True)
    stats = local_norm_keys(build_network(cfg))
    shared = {k: v for k, v in start.items() if k not in stats}
    first = run_site_round(task, shared, cfg, SiteState(run_id=cfg.run_id))
    assert set(first.state.norm) == stats and set(first.arrays) == set(shared)
    # the next round starts from the site's statistics (running averages carry them on)
    again = run_site_round(task, shared, cfg, first.state)
    fresh = run_site_round(task, shared, cfg, SiteState(run_id=cfg.run_id))
    key = next(k for k in stats if k.endswith("running_mean"))
    assert not np.allclose(again.state.norm[key], fresh.state.norm[key])


def test_ditto_trains_a_personal_model_that_stays_at_the_site(task, start):
    cfg = dataclasses.replace(CFG, ditto_lambda=0.1)
    result = run_site_round(task, start, cfg, SiteState(run_id=cfg.run_id))
    assert set(result.state.personal) == set(start)
    assert "ditto-val-dice" in result.metrics
    assert any(not np.array_equal(result.state.personal[k], result.arrays[k]) for k in start)


def test_scaffold_returns_the_control_change_and_keeps_the_new_control(task, start):
    cfg = dataclasses.replace(CFG, scaffold=True)
    model = build_network(cfg)
    server = zero_controls(model)
    result = run_site_round(task, start, cfg, SiteState(run_id=cfg.run_id), server_control=server)
    assert set(result.control_delta) == set(server)
    assert all(np.allclose(result.control_delta[k], result.state.control[k]) for k in server)
    assert any(np.abs(v).sum() > 0 for v in result.control_delta.values())


def test_site_state_round_trips_through_arrays():
    state = SiteState(run_id="r", norm={"bn.running_mean": np.ones(2)}, samples=12.0, rounds=3)
    back = SiteState.from_arrays("r", state.to_arrays())
    assert (back.samples, back.rounds) == (12.0, 3)
    assert np.array_equal(back.norm["bn.running_mean"], np.ones(2))


def test_the_local_only_baseline_trains_as_many_samples_as_the_run(task, start):
    state = SiteState(run_id=CFG.run_id, samples=6.0)
    models = own_models(task, CFG, state, final=start, finetune_epochs=0, local_baseline=True)
    assert list(models) == ["local-only"]
    # trained from the run's initial weights (seed), not from the final global model
    initial = model_arrays(build_network(CFG, seed=CFG.seed))
    assert any(not np.array_equal(models["local-only"][k], initial[k]) for k in initial)
