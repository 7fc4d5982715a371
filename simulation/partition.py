"""Split one pooled dataset into simulated sites by patient: IID, label-skewed or size-skewed.

All functions work on patient ids (every scan of a patient goes to one site) and are
deterministic in ``seed``. Every site gets at least one patient.

- ``iid``: patients shuffled and dealt round-robin (site sizes differ by at most one).
- ``size-skew``: site shares drawn from ``Dirichlet(alpha)``; smaller ``alpha`` gives more
  unequal sites.
- ``label-skew``: patients binned by lesion burden (fraction of labelled voxels; quantile bins,
  one per site up to 4) and each bin spread over the sites by its own ``Dirichlet(alpha)`` draw
  (the usual class-skew recipe of FL benchmarks, applied to lesion burden since every patient
  has the same classes).

Example:
    >>> sites = split_patients(["p1", "p2", "p3", "p4"], 2, method="iid", seed=0)
    >>> sorted(len(s) for s in sites)
    [2, 2]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedmed.errors import ConfigError

__all__ = ["SPLIT_METHODS", "dirichlet_counts", "split_patients"]

SPLIT_METHODS = ("iid", "label-skew", "size-skew")
_MAX_LABEL_BINS = 4


def dirichlet_counts(
    total: int, n_sites: int, *, alpha: float, rng: np.random.Generator
) -> list[int]:
    """``total`` items shared over ``n_sites`` by a ``Dirichlet(alpha)`` draw, each site >= 1."""
    if total < n_sites:
        raise ConfigError(f"cannot give {n_sites} sites at least one patient each from {total}")
    shares = rng.dirichlet(np.full(n_sites, float(alpha)))
    # one patient each first, the rest by largest remainder of the drawn shares
    spare = total - n_sites
    raw = shares * spare
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: spare - int(counts.sum())]] += 1
    return [int(c) + 1 for c in counts]


def split_patients(
    patients: Sequence[str],
    n_sites: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    scores: Mapping[str, float] | None = None,
) -> list[list[str]]:
    """Assign each patient to one of ``n_sites`` sites; returns the patients of each site.

    ``scores`` (patient -> lesion burden) is required for ``label-skew``. Raises ConfigError
    for an unknown method, ``alpha <= 0``, or fewer patients than sites.
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(f"split {method!r} is unknown: use one of {', '.join(SPLIT_METHODS)}")
    if n_sites < 1:
        raise ConfigError(f"need at least one site, got {n_sites}")
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha is {alpha}: it must be > 0 (e.g. 0.5)")
    unique = list(dict.fromkeys(patients))
    if len(unique) < n_sites:
        raise ConfigError(
            f"{len(unique)} patients cannot be split into {n_sites} sites: use at most "
            f"{len(unique)} sites"
        )
    rng = np.random.default_rng([seed, 6])
    order = [unique[i] for i in rng.permutation(len(unique))]
    if method == "iid":
        return [sorted(order[i::n_sites]) for i in range(n_sites)]
    if method == "size-skew":
        counts = dirichlet_counts(len(order), n_sites, alpha=alpha, rng=rng)
        bounds = np.cumsum([0, *counts])
        return [sorted(order[bounds[i] : bounds[i + 1]]) for i in range(n_sites)]
    if scores is None or any(p not in scores for p in unique):
        raise ConfigError("label-skew needs the lesion burden of every patient")
    return _label_skew(order, n_sites, alpha=alpha, rng=rng, scores=scores)


def _label_skew(
    order: list[str],
    n_sites: int,
    *,
    alpha: float,
    rng: np.random.Generator,
    scores: Mapping[str, float],
) -> list[list[str]]:
    n_bins = max(1, min(n_sites, _MAX_LABEL_BINS, len(order)))
    ranked = sorted(order, key=lambda p: (scores[p], p))
    bins = np.array_split(np.array(ranked, dtype=object), n_bins)
    sites: list[list[str]] = [[] for _ in range(n_sites)]
    for members in bins:
        members = list(members)
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(n_sites, float(alpha)))
        picks = rng.choice(n_sites, size=len(members), p=shares)
        for patient, site in zip(members, picks, strict=True):
            sites[int(site)].append(str(patient))
    # every site needs a patient: move one from the largest site, least typical of it first
    for i, members in enumerate(sites):
        if not members:
            donor = max(range(n_sites), key=lambda j: (len(sites[j]), -j))
            sites[i].append(sites[donor].pop())
    return [sorted(s) for s in sites]
