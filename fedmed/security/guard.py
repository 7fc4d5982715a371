"""The security steps of a round, one object per side, so the round loop calls a line each.

:class:`ServerGuard` (the server's round loop):

- at start, refuses a site-level DP run whose ``num-rounds`` alone would spend more than
  ``dp-max-epsilon`` and writes an audit ``start`` line (config hash, DP settings, the signing
  certificate and its CA, which ``fedmed verify`` falls back on without ``--ca``);
- per train attempt, :meth:`ServerGuard.train_records` gives the extra ConfigRecords of the
  train message (``signature`` when ``signing-dir`` is set, ``privacy`` when DP is on) and
  writes an audit ``send`` line; in site mode each attempt counts as one DP release (sites
  noised and sent an update even when the round later fails), counted again from the audit log
  on resume. In record mode each site accounts for itself (its ledger, see
  :mod:`fedmed.security.accountant`) and reports its epsilon in its metrics;
- per attempt result, :meth:`ServerGuard.after_attempt` writes an audit ``round`` line (sites,
  hashes of every reply, of the new global model) and signs the round's checkpoint.

:class:`SiteGuard` (a site's train handler): checks the global model's signature (refusing an
unsigned or altered model when the site has the federation CA: node config ``server-ca`` or
environment ``FEDMED_SERVER_CA``), applies site-level DP to the reply (record mode: the update
is private already, from DP-SGD) and writes the site's audit line (``<cache-dir>/audit.jsonl``).

Insecure/simulation mode: with no ``signing-dir`` the server sends unsigned models and warns
once; a site without ``server-ca`` accepts them (and checks a signature, if one comes, only
against the certificate it carries), logging that models are not authenticated.

Example:
    >>> guard = ServerGuard(settings, config_hash=settings.identity_hash())
    >>> extras = guard.train_records(sent, cfg.to_config(), server_round=1, sites=["A", "B"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedmed.errors import ConfigError, FederationError

from .audit import AUDIT_FILE, AuditLog
from .chain import sign_checkpoint
from .dp import DpParams, privatize
from .signing import Signer, Verifier, arrays_digest, sign_global, verify_global

__all__ = ["CA_ENV_VAR", "ServerGuard", "SiteGuard", "dp_params"]

logger = logging.getLogger(__name__)

CA_ENV_VAR = "FEDMED_SERVER_CA"
_WARNED: set[str] = set()


class _Settings(Protocol):
    out_path: Path
    num_rounds: int
    signing_dir: str
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_delta: float
    dp_max_epsilon: float
    # also read when present (defaults otherwise): dp_mode, dp_adjacency, dp_patients_per_step


class _Update(Protocol):
    site: str
    arrays: Mapping[str, np.ndarray]


class _Checkpoint(Protocol):
    round: int
    path: Path
    hash: str


def dp_params(settings: _Settings) -> DpParams:
    """The federation's DP settings (``dp-*`` run-config keys), checked together.

    ``dp-mode`` ``record`` | ``site`` | ``off``; unset (``""``), ``dp-clip-norm > 0`` means
    ``site`` as before modes existed. ConfigError for contradictions (DP off with a clip norm,
    a mode without a clip norm, record mode without noise, record mode with replace-one).
    """
    return DpParams(
        clip_norm=settings.dp_clip_norm,
        noise_multiplier=settings.dp_noise_multiplier,
        delta=settings.dp_delta,
        max_epsilon=settings.dp_max_epsilon,
        mode=getattr(settings, "dp_mode", ""),
        adjacency=getattr(settings, "dp_adjacency", ""),
        patients_per_step=getattr(settings, "dp_patients_per_step", 8.0),
    )


def _json_epsilon(value: float) -> float | None:
    return None if value == float("inf") else round(value, 6)


class ServerGuard:
    """Signing, DP accounting and the audit log of the server's round loop."""

    def __init__(self, settings: _Settings, *, config_hash: str) -> None:
        self.dp = dp_params(settings)
        self.config_hash = config_hash
        self.signer = Signer.from_dir(settings.signing_dir) if settings.signing_dir else None
        self.audit = AuditLog(settings.out_path / AUDIT_FILE)
        self.releases = _count_events(self.audit.path, "send")
        self._sent_digest = ""
        if self.dp.mode == "site" and self.dp.max_epsilon > 0:
            planned = self.dp.epsilon(settings.num_rounds)
            if planned > self.dp.max_epsilon:
                fit = max(
                    (
                        r
                        for r in range(settings.num_rounds + 1)
                        if self.dp.epsilon(r) <= self.dp.max_epsilon
                    ),
                    default=0,
                )
                raise ConfigError(
                    f"num-rounds {settings.num_rounds} with dp-noise-multiplier "
                    f"{self.dp.noise_multiplier} spends epsilon {planned:.3g} at delta "
                    f"{self.dp.delta:g} ({self.dp.adjacency}), above dp-max-epsilon "
                    f"{self.dp.max_epsilon:g}: run at most {fit} rounds or raise the noise "
                    "multiplier"
                )
        if self.signer is None:
            logger.warning(
                "signing-dir is not set: global models and checkpoints are NOT signed; sites "
                "with server-ca set (fedmed-client with TLS, unless require-signed-models = "
                "false) will refuse them: set [app] signing-dir to the folder of server.key + "
                "server.pem"
            )
        if self.dp.mode == "site" and self.dp.noise_multiplier == 0:
            logger.warning("dp-clip-norm without dp-noise-multiplier: updates are clipped, no DP")

    def start(self, *, first_round: int, num_rounds: int) -> None:
        """Audit line for a (re)started run."""
        self.audit.append(
            "start",
            config_sha256=self.config_hash,
            first_round=first_round,
            num_rounds=num_rounds,
            **(self.signer.trust_record() if self.signer else {"signing_cert_sha256": None}),
            dp=self.dp.to_record() if self.dp.enabled else None,
            releases_so_far=self.releases,
        )

    def train_records(
        self,
        sent: Mapping[str, np.ndarray],
        config: Mapping[str, Any],
        *,
        server_round: int,
        attempt: int,
        sites: Sequence[str],
        secure_min_sites: int = 0,
    ) -> dict[str, dict[str, Any]]:
        """Extra ConfigRecords of a train message (by name) and an audit ``send`` line.

        ``secure_min_sites`` > 0 marks a SecAgg+ round: site-mode DP then asks each of the
        ``sites`` for its share of the noise such that any ``secure_min_sites`` of them (the
        fewest whose sum the server can unmask) carry the full noise.
        FederationError when this release would spend more than ``dp-max-epsilon``.
        """
        if self.dp.mode == "site" and self.dp.max_epsilon > 0:
            after = self.dp.epsilon(self.releases + 1)
            if after > self.dp.max_epsilon:
                raise FederationError(
                    f"round {server_round} attempt {attempt} would spend epsilon {after:.3g} > "
                    f"dp-max-epsilon {self.dp.max_epsilon:g} (failed attempts count too): the "
                    "run stops; the last checkpoint holds the final model"
                )
        records: dict[str, dict[str, Any]] = {}
        if self.signer is not None:
            records["signature"] = sign_global(
                sent, config, server_round=server_round, signer=self.signer
            )
        if self.dp.enabled:
            dp = self.dp
            if secure_min_sites and dp.mode == "site":
                dp = dp.secure(len(sites), min_sites=secure_min_sites)
            records["privacy"] = dp.to_record()
            self.releases += 1
        self._sent_digest = arrays_digest(sent)
        self.audit.append(
            "send",
            round=server_round,
            attempt=attempt,
            sites=sorted(sites),
            global_sha256=self._sent_digest,
            config_sha256=self.config_hash,
            signed=self.signer is not None,
        )
        return records

    def privacy_spent(self) -> dict[str, Any] | None:
        """Site mode: ``{"epsilon", "delta", "adjacency", "releases", ...}`` so far (epsilon
        under the run's ``dp-adjacency``, and ``epsilon-add-remove`` for comparison). Record
        mode: the settings only (``epsilon`` None): each site reports its own ``dp-epsilon``.
        None without DP."""
        if not self.dp.enabled:
            return None
        spent: dict[str, Any] = {
            "mode": self.dp.mode,
            "epsilon": None,
            "delta": self.dp.delta,
            "adjacency": self.dp.adjacency,
            "releases": self.releases,
            "noise-multiplier": self.dp.noise_multiplier,
            "clip-norm": self.dp.clip_norm,
            "max-epsilon": self.dp.max_epsilon or None,
        }
        if self.dp.mode == "site":
            spent["epsilon"] = _json_epsilon(self.dp.epsilon(self.releases))
            spent["epsilon-add-remove"] = _json_epsilon(
                dataclasses.replace(self.dp, adjacency="add-remove").epsilon(self.releases)
            )
        return spent

    def after_attempt(
        self,
        record: Mapping[str, Any],
        updates: Sequence[_Update],
        checkpoint: _Checkpoint | None = None,
    ) -> None:
        """Write the audit ``round`` line for ``record``, then sign ``checkpoint`` (if any)
        together with that line's hash."""
        self.audit.append(
            "round" if record.get("round", 0) else "initial",
            round=record.get("round"),
            attempt=record.get("attempt"),
            status=record.get("status"),
            global_sent_sha256=self._sent_digest or None,
            received_sha256={u.site: arrays_digest(u.arrays) for u in updates},
            rejected=sorted(record.get("rejected") or {}),
            missing=sorted(record.get("missing") or []),
            checkpoint_sha256=checkpoint.hash if checkpoint is not None else None,
            dp=self.privacy_spent(),
        )
        if checkpoint is not None and self.signer is not None:
            sign_checkpoint(checkpoint.path, self.signer, audit_sha256=self.audit.head)

    def record_score(self, round_: int, score: float) -> None:
        """An audit line for a round's validation score (model selection): ``fedmed verify``
        checks that ``best.json`` names the best-scored round."""
        self.audit.append("score", round=round_, score=score)

    def record_file(self, event: str, path: Path, sha256: str) -> None:
        """An audit line for a result file of the run (``cross-site``: ``cross_site.json``),
        so ``fedmed verify`` can check it was not changed afterwards."""
        self.audit.append(event, file=path.name, sha256=sha256)


def _count_events(path: Path, event: str) -> int:
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            count += json.loads(line).get("event") == event
        except ValueError:
            continue
    return count


class SiteGuard:
    """A site's checks on what it receives and protection of what it sends.

    Example:
        >>> guard = SiteGuard(site="A", ca_file="certs/ca.pem", audit_dir="cache")
        >>> guard.check_global(received, config, signature, server_round=1)
        'verified'
    """

    def __init__(self, *, site: str, ca_file: str | None, audit_dir: str | None) -> None:
        self.site = site
        self.verifier = Verifier.from_ca_file(ca_file) if ca_file else None
        self.audit = AuditLog(Path(audit_dir) / AUDIT_FILE) if audit_dir else None

    @classmethod
    def for_node(cls, node_config: Mapping[str, Any], *, site: str, cache_dir: str) -> SiteGuard:
        """From node config ``server-ca`` (absent: ``$FEDMED_SERVER_CA``; empty: no check);
        audit in cache-dir."""
        if "server-ca" in node_config:
            ca = str(node_config["server-ca"] or "")
        else:
            ca = os.environ.get(CA_ENV_VAR, "")
        return cls(site=site, ca_file=ca or None, audit_dir=cache_dir or None)

    def check_global(
        self,
        received: Mapping[str, np.ndarray],
        config: Mapping[str, Any],
        signature: Mapping[str, Any] | None,
        *,
        server_round: int,
    ) -> str:
        """``verified``, ``unverified`` (no CA here) or ``unsigned``; SignatureError refuses."""
        if self.verifier is not None:
            verify_global(
                received, config, signature, server_round=server_round, verifier=self.verifier
            )
            return "verified"
        if self.site not in _WARNED:  # once per site and process, not every round
            _WARNED.add(self.site)
            logger.warning(
                "site %s: no server-ca configured (node config or %s): global models are not "
                "authenticated",
                self.site,
                CA_ENV_VAR,
            )
        if signature:
            verify_global(
                received, config, signature, server_round=server_round, verifier=Verifier()
            )
            return "unverified"
        return "unsigned"

    def protect(
        self,
        trained: Mapping[str, np.ndarray],
        received: Mapping[str, np.ndarray],
        privacy: Mapping[str, Any] | None,
        *,
        server_round: int,
        signature_status: str,
        num_examples: float,
    ) -> dict[str, np.ndarray]:
        """The arrays to send (site-mode DP applied when the server asked for it; record mode:
        ``trained`` is already DP-SGD's output); audit line."""
        params = DpParams.from_record(privacy)
        sent = {k: trained[k] for k in received}
        norm = None
        if params.mode == "site":
            sent, info = privatize(trained, received, params)
            norm = info["dp-update-norm"]
            logger.info(
                "site %s round %d: DP update norm %.4g clipped to %g, noise std %.4g%s",
                self.site,
                server_round,
                norm,
                params.clip_norm,
                params.noise_std,
                f" (share of {params.secure_sites} sites)" if params.secure_sites else "",
            )
        if self.audit is not None:
            self.audit.append(
                "train",
                site=self.site,
                round=server_round,
                received_sha256=arrays_digest(received),
                signature=signature_status,
                sent_sha256=arrays_digest(sent),
                num_examples=num_examples,
                dp=params.to_record() if params.enabled else None,
                dp_update_norm=norm,
            )
        return sent
