"""Privacy accounting: a site's ledger of DP releases, the epsilon they add up to, its budget.

Every epsilon fedmed states is computed here with Google's ``dp_accounting`` (the RDP
accountant Flower and TensorFlow Privacy use) from events whose parameters are reported next to
the number, so anyone can recompute it:

- a **record-level** round (DP-SGD at the site, :mod:`fedmed.security.dpsgd`) is ``steps``
  compositions of ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``: neighbouring datasets
  differ by one patient added or removed (``add-remove``). dp_accounting has no replace-one
  accountant for Poisson sampling; a replacement is a removal plus an addition.
- a **site-level** round (the site's clipped, noised update, :mod:`fedmed.security.dp`) is one
  ``GaussianDpEvent``: noise multiplier ``sigma`` against sensitivity ``C`` under
  ``add-remove`` of the site's contribution, ``sigma / 2`` under ``replace-one`` (sensitivity
  ``2C``: what a coordinator who sees which sites sent something can compare). No subsampling
  amplification: the server picks sites openly, so the sampling is neither random to the
  adversary nor secret.

A site keeps a :class:`PrivacyLedger` (``<cache-dir>/privacy-ledger.json``) of every round it
released, across runs, in patient units: a record-level round as above, a site-level round as
``sigma / 2`` (one patient more or less changes a clipped update by at most ``2C``), a round
without DP as infinite. :func:`may_train` decides whether the next round fits the site's own
budget (its node config ``max-epsilon``, over its whole history) and the run's
``dp-max-epsilon`` (this run only).

Example:
    >>> ledger = PrivacyLedger()
    >>> entry = LedgerEntry(run="7", round=1, mode="record", noise_multiplier=1.0,
    ...                     sample_rate=0.08, steps=50)
    >>> may_train(site_budget=8.0, run_budget=0.0,
    ...           spent_after_next=ledger.epsilon_if(entry, delta=1e-5),
    ...           run_spent_after_next=ledger.epsilon_if(entry, delta=1e-5, run="7"))
    (True, '')
    >>> ledger.add(entry)
    >>> round_record(ledger, run="7", delta=1e-5, adjacency="add-remove")["dp-steps"]
    50
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import dp_accounting
from dp_accounting.rdp import RdpAccountant

from fedmed.errors import DataError, FederationError

__all__ = [
    "ADJACENCIES",
    "LEDGER_FILE",
    "LEDGER_MODES",
    "LedgerEntry",
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "aggregate_noise_multiplier",
    "composed_epsilon",
    "gaussian_epsilon",
    "may_train",
    "recompute_epsilon",
    "record_epsilon",
    "round_record",
]

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
LEDGER_MODES = ("record", "site", "off")
ADJACENCIES = ("add-remove", "replace-one")
_VERSION = 1

Adjacency = Literal["add-remove", "replace-one"]


def _site_event(noise_multiplier: float, adjacency: str) -> dp_accounting.DpEvent:
    # dp_accounting's GaussianDpEvent is noise std / sensitivity whatever the relation: a
    # replace-one sensitivity of 2C halves the multiplier.
    factor = 2.0 if adjacency == "replace-one" else 1.0
    return dp_accounting.GaussianDpEvent(noise_multiplier / factor)


def _record_event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate >= 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)


def composed_epsilon(events: Iterable[tuple[dp_accounting.DpEvent, int]], *, delta: float) -> float:
    """Epsilon at ``delta`` of ``(event, count)`` pairs composed (RDP accountant, its default
    orders); inf when any event is not private, 0 for nothing."""
    accountant = RdpAccountant()
    empty = True
    # For Poisson sampling dp_accounting logs a warning per fractional order near 1 whose
    # series does not converge and leaves that order out, which only loosens the bound: keep
    # those lines out of the site's log.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        for event, count in events:
            if count > 0:
                accountant.compose(event, int(count))
                empty = False
        return 0.0 if empty else float(accountant.get_epsilon(delta))
    finally:
        absl_logger.setLevel(level)


def record_epsilon(
    *, sample_rate: float, noise_multiplier: float, steps: int, delta: float
) -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps with Poisson rate ``sample_rate``.

    Example:
        >>> round(record_epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=10_000,
        ...                      delta=1e-5), 2)
        5.63
    """
    if noise_multiplier <= 0:
        return math.inf if steps > 0 else 0.0
    return composed_epsilon([(_record_event(noise_multiplier, sample_rate), steps)], delta=delta)


def gaussian_epsilon(
    *, noise_multiplier: float, rounds: int, delta: float, adjacency: str = "replace-one"
) -> float:
    """Epsilon at ``delta`` of ``rounds`` Gaussian releases with noise ``noise_multiplier * C``
    of a quantity with L2 sensitivity ``C`` (add-remove) or ``2C`` (replace-one).

    Example:
        >>> round(gaussian_epsilon(noise_multiplier=1.0, rounds=1, delta=1e-5,
        ...                        adjacency="add-remove"), 2)
        4.73
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return composed_epsilon([(_site_event(noise_multiplier, adjacency), rounds)], delta=delta)


def aggregate_noise_multiplier(
    noise_multiplier: float, *, noised_for: int, survivors: int
) -> float:
    """The noise multiplier a securely aggregated sum carries when each site added its share
    for ``noised_for`` sites and ``survivors`` sites' updates are in the sum:
    ``sigma * sqrt(survivors / noised_for)``. Account with it when it is below ``sigma``.

    Example:
        >>> round(aggregate_noise_multiplier(1.0, noised_for=4, survivors=3), 3)
        0.866
    """
    if noised_for < 1 or survivors < 0:
        raise ValueError(f"need noised_for >= 1 and survivors >= 0, got {noised_for}, {survivors}")
    return noise_multiplier * math.sqrt(survivors / noised_for)


@dataclass(frozen=True)
class LedgerEntry:
    """One round a site released: ``steps`` noisy steps at ``sample_rate`` (record mode), or
    one noised update (site mode: ``sample_rate`` 1, ``steps`` 1), or an update without DP
    (mode ``off``). ``noise_multiplier`` is the noise std over the clip norm that the released
    quantity carries (under SecAgg+ with distributed noise: what the aggregate carries)."""

    run: str
    round: int
    mode: Literal["record", "site", "off"]
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if self.mode not in LEDGER_MODES:
            raise ValueError(f"ledger mode must be one of {LEDGER_MODES}, got {self.mode!r}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise multiplier must be >= 0, got {self.noise_multiplier!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")

    def event(self, adjacency: str) -> dp_accounting.DpEvent:
        """The dp_accounting event of one step (site mode: of the round) under ``adjacency``
        (record mode is always add-remove)."""
        if self.mode == "off" or self.noise_multiplier == 0:
            return dp_accounting.NonPrivateDpEvent()
        if self.mode == "record":
            return _record_event(self.noise_multiplier, self.sample_rate)
        return _site_event(self.noise_multiplier, adjacency)


class PrivacyLedger:
    """The DP releases of one site across runs, persisted as JSON in its cache-dir.

    ``epsilon()`` is per patient over the whole history (site rounds as replace-one);
    ``epsilon(run=...)`` is one run's, under the adjacency asked for.

    Example:
        >>> ledger = PrivacyLedger.load(Path(cache_dir) / LEDGER_FILE)
        >>> ledger.add(LedgerEntry(run="7", round=3, mode="site", noise_multiplier=1.1))
        >>> ledger.save(Path(cache_dir) / LEDGER_FILE)
    """

    def __init__(self, entries: Iterable[LedgerEntry] = ()) -> None:
        self.entries: list[LedgerEntry] = list(entries)

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """The ledger at ``path``; an absent file is an empty ledger (a site that never
        released anything). A damaged file raises DataError: a privacy budget is never reset
        silently."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {_VERSION}")
            entries = [LedgerEntry(**item) for item in data["entries"]]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(
                f"privacy ledger {path} is unreadable ({err}): restore it from a backup; "
                "deleting it would forget the privacy this site has already spent"
            ) from err
        return cls(entries)

    def save(self, path: str | Path) -> Path:
        """Write the ledger atomically (temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {"version": _VERSION, "entries": [asdict(e) for e in self.entries]}, indent=1
        )
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def add(self, entry: LedgerEntry) -> None:
        """Record a release (call before the update leaves the site)."""
        self.entries.append(entry)

    def run_entries(self, run: str) -> list[LedgerEntry]:
        """The entries of run ``run``, in order."""
        return [e for e in self.entries if e.run == run]

    def epsilon(
        self,
        *,
        delta: float,
        run: str | None = None,
        adjacency: Adjacency = "replace-one",
        extra: Sequence[LedgerEntry] = (),
    ) -> float:
        """Epsilon at ``delta`` of the history (or of ``run``'s entries) plus ``extra``.

        ``adjacency`` applies to site-mode entries; the default, replace-one, is also the bound
        per patient (one patient changes a clipped update by at most 2C).
        """
        entries = [*(self.entries if run is None else self.run_entries(run)), *extra]
        counts: Counter[dp_accounting.DpEvent] = Counter()
        for entry in entries:
            counts[entry.event(adjacency)] += entry.steps
        return composed_epsilon(counts.items(), delta=delta)

    def epsilon_if(
        self,
        entry: LedgerEntry,
        *,
        delta: float,
        run: str | None = None,
        adjacency: Adjacency = "replace-one",
    ) -> float:
        """:meth:`epsilon` as it would be after ``entry``: what a site checks before a round."""
        return self.epsilon(delta=delta, run=run, adjacency=adjacency, extra=(entry,))


class PrivacyBudgetExhausted(FederationError):
    """A site refuses a round that would exceed a privacy budget (the message is
    :func:`may_train`'s reason). Its class name is what a site's error reply names, so the server
    can tell a refusal from a failure."""

    exit_code: ClassVar[int] = 6


def may_train(
    *,
    site_budget: float,
    run_budget: float,
    spent_after_next: float,
    run_spent_after_next: float,
) -> tuple[bool, str]:
    """Whether a site may train the next round, and why not.

    ``site_budget`` is the site's own ``max-epsilon`` (node config; 0 = none) against
    ``spent_after_next``, its whole history per patient after the round; it always applies and
    no run setting raises it. ``run_budget`` is the run's ``dp-max-epsilon`` (0 = none) against
    ``run_spent_after_next``, this run's epsilon after the round; a coordinator may ask for
    less than the site allows, never for more.

    Example:
        >>> may_train(site_budget=1.0, run_budget=8.0, spent_after_next=1.2,
        ...           run_spent_after_next=1.2)[0]
        False
    """
    if site_budget > 0 and not spent_after_next <= site_budget:
        return False, (
            f"privacy budget exhausted: the next round would bring this site's epsilon (all "
            f"runs, per patient) to {spent_after_next:.4g}, above its max-epsilon "
            f"{site_budget:g}; the site does not train (raise max-epsilon in the site's node "
            "config only if its ethics approval allows it)"
        )
    if run_budget > 0 and not run_spent_after_next <= run_budget:
        return False, (
            f"privacy budget exhausted: the next round would bring this run's epsilon at this "
            f"site to {run_spent_after_next:.4g}, above the run's dp-max-epsilon {run_budget:g}; "
            "the site does not train"
        )
    return True, ""


def round_record(
    ledger: PrivacyLedger, *, run: str, delta: float, adjacency: Adjacency
) -> dict[str, Any]:
    """The privacy a site reports after a round of run ``run``: numbers that determine it.

    Keys: ``dp-mode``, ``dp-adjacency`` (strings), ``dp-epsilon`` (this run at this site, at
    ``dp-delta``), ``dp-delta``, ``dp-noise-multiplier``, ``dp-sample-rate``, ``dp-steps`` (the
    run's total noisy steps: record mode DP-SGD steps, site mode rounds), and
    ``dp-epsilon-total`` (the site's whole history per patient, what its own budget limits).
    :func:`recompute_epsilon` gives ``dp-epsilon`` back from the other keys.
    """
    entries = ledger.run_entries(run)
    if not entries:
        raise ValueError(f"the ledger has no entry of run {run!r}")
    last = entries[-1]
    if len({(e.mode, e.noise_multiplier, e.sample_rate) for e in entries}) > 1:
        logger.warning(
            "run %s changed DP mode, noise multiplier or sample rate between rounds: dp-epsilon "
            "covers every round, the other dp-* keys describe the last one only",
            run,
        )
    epsilon = ledger.epsilon(delta=delta, run=run, adjacency=adjacency)
    return {
        "dp-mode": last.mode,
        "dp-adjacency": "add-remove" if last.mode == "record" else adjacency,
        "dp-epsilon": epsilon,
        "dp-delta": delta,
        "dp-noise-multiplier": last.noise_multiplier,
        "dp-sample-rate": last.sample_rate,
        "dp-steps": sum(e.steps for e in entries),
        "dp-epsilon-total": ledger.epsilon(delta=delta),
    }


def recompute_epsilon(record: Mapping[str, Any]) -> float:
    """``dp-epsilon`` from a :func:`round_record`'s parameters (a report's cross-check)."""
    entry = LedgerEntry(
        run="",
        round=0,
        mode=record["dp-mode"],
        noise_multiplier=float(record["dp-noise-multiplier"]),
        sample_rate=float(record["dp-sample-rate"]),
        steps=int(record["dp-steps"]),
    )
    return PrivacyLedger([entry]).epsilon(
        delta=float(record["dp-delta"]), adjacency=record["dp-adjacency"]
    )
