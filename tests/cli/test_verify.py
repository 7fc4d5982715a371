"""fedmed verify: checks a run's checkpoint chain, signatures (required whenever a CA is known),
pointers and audit log; exit code 7."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore

from fedmed.cli.main import main as fedmed_main
from fedmed.security.audit import AuditLog
from fedmed.security.chain import sign_checkpoint
from fedmed.security.pki import write_pki
from fedmed.security.signing import Signer


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_pki(out, server_hosts=["localhost"], sites=["A"])
    return out


@pytest.fixture()
def run_dir(tmp_path: Path, certs: Path) -> Path:
    store = CheckpointStore(tmp_path)
    audit = AuditLog(tmp_path / "audit.jsonl")
    signer = Signer.from_dir(certs)
    for r in range(3):
        ckpt = store.save(r, {"w": np.full(2, r, np.float32)}, metrics={}, config_hash="c")
        sign_checkpoint(ckpt.path, signer)
        audit.append("round", round=r, global_sha256=ckpt.hash)
    return tmp_path


def test_intact_run_passes(run_dir, certs, capsys) -> None:
    code = fedmed_main(
        ["verify", str(run_dir), "--ca", str(certs / "ca.pem"), "--require-signatures"]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "rounds 0..2 chained, 3 signed (signer checked against the CA)" in out
    assert "3 lines, chain intact" in out


def test_tampered_checkpoint_names_the_round(run_dir, capsys) -> None:
    meta = run_dir / "checkpoints" / "round-0001" / "meta.json"
    meta.write_text(meta.read_text().replace('"config_hash": "c"', '"config_hash": "d"'))

    code = fedmed_main(["verify", str(run_dir / "checkpoints")])

    assert code == 7
    assert "first broken link: round 1" in capsys.readouterr().err


def test_tampered_audit_line_names_the_line(run_dir, capsys) -> None:
    path = run_dir / "audit.jsonl"
    lines = path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["round"] = 5
    lines[0] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")

    code = fedmed_main(["verify", str(path)])

    assert code == 7
    assert "line 2 does not chain to line 1: line 1 was altered" in capsys.readouterr().err


def test_folder_without_run_is_refused(tmp_path, capsys) -> None:
    assert fedmed_main(["verify", str(tmp_path)]) == 7
    assert "holds no checkpoints/" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("other")
    write_pki(out, server_hosts=["localhost"], sites=[])
    return out


def _guarded_run(out: Path, certs: Path | None, rounds: int = 3) -> Path:
    """A run written as the server writes it: ServerGuard's audit lines, scored checkpoints,
    signed (with the CA recorded in the audit start line) when ``certs`` is given."""
    from fedmed.runsettings.settings import RunSettings
    from fedmed.security.guard import ServerGuard

    settings = RunSettings(out_dir=str(out), signing_dir=str(certs) if certs else "")
    guard = ServerGuard(settings, config_hash=settings.identity_hash())
    store = CheckpointStore(out)
    guard.start(first_round=1, num_rounds=rounds - 1)
    for r in range(rounds):
        weights = {"w": np.full(2, r, np.float32)}
        if r:
            guard.train_records(weights, {}, server_round=r, attempt=1, sites=["A"])
        ckpt = store.save(r, weights, metrics={}, config_hash="c", score=[0.1, 0.7, 0.4][r % 3])
        guard.after_attempt({"round": r, "attempt": 1, "status": "ok"}, [], ckpt)
    return out


def _verify(*args: str | Path) -> int:
    return fedmed_main(["verify", *(str(a) for a in args)])


def test_truncated_audit_log_is_caught_by_the_signed_checkpoints(tmp_path, certs, capsys) -> None:
    # Prepare: a run whose checkpoints were signed by the server guard (with audit links)
    _guarded_run(tmp_path, certs)
    assert _verify(tmp_path, "--require-signatures") == 0
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join(audit.read_text().splitlines()[:-2]) + "\n")  # cut round 2

    # Execute
    code = _verify(tmp_path)

    # Assert
    assert code == 7
    assert "round 2" in (err := capsys.readouterr().err)
    assert "not in the audit log: the log was truncated or altered" in err


def test_a_signed_run_verifies_without_ca_against_the_ca_it_recorded(tmp_path, certs, capsys):
    _guarded_run(tmp_path, certs)

    code = _verify(tmp_path)

    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 signed (signer checked against the CA recorded in the run folder), 0 unsigned" in out
    assert "trust anchor: the CA recorded in the run's own audit log" in out
    assert "whoever can rewrite this folder can rewrite that record too" in out
    assert "latest.json -> round 2, best.json -> round 1" in out
    assert "audit log records 3 checkpoint(s), all present with their hashes" in out


def test_a_deleted_last_round_fails_while_pointers_and_audit_name_it(tmp_path, certs, capsys):
    _guarded_run(tmp_path, certs)
    shutil.rmtree(tmp_path / "checkpoints" / "round-0002")

    code = _verify(tmp_path, "--ca", certs / "ca.pem")

    assert code == 7
    err = capsys.readouterr().err
    assert "latest.json names round 2" in err
    assert "round 2 does not exist: the last checkpoint was deleted" in err
    # the pointer fixed as well: the audit log still names round 2
    latest = tmp_path / "checkpoints" / "latest.json"
    one = json.loads((tmp_path / "checkpoints" / "round-0001" / "meta.json").read_text())
    latest.write_text(json.dumps({"round": 1, "hash": one["weights_sha256"], "score": 0.7}))
    assert _verify(tmp_path, "--ca", certs / "ca.pem") == 7
    assert "records checkpoint round 2" in capsys.readouterr().err


def test_a_chain_re_signed_by_another_key_fails_without_ca(tmp_path, certs, other_certs, capsys):
    # Prepare: an attacker replaces round 2 and re-signs every round with their own key
    _guarded_run(tmp_path, certs)
    folder = tmp_path / "checkpoints" / "round-0002"
    meta = json.loads((folder / "meta.json").read_text())
    meta["metrics"] = {"evil": 1}
    (folder / "meta.json").write_text(json.dumps(meta))
    attacker = Signer.from_dir(other_certs)
    for round_dir in sorted((tmp_path / "checkpoints").glob("round-*")):
        sign_checkpoint(round_dir, attacker)

    # Execute
    code = _verify(tmp_path)

    # Assert: the CA the run recorded at start did not issue the attacker's certificate
    assert code == 7
    assert "that the federation's CA did not issue" in capsys.readouterr().err


def test_a_chain_stripped_of_signatures_fails_unless_unsigned_is_allowed(tmp_path, certs, capsys):
    _guarded_run(tmp_path, certs)
    for sig in (tmp_path / "checkpoints").glob("round-*/signature.json"):
        sig.unlink()

    assert _verify(tmp_path) == 7
    assert "round 0" in (err := capsys.readouterr().err)
    assert "signature.json is missing (unsigned checkpoint)" in err
    assert _verify(tmp_path, "--allow-unsigned") == 0
    assert "WARNING: 3 unsigned round(s) accepted (--allow-unsigned)" in capsys.readouterr().out


def test_a_given_ca_requires_signatures_and_contradicting_flags_are_refused(
    tmp_path, certs, capsys
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(2, np.float32)}, metrics={}, config_hash="c")

    assert _verify(tmp_path, "--ca", certs / "ca.pem") == 7
    assert "unsigned checkpoint" in capsys.readouterr().err
    assert _verify(tmp_path) == 0  # nothing known: reported, not required
    assert "trust anchor: none" in capsys.readouterr().out
    assert _verify(tmp_path, "--allow-unsigned", "--require-signatures") == 3


def test_an_unsigned_run_with_a_replaced_checkpoint_fails_on_the_audit_log(tmp_path, capsys):
    # Prepare: no signing; the attacker replaces round 2 and fixes meta.json and latest.json
    _guarded_run(tmp_path, None)
    store = CheckpointStore(tmp_path)
    folder = store.round_dir(2)
    evil = CheckpointStore(tmp_path / "scratch").save(
        0, {"w": np.full(2, 9, np.float32)}, metrics={}, config_hash="c"
    )
    (folder / "weights.safetensors").write_bytes((evil.path / "weights.safetensors").read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    meta["weights_sha256"] = evil.hash
    (folder / "meta.json").write_text(json.dumps(meta))
    latest = store.root / "latest.json"
    latest.write_text(json.dumps({"round": 2, "hash": evil.hash, "score": 0.4}))

    # Execute
    code = _verify(tmp_path)

    # Assert
    assert code == 7
    assert "records checkpoint round 2 with sha256" in capsys.readouterr().err


def test_a_redirected_best_pointer_fails(tmp_path, certs, capsys) -> None:
    _guarded_run(tmp_path, certs)
    zero = json.loads((tmp_path / "checkpoints" / "round-0000" / "meta.json").read_text())
    best = tmp_path / "checkpoints" / "best.json"
    best.write_text(json.dumps({"round": 0, "hash": zero["weights_sha256"], "score": 0.9}))

    assert _verify(tmp_path, "--ca", certs / "ca.pem") == 7
    assert "the best scored checkpoint is round 1" in capsys.readouterr().err


def test_a_run_resumed_after_deleting_its_last_round_verifies(tmp_path, certs, capsys) -> None:
    # Prepare: the documented recovery: delete the last round's folder, restart the server
    from fedmed.runsettings.settings import RunSettings
    from fedmed.security.guard import ServerGuard

    _guarded_run(tmp_path, certs)
    shutil.rmtree(tmp_path / "checkpoints" / "round-0002")
    settings = RunSettings(out_dir=str(tmp_path), signing_dir=str(certs))
    guard = ServerGuard(settings, config_hash=settings.identity_hash())
    store = CheckpointStore(tmp_path)
    assert store.load_latest(signed_by=guard.signer).round == 1

    # Execute: round 2 again, as the resumed server does it
    guard.start(first_round=2, num_rounds=2)
    weights = {"w": np.full(2, 5, np.float32)}
    guard.train_records(weights, {}, server_round=2, attempt=1, sites=["A"])
    ckpt = store.save(2, weights, metrics={}, config_hash="c", score=0.2)
    guard.after_attempt({"round": 2, "attempt": 1, "status": "ok"}, [], ckpt)

    # Assert
    assert _verify(tmp_path, "--ca", certs / "ca.pem") == 0, capsys.readouterr().err
    assert "latest.json -> round 2, best.json -> round 1" in capsys.readouterr().out
