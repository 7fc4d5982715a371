"""fedmed verify: checks a run's checkpoint chain, signatures and audit log; exit code 7."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore

from fedmed.cli.main import main as fedmed_main
from fedmed.security.audit import AuditLog
from fedmed.security.pki import write_pki
from fedmed.security.signing import Signer, sign_checkpoint


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


def test_truncated_audit_log_is_caught_by_the_signed_checkpoints(tmp_path, certs, capsys) -> None:
    # Prepare: a run whose checkpoints were signed by the server guard (with audit links)
    from fedmed.server.settings import RunSettings

    from fedmed.security.guard import ServerGuard

    settings = RunSettings(out_dir=str(tmp_path), signing_dir=str(certs))
    guard = ServerGuard(settings, config_hash=settings.identity_hash())
    store = CheckpointStore(tmp_path)
    guard.start(first_round=1, num_rounds=2)
    for r in range(3):
        weights = {"w": np.full(2, r, np.float32)}
        if r:
            guard.train_records(weights, {}, server_round=r, attempt=1, sites=["A"])
        ckpt = store.save(r, weights, metrics={}, config_hash="c")
        guard.after_attempt({"round": r, "attempt": 1, "status": "ok"}, [], ckpt)
    assert fedmed_main(["verify", str(tmp_path), "--require-signatures"]) == 0
    audit = tmp_path / "audit.jsonl"
    audit.write_text("\n".join(audit.read_text().splitlines()[:-2]) + "\n")  # cut round 2

    # Execute
    code = fedmed_main(["verify", str(tmp_path)])

    # Assert
    assert code == 7
    assert "round 2" in (err := capsys.readouterr().err)
    assert "not in the audit log: the log was truncated or altered" in err
