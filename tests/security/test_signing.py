"""Signed global models and checkpoints: the server's key signs, the federation's CA vouches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedmed.server.checkpoint import CheckpointStore

from fedmed.errors import SecurityError
from fedmed.security.chain import SIGNATURE_FILE, sign_checkpoint, verify_checkpoints
from fedmed.security.pki import write_pki
from fedmed.security.signing import (
    SignatureError,
    Signer,
    Verifier,
    arrays_digest,
    certificate_fingerprint,
    sign_global,
    verify_global,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_pki(out, server_hosts=["localhost"], sites=["A"])
    return out


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("other")
    write_pki(out, server_hosts=["localhost"], sites=["A"])
    return out


@pytest.fixture()
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(4, 3)).astype(np.float32), "n": np.array([3])}


CONFIG = {"lr": 0.001, "server-round": 2}


def test_arrays_digest_depends_on_values_dtype_shape_and_keys(arrays) -> None:
    base = arrays_digest(arrays)
    changed = dict(arrays, **{"conv.weight": arrays["conv.weight"].copy()})
    changed["conv.weight"][0, 0] += 1e-3

    assert arrays_digest(dict(arrays)) == base
    assert arrays_digest(changed) != base
    assert arrays_digest({**arrays, "n": arrays["n"].astype(np.int32)}) != base
    assert arrays_digest({**arrays, "conv.weight": arrays["conv.weight"].reshape(3, 4)}) != base
    assert arrays_digest({"x" + k: v for k, v in arrays.items()}) != base


def test_signed_global_model_verifies_at_a_site_holding_the_ca(certs, arrays) -> None:
    signed = sign_global(arrays, CONFIG, server_round=2, signer=Signer.from_dir(certs))

    verify_global(
        arrays, CONFIG, signed, server_round=2, verifier=Verifier.from_ca_file(certs / "ca.pem")
    )


def test_site_refuses_altered_weights(certs, arrays) -> None:
    signed = sign_global(arrays, CONFIG, server_round=2, signer=Signer.from_dir(certs))
    tampered = {**arrays, "conv.weight": arrays["conv.weight"] + 1e-6}

    with pytest.raises(SignatureError, match="round 2: signed arrays-sha256"):
        verify_global(
            tampered,
            CONFIG,
            signed,
            server_round=2,
            verifier=Verifier.from_ca_file(certs / "ca.pem"),
        )


def test_site_refuses_replayed_round_and_changed_config(certs, arrays) -> None:
    signed = sign_global(arrays, CONFIG, server_round=2, signer=Signer.from_dir(certs))
    verifier = Verifier.from_ca_file(certs / "ca.pem")

    with pytest.raises(SignatureError, match="signed round is 2"):
        verify_global(arrays, CONFIG, signed, server_round=3, verifier=verifier)
    with pytest.raises(SignatureError, match="config-sha256"):
        verify_global(arrays, {**CONFIG, "lr": 1.0}, signed, server_round=2, verifier=verifier)


def test_site_refuses_unsigned_and_forged_signatures(certs, arrays) -> None:
    verifier = Verifier.from_ca_file(certs / "ca.pem")
    signed = sign_global(arrays, CONFIG, server_round=2, signer=Signer.from_dir(certs))
    forged = dict(signed, signature=signed["signature"][:-8] + "AAAAAAA=")

    with pytest.raises(SignatureError, match="unsigned"):
        verify_global(arrays, CONFIG, None, server_round=2, verifier=verifier)
    with pytest.raises(SignatureError, match=r"malformed|does not match its content"):
        verify_global(arrays, CONFIG, forged, server_round=2, verifier=verifier)


def test_site_refuses_a_certificate_from_another_ca(certs, other_certs, arrays) -> None:
    signed = sign_global(arrays, CONFIG, server_round=1, signer=Signer.from_dir(other_certs))

    with pytest.raises(SignatureError, match="CA did not issue"):
        verify_global(
            arrays, CONFIG, signed, server_round=1, verifier=Verifier.from_ca_file(certs / "ca.pem")
        )


def test_signer_refuses_key_of_another_certificate(certs, other_certs) -> None:
    with pytest.raises(SecurityError, match="does not belong to certificate"):
        Signer.from_files(certs / "server.key", other_certs / "server.pem")
    with pytest.raises(SecurityError, match="cannot be read"):
        Signer.from_files(certs / "missing.key", certs / "server.pem")


def test_signer_repr_hides_the_key(certs) -> None:
    assert "PRIVATE" not in repr(Signer.from_dir(certs))


def _run(root: Path, certs: Path, rounds: int = 3) -> CheckpointStore:
    store = CheckpointStore(root)
    signer = Signer.from_dir(certs)
    for r in range(rounds):
        ckpt = store.save(
            r, {"w": np.full(3, r, np.float32)}, metrics={"round": r}, config_hash="c"
        )
        sign_checkpoint(ckpt.path, signer)
    return store


def test_signed_checkpoint_chain_verifies(tmp_path, certs) -> None:
    store = _run(tmp_path, certs)

    rounds, signed = verify_checkpoints(
        store.root, verifier=Verifier.from_ca_file(certs / "ca.pem"), require_signatures=True
    )

    assert rounds == [0, 1, 2]
    assert signed == [0, 1, 2]


def test_edited_metadata_breaks_the_signature_of_that_round(tmp_path, certs) -> None:
    store = _run(tmp_path, certs)
    meta_path = store.round_dir(1) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"]["round"] = 99
    meta_path.write_text(json.dumps(meta))

    with pytest.raises(SignatureError, match=r"first broken link: round 1 .*does not cover"):
        verify_checkpoints(store.root)


def test_replaced_weights_with_rehashed_meta_are_caught(tmp_path, certs) -> None:
    # An attacker rewrites round 2's weights and fixes meta.json's hash: the signature fails.
    store = _run(tmp_path, certs)
    store2 = CheckpointStore(tmp_path / "evil")
    evil = store2.save(0, {"w": np.full(3, 7, np.float32)}, metrics={}, config_hash="c")
    folder = store.round_dir(2)
    (folder / "weights.safetensors").write_bytes((evil.path / "weights.safetensors").read_bytes())
    meta = json.loads((folder / "meta.json").read_text())
    meta["weights_sha256"] = evil.hash
    (folder / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(SignatureError, match=r"round 2 .*does not cover"):
        verify_checkpoints(store.root)


def test_broken_parent_link_and_missing_round_are_named(tmp_path, certs) -> None:
    store = _run(tmp_path, certs)
    (store.round_dir(1) / "weights.safetensors").write_bytes(b"garbage")

    with pytest.raises(SignatureError, match=r"round 1 .*weights\.safetensors does not match"):
        verify_checkpoints(store.root)

    (store.round_dir(1) / "meta.json").unlink()
    import shutil

    shutil.rmtree(store.round_dir(1))
    with pytest.raises(SignatureError, match="round 1 is missing"):
        verify_checkpoints(store.root)


def test_unsigned_checkpoints_pass_unless_signatures_are_required(tmp_path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(0, {"w": np.zeros(2, np.float32)}, metrics={}, config_hash="c")

    assert verify_checkpoints(store.root) == ([0], [])
    with pytest.raises(SignatureError, match=f"{SIGNATURE_FILE} is missing"):
        verify_checkpoints(store.root, require_signatures=True)


def test_signer_records_its_certificate_and_ca_for_later_checks(certs) -> None:
    signer = Signer.from_dir(certs)

    record = signer.trust_record()

    assert record["ca_cert"] == (certs / "ca.pem").read_text()
    assert record["signing_cert"] == (certs / "server.pem").read_text()
    assert record["ca_sha256"] == certificate_fingerprint((certs / "ca.pem").read_bytes())
    Verifier.from_ca_pem(record["ca_cert"], what="test").check_certificate(
        record["signing_cert"], what="test"
    )


def test_signer_refuses_a_ca_that_did_not_issue_its_certificate(tmp_path, certs, other_certs):
    for name in ("server.key", "server.pem"):
        (tmp_path / name).write_bytes((certs / name).read_bytes())
    (tmp_path / "ca.pem").write_bytes((other_certs / "ca.pem").read_bytes())

    with pytest.raises(SecurityError, match=r"server\.pem was not issued by .*ca\.pem"):
        Signer.from_dir(tmp_path)
