"""Federation start-up checks and the round loop's retries, without a grid."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fedmed.server.aggregate import SiteUpdate
from fedmed.server.checkpoint import CheckpointStore
from fedmed.server.federation import Federation, SiteInfo, train_config
from fedmed.server.sampling import sample_sites
from flower_messages import flower_message
from flwr.app import ConfigRecord, Message

from fedmed.errors import ConfigError, FederationError
from fedmed.runsettings.settings import RunSettings

SMALL = {"model_features": "4,8,16,32,64", "patch_size": "32,32"}


def test_train_config_carries_the_site_settings():
    settings = RunSettings(strategy="fedprox", proximal_mu=0.5, fedbn=True, lr=0.01, **SMALL)
    cfg = train_config(settings, 4)
    assert (cfg.server_round, cfg.proximal_mu, cfg.fedbn, cfg.lr) == (4, 0.5, True, 0.01)
    assert cfg.model_features == (4, 8, 16, 32, 64) and cfg.patch_size == (32, 32)


def test_train_config_sends_the_rounds_annealed_lr():
    settings = RunSettings(num_rounds=2, lr=0.01, lr_schedule="cosine", **SMALL)
    assert [train_config(settings, r).lr for r in (0, 1, 2)] == pytest.approx([0.01, 0.01, 0.005])


def test_missing_holdout_folder_is_refused_before_any_round(tmp_path):
    settings = RunSettings(data_dir=str(tmp_path / "nope"), out_dir=str(tmp_path / "out"), **SMALL)
    # the grid is never reached: the check comes first
    with pytest.raises(ConfigError, match=r"'data-dir' is .*nope', which is not a folder"):
        Federation(None, settings).run()  # type: ignore[arg-type]


def test_resume_with_other_settings_is_refused(tmp_path):
    # Prepare: a run made with another learning rate left round 0 in out-dir
    out = tmp_path / "out"
    old = RunSettings(lr=0.5, out_dir=str(out), **SMALL)
    weights = Federation(None, old).initial_weights  # type: ignore[arg-type]
    CheckpointStore(out).save(0, weights, metrics={}, config_hash=old.identity_hash())
    new = RunSettings(lr=0.1, out_dir=str(out), **SMALL)
    # Execute / Assert
    with pytest.raises(ConfigError, match="holds a run with other settings"):
        Federation(None, new).run()  # type: ignore[arg-type]


def test_initial_weights_are_seeded(tmp_path):
    a = Federation(None, RunSettings(seed=3, **SMALL)).initial_weights  # type: ignore[arg-type]
    b = Federation(None, RunSettings(seed=3, **SMALL)).initial_weights  # type: ignore[arg-type]
    assert all(np.array_equal(a[k], b[k]) for k in a)


class _OneSiteNeverReplies(Federation):
    """Four connected sites, two sampled per round; ``broken`` never replies."""

    def __init__(self, settings: RunSettings, broken: int) -> None:
        super().__init__(None, settings, holdout_fn=lambda weights, cfg: None)  # type: ignore[arg-type]
        self.broken = broken
        self.asked: list[list[int]] = []
        for node in (11, 12, 13, 14):
            self.roster.sites[node] = SiteInfo(node, f"node-{node}", 4, 1, verified=True)

    def wait_for_sites(self) -> list[int]:
        return [11, 12, 13, 14]

    def _update_roster(self, connected: list[int], *, ask=None, now=False) -> None:
        pass

    def evaluate_final(self, weights, *, last_round=None) -> None:
        pass

    def run_round(self, server_round, attempt, nodes, weights):
        self.asked.append(list(nodes))
        record = {"round": server_round, "attempt": attempt, "sites": {}, "rejected": {}}
        record["missing"] = [f"node-{n}" for n in nodes if n == self.broken]
        updates = [
            SiteUpdate(f"node-{n}", self.shared_weights(weights), 4, {})
            for n in nodes
            if n != self.broken
        ]
        return record, updates


def test_a_retry_asks_other_sites_than_the_one_that_failed(tmp_path):
    # Prepare: the site sampled first in round 1 never replies
    settings = RunSettings(
        num_rounds=1,
        min_sites=2,
        sites_per_round=2,
        retry_failed_rounds=2,
        out_dir=str(tmp_path / "out"),
        **SMALL,
    )
    first = sample_sites([11, 12, 13, 14], settings, 1)
    federation = _OneSiteNeverReplies(settings, broken=first[0])
    # Execute
    result = federation.run()
    # Assert: attempt 1 failed with the broken site; attempt 2 drew two other sites and passed
    assert federation.asked[0] == first
    assert len(federation.asked) == 2 and first[0] not in federation.asked[1]
    assert len(federation.asked[1]) == 2 and result.failed_attempts == 1


def test_fedbn_shares_affine_weights_so_sites_change_the_held_out_result(tmp_path, demo_root):
    # Prepare: under fedbn the server sends every parameter, only batch-norm statistics stay
    settings = RunSettings(
        fedbn=True, data_dir=str(demo_root / "holdout"), out_dir=str(tmp_path), **SMALL
    )
    fed = Federation(None, settings)  # type: ignore[arg-type]
    shared = fed.shared_weights(fed.initial_weights)
    affine = [k for k in shared if k.rsplit(".", 1)[0] + ".running_var" in fed.local_keys]
    assert affine and not set(shared) & fed.local_keys
    # two sites whose normalization layers learned other affine weights
    updates = [
        SiteUpdate(
            site,
            {k: (v + shift if k in affine else v) for k, v in shared.items()},
            1,
            {},
        )
        for site, shift in (("A", 2.0), ("B", 4.0))
    ]
    # Execute
    merged = {**fed.initial_weights, **fed.aggregator.aggregate(shared, updates)}
    cfg = train_config(settings, 1)
    before = fed._evaluate_holdout(fed.initial_weights, cfg)
    after = fed._evaluate_holdout(merged, cfg)
    # Assert: the global model carries the sites' affine weights, and the held-out result
    # (reported as the global model with held-out statistics) follows them
    assert all(np.allclose(merged[k], fed.initial_weights[k] + 3.0) for k in affine)
    assert after["norm-statistics"] == "held-out images (AdaBN)"
    key = lambda r: [(c["dice"], c["hd95"], c["nsd"]) for c in r["cases"]]  # noqa: E731
    assert key(before) != key(after)


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [11, 12]


class _SiteBRunsOutOfBudget(Federation):
    """Sites A and B; from round 2 on B refuses: its next round would exceed its budget."""

    def __init__(self, settings: RunSettings) -> None:
        super().__init__(_Grid(), settings, holdout_fn=lambda weights, cfg: None)  # type: ignore[arg-type]
        for node, name in ((11, "A"), (12, "B")):
            self.roster.sites[node] = SiteInfo(node, name, 4, 1, verified=True)
        self.final_round: int | None = None

    def _update_roster(self, connected: list[int], *, ask=None, now=False) -> None:
        pass

    def evaluate_final(self, weights, *, last_round=None) -> None:
        self.final_round = last_round

    def run_round(self, server_round, attempt, nodes, weights):
        names = {11: "A", 12: "B"}
        refuses = server_round >= 2
        record = {"round": server_round, "attempt": attempt, "sites": {}, "missing": []}
        record["rejected"] = (
            {"B": "PrivacyBudgetExhausted at site B: privacy budget exhausted"} if refuses else {}
        )
        updates = [
            SiteUpdate(names[n], self.shared_weights(weights), 4, {})
            for n in nodes
            if not (refuses and n == 12)
        ]
        return record, updates


def test_a_run_whose_sites_run_out_of_privacy_budget_stops_with_its_model(tmp_path):
    # Prepare: 3 rounds wanted, B may not train after round 1, min-sites 2
    settings = RunSettings(
        num_rounds=3, min_sites=2, retry_failed_rounds=2, out_dir=str(tmp_path), **SMALL
    )
    federation = _SiteBRunsOutOfBudget(settings)
    # Execute
    result = federation.run()
    # Assert: an ending, not a failure: round 1 is the final model, evaluated and reported
    assert (result.rounds_completed, federation.final_round) == (1, 1)
    assert result.stopped.startswith("privacy budget exhausted: only 1 of min-sites 2")
    assert federation.exhausted == {"B"}
    records = federation.log.read()
    assert records[-1] == {"round": 2, "status": "stopped", "reason": result.stopped}
    assert CheckpointStore(tmp_path).rounds() == [0, 1]


class _ManyNodes:
    def get_node_ids(self) -> list[int]:
        return list(range(1000, 2000))  # a thousand connected sites

    def get_nodes(self) -> list:
        return []


def _roster_reply(node: int) -> Message:
    record = {"name": f"S{node}", "num-train-cases": 4, "num-val-cases": 1}
    return flower_message(
        {"site": ConfigRecord(record)}, "query", src=node, dst=1, message_id=f"reply-{node}",
        reply_to="q", group_id="roster", ttl=60.0,
    )  # fmt: skip


class _SampledFederation(Federation):
    """1,000 connected nodes; records which of them the roster asks who they are."""

    def __init__(self, settings: RunSettings) -> None:
        super().__init__(_ManyNodes(), settings, holdout_fn=lambda weights, cfg: None)  # type: ignore[arg-type]
        self.queried: list[int] = []
        self.trained: list[list[int]] = []

    def _exchange(self, messages, timeout):
        self.queried += [m.metadata.dst_node_id for m in messages]
        return {m.metadata.dst_node_id: _roster_reply(m.metadata.dst_node_id) for m in messages}

    def evaluate_final(self, weights, *, last_round=None) -> None:
        pass

    def run_round(self, server_round, attempt, nodes, weights):
        self.trained.append(list(nodes))
        record = {"round": server_round, "attempt": attempt, "sites": {}, "rejected": {}}
        record["missing"] = []
        updates = [
            SiteUpdate(self.roster.name_of(n), self.shared_weights(weights), 4, {}) for n in nodes
        ]
        return record, updates


def test_with_sampling_only_the_sampled_sites_are_asked_who_they_are(tmp_path, task_identity):
    settings = RunSettings(num_rounds=2, sites_per_round=3, out_dir=str(tmp_path), **SMALL)
    federation = _SampledFederation(settings)

    federation.run()

    # start-up asks nobody; each round asks only the 3 sites it drew (not the 1,000)
    assert [len(nodes) for nodes in federation.trained] == [3, 3]
    drawn = {n for nodes in federation.trained for n in nodes}
    assert set(federation.queried) == drawn and len(federation.queried) == len(drawn)
    assert set(federation.sites) == drawn


class _AppsStartLate(Federation):
    """Two connected nodes whose apps start only after the first roster query timed out."""

    def __init__(self, settings: RunSettings) -> None:
        super().__init__(_Grid(), settings, holdout_fn=lambda weights, cfg: None)  # type: ignore[arg-type]
        self.asks = 0

    def _exchange(self, messages, timeout):
        self.asks += 1
        if self.asks == 1:  # the first query waits out the join deadline, unanswered
            time.sleep(self.settings.join_timeout + 0.1)
            return {}
        return {m.metadata.dst_node_id: _roster_reply(m.metadata.dst_node_id) for m in messages}


def test_nodes_unanswered_at_the_join_deadline_are_asked_once_more(tmp_path, caplog, task_identity):
    settings = RunSettings(min_sites=2, join_timeout=0.2, out_dir=str(tmp_path), **SMALL)
    federation = _AppsStartLate(settings)

    assert federation.wait_for_sites() == [11, 12]

    assert federation.asks == 2 and sorted(federation.roster.names().values()) == ["S11", "S12"]
    assert "join-timeout reached: asking 2 unnamed nodes once more" in caplog.text


def test_nodes_that_never_answer_fail_the_join_after_one_more_ask(tmp_path, task_identity):
    settings = RunSettings(min_sites=2, join_timeout=0.2, out_dir=str(tmp_path), **SMALL)
    federation = _AppsStartLate(settings)
    asks: list[int] = []
    federation._exchange = lambda messages, timeout: asks.append(len(messages)) or {}  # type: ignore[method-assign]

    with pytest.raises(FederationError, match=r"only 0 of min-sites 2 .* \(2 more did not say"):
        federation.wait_for_sites()

    # the first ask, then (the 2 s pause not yet over at the deadline) exactly one more
    assert asks == [2, 2]
