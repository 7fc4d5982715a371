"""The round loop's security steps: what the server adds to a train message, what a site checks
and sends back, the DP budget, and both audit logs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedmed.errors import ConfigError, FederationError
from fedmed.runsettings.settings import RunSettings
from fedmed.security.audit import verify_audit_log
from fedmed.security.dp import update_norm
from fedmed.security.guard import ServerGuard, SiteGuard
from fedmed.security.pki import write_pki
from fedmed.security.signing import SignatureError, arrays_digest

CONFIG = {"lr": 0.01, "server-round": 1, "model": "coplenet"}


@dataclass(frozen=True)
class Update:
    site: str
    arrays: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_pki(out, server_hosts=["localhost"], sites=["A"])
    return out


@pytest.fixture()
def sent() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 4), np.float32), "b": np.ones(4, np.float32)}


def _guard(tmp_path: Path, **kwargs: object) -> ServerGuard:
    settings = RunSettings(out_dir=str(tmp_path / "out"), **kwargs)
    return ServerGuard(settings, config_hash=settings.identity_hash())


def test_signed_message_verifies_at_a_site_with_the_ca(tmp_path, certs, sent) -> None:
    guard = _guard(tmp_path, signing_dir=str(certs))
    extras = guard.train_records(sent, CONFIG, server_round=1, attempt=1, sites=["A"])
    site = SiteGuard(site="A", ca_file=str(certs / "ca.pem"), audit_dir=None)

    status = site.check_global(sent, CONFIG, extras["signature"], server_round=1)

    assert status == "verified"
    assert "privacy" not in extras


def test_site_with_ca_refuses_unsigned_model_and_site_without_accepts(tmp_path, certs, sent):
    extras = _guard(tmp_path).train_records(sent, CONFIG, server_round=1, attempt=1, sites=[])
    strict = SiteGuard(site="A", ca_file=str(certs / "ca.pem"), audit_dir=None)
    lax = SiteGuard(site="A", ca_file=None, audit_dir=None)

    with pytest.raises(SignatureError, match="unsigned but this site requires signed models"):
        strict.check_global(sent, CONFIG, extras.get("signature"), server_round=1)
    assert lax.check_global(sent, CONFIG, extras.get("signature"), server_round=1) == "unsigned"


def test_node_config_or_environment_names_the_ca(tmp_path, certs, monkeypatch) -> None:
    monkeypatch.delenv("FEDMED_SERVER_CA", raising=False)
    assert SiteGuard.for_node({}, site="A", cache_dir="").verifier is None
    monkeypatch.setenv("FEDMED_SERVER_CA", str(certs / "ca.pem"))
    assert SiteGuard.for_node({}, site="A", cache_dir="").verifier is not None
    assert (
        SiteGuard.for_node({"server-ca": str(certs / "ca.pem")}, site="A", cache_dir="").audit
        is None
    )
    # an empty server-ca (require-signed-models = false) wins over the environment
    assert SiteGuard.for_node({"server-ca": ""}, site="A", cache_dir="").verifier is None


def test_site_applies_dp_and_audits_what_it_sent(tmp_path, sent) -> None:
    guard = _guard(tmp_path, dp_clip_norm=0.5, dp_noise_multiplier=0.0)
    extras = guard.train_records(sent, CONFIG, server_round=1, attempt=1, sites=["A"])
    site = SiteGuard(site="A", ca_file=None, audit_dir=str(tmp_path / "cache"))
    trained = {k: v + 10.0 for k, v in sent.items()}

    out = site.protect(
        trained,
        sent,
        extras["privacy"],
        server_round=1,
        signature_status="unsigned",
        num_examples=8,
    )

    assert update_norm({k: out[k] - sent[k] for k in sent}) == pytest.approx(0.5, rel=1e-5)
    line = json.loads((tmp_path / "cache" / "audit.jsonl").read_text())
    assert line["sent_sha256"] == arrays_digest(out)
    assert line["received_sha256"] == arrays_digest(sent)
    assert line["dp"]["dp-clip-norm"] == 0.5


def test_budget_beyond_num_rounds_is_refused_at_start(tmp_path) -> None:
    # replace-one (the default): sigma 2 spends what sigma 1 spends under add-remove
    with pytest.raises(
        ConfigError, match=r"\(replace-one\), above dp-max-epsilon 9\.5: run at most 3"
    ):
        _guard(
            tmp_path,
            num_rounds=5,
            dp_clip_norm=1.0,
            dp_noise_multiplier=2.0,
            dp_max_epsilon=9.5,
        )


def test_failed_attempts_spend_budget_and_resume_counts_them(tmp_path, sent) -> None:
    kwargs = {
        "num_rounds": 2,
        "dp_clip_norm": 1.0,
        "dp_noise_multiplier": 2.0,
        "dp_max_epsilon": 7.5,
    }
    guard = _guard(tmp_path, **kwargs)
    guard.start(first_round=1, num_rounds=2)
    guard.train_records(sent, CONFIG, server_round=1, attempt=1, sites=["A", "B"])
    guard.after_attempt({"round": 1, "attempt": 1, "status": "failed"}, [])
    first = guard.privacy_spent()

    resumed = _guard(tmp_path, **kwargs)  # a restarted server reads the releases back
    resumed.train_records(sent, CONFIG, server_round=1, attempt=2, sites=["A", "B"])

    assert first is not None and first["epsilon"] == pytest.approx(4.7285, abs=1e-4)
    assert first["adjacency"] == "replace-one"
    assert first["epsilon-add-remove"] == pytest.approx(2.1657, abs=1e-4)
    assert resumed.releases == 2
    with pytest.raises(FederationError, match=r"would spend epsilon 9\.01 > dp-max-epsilon 7\.5"):
        resumed.train_records(sent, CONFIG, server_round=2, attempt=1, sites=["A", "B"])


@dataclass(frozen=True)
class DpSettings:
    """The settings ServerGuard reads, with the dp-mode keys RunSettings gains later."""

    out_path: Path
    num_rounds: int = 3
    signing_dir: str = ""
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0
    dp_mode: str = ""
    dp_adjacency: str = ""
    dp_patients_per_step: float = 8.0


def test_record_mode_leaves_accounting_to_the_sites_and_sends_updates_as_trained(
    tmp_path, sent
) -> None:
    # Prepare: a budget the server could not check for record mode (each site's own)
    settings = DpSettings(tmp_path / "out", num_rounds=50, dp_mode="record", dp_max_epsilon=1.0)
    guard = ServerGuard(settings, config_hash="h")
    site = SiteGuard(site="A", ca_file=None, audit_dir=None)
    trained = {k: v + 10.0 for k, v in sent.items()}

    # Execute
    extras = guard.train_records(sent, CONFIG, server_round=1, attempt=1, sites=["A"])
    out = site.protect(
        trained,
        sent,
        extras["privacy"],
        server_round=1,
        signature_status="unsigned",
        num_examples=8,
    )

    # Assert
    assert extras["privacy"]["dp-mode"] == "record"
    assert extras["privacy"]["dp-patients-per-step"] == 8.0
    spent = guard.privacy_spent()
    assert spent is not None and spent["mode"] == "record" and spent["epsilon"] is None
    for key in sent:  # DP-SGD's output is private already: not clipped or noised again
        np.testing.assert_array_equal(out[key], trained[key])


def test_secure_round_asks_each_site_for_its_share_of_the_noise(tmp_path, sent) -> None:
    guard = ServerGuard(DpSettings(tmp_path / "out"), config_hash="h")
    sites = ["A", "B", "C", "D", "E"]

    secure = guard.train_records(
        sent, CONFIG, server_round=1, attempt=1, sites=sites, secure_min_sites=4
    )
    plain = guard.train_records(sent, CONFIG, server_round=2, attempt=1, sites=sites)

    assert (secure["privacy"]["dp-secure-sites"], secure["privacy"]["dp-min-secure-sites"]) == (
        5,
        4,
    )
    assert plain["privacy"]["dp-secure-sites"] == 0


def test_dp_mode_off_with_a_clip_norm_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'dp-clip-norm' is 1 but DP is off"):
        ServerGuard(DpSettings(tmp_path / "out", dp_mode="off"), config_hash="h")


def test_server_audit_records_rounds_and_hashes(tmp_path, certs, sent) -> None:
    guard = _guard(tmp_path)
    guard.start(first_round=1, num_rounds=3)
    guard.train_records(sent, CONFIG, server_round=1, attempt=1, sites=["B", "A"])
    reply = {k: v + 1 for k, v in sent.items()}
    guard.after_attempt(
        {"round": 1, "attempt": 1, "status": "ok", "missing": ["C"]}, [Update("A", reply)]
    )

    path = tmp_path / "out" / "audit.jsonl"
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    assert verify_audit_log(path) == 3
    assert [e["event"] for e in entries] == ["start", "send", "round"]
    assert entries[0]["config_sha256"] == guard.config_hash
    assert entries[1]["sites"] == ["A", "B"]
    assert entries[2]["received_sha256"] == {"A": arrays_digest(reply)}
    assert entries[2]["global_sent_sha256"] == arrays_digest(sent)
    assert entries[2]["missing"] == ["C"]
