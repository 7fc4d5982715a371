"""One round of the run: attempts until ``min-sites`` valid replies, and what a reply may claim.

:func:`run_attempts` waits for the sites, samples them (:mod:`.sampling`), asks the sampled
nodes who they are, and runs an attempt (:func:`run_attempt`: SecAgg+'s stages, or one train
message per site checked alone by :mod:`.attempt` within :func:`reply_bounds`); an attempt
with too few valid replies is logged as failed and retried, the sites that failed it asked
last, up to ``retry-failed-rounds`` times. Sites that refuse a round to stay within their
privacy budget are no longer sampled; when too few may still train, the run stops
(:class:`~fedmed.security.accountant.PrivacyBudgetExhausted`).

Example:
    >>> record, updates, failed = run_attempts(federation, 1, weights)
    >>> record["contributors"], failed
    (3, 0)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed.errors import FederationError
from fedmed.scaffold import join_controls

from .aggregate import SiteUpdate
from .attempt import ReplyBounds, run_plain_attempt
from .sampling import sample_sites
from .validation import default_update_bound

if TYPE_CHECKING:
    from .federation import Federation

__all__ = ["reply_bounds", "run_attempt", "run_attempts"]

logger = logging.getLogger(__name__)

_BUDGET_REFUSAL = "PrivacyBudgetExhausted"  # a site's error reply when it refuses a round


def run_attempts(
    fed: Federation, server_round: int, weights: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], list[SiteUpdate], int]:
    """Attempts of one round until ``min-sites`` valid replies: (record, updates, failed
    attempts); FederationError after ``retry-failed-rounds`` retries."""
    avoid: set[int] = set()  # sites that failed this round: asked last on a retry
    for attempt in range(1, fed.settings.retry_failed_rounds + 2):
        connected = fed.wait_for_sites()
        nodes = sample_sites(connected, fed.settings, server_round, names=fed._names(), avoid=avoid)
        unnamed: list[int] = []
        if fed._sampling:  # ask the sampled nodes who they are; one that cannot is missing
            fed._update_roster(connected, ask=nodes)
            unnamed = [n for n in nodes if n not in fed.sites]
            nodes = [n for n in nodes if n in fed.sites]
        record, updates = fed.run_round(server_round, attempt, nodes, weights)
        record["missing"] = [*record["missing"], *(f"node-{n}" for n in unnamed)]
        spent = {s for s, why in record["rejected"].items() if _BUDGET_REFUSAL in why}
        if spent - fed.exhausted:
            logger.warning("privacy budget exhausted at %s: no longer sampled", sorted(spent))
            fed.exhausted |= spent
        if record.get("contributors", len(updates)) >= fed.settings.min_sites:
            return record, updates, attempt - 1
        bad = {*record["missing"], *record["rejected"]}
        avoid |= {n for n in nodes if fed.roster.name_of(n) in bad}
        record["status"] = "failed"
        logger.warning(
            "round %d attempt %d failed: %d valid replies, min-sites is %d",
            server_round,
            attempt,
            record.get("contributors", len(updates)),
            fed.settings.min_sites,
        )
        record["dp"] = fed.guard.privacy_spent()
        fed.log.append(record)
        fed.guard.after_attempt(record, updates)
        fed._report()
        if spent:  # raises PrivacyBudgetExhausted when too few sites may still train
            fed.wait_for_sites()
    raise FederationError(
        f"round {server_round} had fewer than min-sites {fed.settings.min_sites} "
        f"valid replies in {fed.settings.retry_failed_rounds + 1} attempts (see "
        f"{fed.log.path}): check the sites' logs, raise round-timeout or lower min-sites"
    )


def run_attempt(
    fed: Federation,
    server_round: int,
    attempt: int,
    nodes: list[int],
    weights: Mapping[str, np.ndarray],
) -> tuple[dict[str, Any], list[SiteUpdate]]:
    """One attempt: send, collect, validate. Returns the log record and valid updates."""
    started = time.monotonic()
    sent = fed.shared_weights(weights)
    cfg = fed.config(server_round)
    names = {n: fed.roster.name_of(n) for n in nodes}
    extras = fed.guard.train_records(
        sent,
        cfg.to_config(),
        server_round=server_round,
        attempt=attempt,
        sites=list(names.values()),
        secure_min_sites=fed.settings.min_sites if fed.secure is not None else 0,
    )
    if fed.secure is not None:  # SecAgg+: the server only ever sees the weighted mean
        record, updates = fed.secure.attempt(
            server_round, attempt, names, sent, cfg.to_config(), extras
        )
    else:
        payload = join_controls(sent, fed.aggregator.control)
        record, updates = run_plain_attempt(
            fed._exchange,
            server_round,
            attempt,
            names,
            payload,
            cfg,
            extras,
            reply_bounds(fed, sent),
            timeout=fed.settings.round_timeout,
        )
    record["duration-s"] = round(time.monotonic() - started, 3)
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record, updates


def reply_bounds(fed: Federation, sent: Mapping[str, np.ndarray]) -> ReplyBounds:
    """What a reply to ``sent`` may claim: the update bound of ``max-update-norm`` (the default
    rule allows for the DP noise), and each site's announced aggregation weight."""
    settings = fed.settings
    rule = settings.update_bound_rule
    if rule == "fixed":
        bound = settings.max_update_norm
    elif rule == "default":
        noised = sum(v.size for k, v in sent.items() if k in fed.param_keys)
        noise = settings.dp_noise_multiplier * settings.dp_clip_norm * math.sqrt(noised)
        if fed.guard.dp.mode == "record":
            noise = _record_dp_allowance(fed, noised)
        bound = default_update_bound(sent, keys=fed.param_keys, dp_noise_norm=noise)
    else:
        bound = 0.0
    voxels = settings.aggregation_weight == "voxels"
    max_weight = {
        node: site.num_train_voxels if voxels else float(site.num_train_cases)
        for node, site in fed.sites.items()
    }
    return ReplyBounds(
        bound,
        max_weight,
        whole_weight=not voxels,
        norm_keys=fed.param_keys,
        noised=fed.guard.dp.mode == "site",
    )


def _record_dp_allowance(fed: Federation, noised: int) -> float:
    """Record-level DP trains with Adam on noisy gradients: each step moves a coordinate
    by about ``lr`` whatever the noise, so a round moves the model at most about
    ``lr * steps * sqrt(d)`` (steps from the largest site's announced cases)."""
    settings = fed.settings
    cases = max((s.num_train_cases for s in fed.sites.values()), default=1)
    steps = settings.local_steps or settings.local_epochs * math.ceil(
        cases / settings.dp_patients_per_step
    )
    return settings.lr * steps * math.sqrt(noised) / 3.0
