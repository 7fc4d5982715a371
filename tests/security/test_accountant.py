"""A site's privacy ledger: epsilon composed over rounds and runs as dp_accounting computes it,
persistence in the cache-dir, budgets, and the per-round record anyone can recompute."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from fedmed.errors import DataError, FederationError
from fedmed.security.accountant import (
    LEDGER_FILE,
    LedgerEntry,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    may_train,
    recompute_epsilon,
    record_epsilon,
    round_record,
)

DELTA = 1e-5


def _poisson_reference(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    accountant = RdpAccountant()
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return accountant.get_epsilon(delta)


def _record(run: str, round_: int, steps: int = 50, q: float = 0.08) -> LedgerEntry:
    return LedgerEntry(
        run=run, round=round_, mode="record", noise_multiplier=1.0, sample_rate=q, steps=steps
    )


def test_record_epsilon_is_dp_accountings_poisson_subsampled_gaussian() -> None:
    ours = record_epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=10_000, delta=DELTA)

    assert ours == pytest.approx(_poisson_reference(0.01, 1.1, 10_000), rel=1e-9)
    assert record_epsilon(sample_rate=0.5, noise_multiplier=0.0, steps=3, delta=DELTA) == math.inf


def test_ledger_composes_rounds_and_runs_and_separates_a_run() -> None:
    ledger = PrivacyLedger([_record("1", 1), _record("1", 2), _record("2", 1)])

    assert ledger.epsilon(delta=DELTA) == pytest.approx(_poisson_reference(0.08, 1.0, 150))
    assert ledger.epsilon(delta=DELTA, run="1") == pytest.approx(_poisson_reference(0.08, 1.0, 100))
    assert ledger.epsilon_if(_record("2", 2), delta=DELTA, run="2") == pytest.approx(
        _poisson_reference(0.08, 1.0, 100)
    )
    assert len(ledger.entries) == 3  # epsilon_if does not record


def test_site_rounds_count_per_patient_as_replace_one_and_no_dp_as_infinite() -> None:
    site = LedgerEntry(run="1", round=1, mode="site", noise_multiplier=1.1)
    reference = RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(0.55), 10)

    ledger = PrivacyLedger([site] * 10)

    assert ledger.epsilon(delta=DELTA) == pytest.approx(reference.get_epsilon(DELTA))
    ledger.add(LedgerEntry(run="2", round=1, mode="off"))
    assert ledger.epsilon(delta=DELTA) == math.inf
    assert PrivacyLedger().epsilon(delta=DELTA) == 0.0


def test_ledger_survives_save_and_load(tmp_path) -> None:
    path = tmp_path / "cache" / LEDGER_FILE
    ledger = PrivacyLedger([_record("7", 1), LedgerEntry(run="7", round=2, mode="site")])

    ledger.save(path)
    again = PrivacyLedger.load(path)

    assert again.entries == ledger.entries
    assert PrivacyLedger.load(tmp_path / "absent.json").entries == []
    assert [p.name for p in path.parent.iterdir()] == [LEDGER_FILE]  # no temporary left


@pytest.mark.parametrize(
    "text",
    ["{not json", json.dumps({"version": 9, "entries": []}), json.dumps({"version": 1})],
    ids=["garbage", "version", "no-entries"],
)
def test_damaged_ledger_is_an_error_never_a_fresh_budget(tmp_path, text) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text(text)

    with pytest.raises(DataError, match="deleting it would forget the privacy"):
        PrivacyLedger.load(path)


def test_entry_values_are_checked() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        LedgerEntry(run="1", round=1, mode="record", noise_multiplier=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="ledger mode"):
        LedgerEntry(run="1", round=1, mode="central")


@pytest.mark.parametrize(
    ("site_budget", "run_budget", "spent", "run_spent", "allowed", "match"),
    [
        (0.0, 0.0, 50.0, 50.0, True, ""),
        (8.0, 0.0, 7.9, 7.9, True, ""),
        (8.0, 0.0, 8.1, 1.0, False, "above its max-epsilon 8"),
        (8.0, 20.0, 8.1, 1.0, False, "above its max-epsilon 8"),  # the run cannot raise it
        (8.0, 3.0, 5.0, 3.5, False, "above the run's dp-max-epsilon 3"),
        (0.0, 3.0, 9.0, 2.9, True, ""),  # earlier runs do not count against this run's budget
        (8.0, 0.0, math.inf, math.inf, False, "to inf"),  # a round without DP
    ],
    ids=["no-budgets", "fits", "site", "site-wins", "run-asks-less", "run-scoped", "no-dp"],
)
def test_may_train_applies_site_budget_over_history_and_run_budget_to_the_run(
    site_budget, run_budget, spent, run_spent, allowed, match
) -> None:
    ok, reason = may_train(
        site_budget=site_budget,
        run_budget=run_budget,
        spent_after_next=spent,
        run_spent_after_next=run_spent,
    )

    assert ok is allowed
    assert (match in reason) if match else reason == ""
    assert ok or reason.startswith("privacy budget exhausted")


def test_round_record_is_recomputable_with_dp_accounting() -> None:
    # Prepare: an earlier run and two rounds of this one
    ledger = PrivacyLedger([_record("old", 1, steps=30), _record("9", 1), _record("9", 2)])

    # Execute
    record = round_record(ledger, run="9", delta=DELTA, adjacency="add-remove")

    # Assert: from the record's own fields, independently of fedmed's code
    reference = _poisson_reference(
        record["dp-sample-rate"], record["dp-noise-multiplier"], record["dp-steps"]
    )
    assert record["dp-mode"] == "record" and record["dp-adjacency"] == "add-remove"
    assert record["dp-steps"] == 100
    assert record["dp-epsilon"] == pytest.approx(reference, rel=1e-9)
    assert record["dp-epsilon-total"] == pytest.approx(_poisson_reference(0.08, 1.0, 130))
    assert recompute_epsilon(record) == pytest.approx(record["dp-epsilon"], rel=1e-12)


@pytest.mark.parametrize(("adjacency", "multiplier"), [("replace-one", 0.55), ("add-remove", 1.1)])
def test_site_mode_record_states_its_adjacency(adjacency: str, multiplier: float) -> None:
    ledger = PrivacyLedger(
        LedgerEntry(run="3", round=r, mode="site", noise_multiplier=1.1) for r in range(1, 11)
    )
    reference = RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(multiplier), 10)

    record = round_record(ledger, run="3", delta=DELTA, adjacency=adjacency)

    assert (record["dp-adjacency"], record["dp-steps"], record["dp-sample-rate"]) == (
        adjacency,
        10,
        1.0,
    )
    assert record["dp-epsilon"] == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    assert recompute_epsilon(record) == pytest.approx(record["dp-epsilon"], rel=1e-12)


def test_a_refusal_is_a_federation_error_with_its_own_name() -> None:
    ok, reason = may_train(
        site_budget=1.0, run_budget=0.0, spent_after_next=2.0, run_spent_after_next=2.0
    )

    with pytest.raises(FederationError, match="privacy budget exhausted") as info:
        raise PrivacyBudgetExhausted(reason)
    assert not ok and type(info.value).__name__ == "PrivacyBudgetExhausted"
    assert info.value.exit_code == 6
