from __future__ import annotations

import numpy as np
import pytest
from fedmed.simulation import dirichlet_counts, split_patients

from fedmed.errors import ConfigError

PATIENTS = [f"patient_{i:03d}" for i in range(40)]


def _assert_partition(sites: list[list[str]], patients: list[str]) -> None:
    flat = [p for s in sites for p in s]
    assert sorted(flat) == sorted(patients)  # every patient exactly once
    assert all(sites), "every site needs a patient"


@pytest.mark.parametrize("method", ["iid", "size-skew", "label-skew"])
def test_split_is_a_deterministic_partition(method):
    scores = {p: i / 40 for i, p in enumerate(PATIENTS)}
    first = split_patients(PATIENTS, 5, method=method, alpha=0.3, seed=1, scores=scores)
    again = split_patients(PATIENTS, 5, method=method, alpha=0.3, seed=1, scores=scores)
    other = split_patients(PATIENTS, 5, method=method, alpha=0.3, seed=2, scores=scores)
    _assert_partition(first, PATIENTS)
    assert first == again
    assert first != other


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(s) for s in split_patients(PATIENTS[:23], 4, method="iid", seed=0)]
    assert sorted(sizes) == [5, 6, 6, 6]


def test_size_skew_is_more_unequal_with_small_alpha():
    def spread(alpha: float) -> float:
        return float(
            np.mean(
                [
                    np.std(
                        [
                            len(s)
                            for s in split_patients(
                                PATIENTS, 4, method="size-skew", alpha=alpha, seed=seed
                            )
                        ]
                    )
                    for seed in range(20)
                ]
            )
        )

    assert spread(0.1) > 2 * spread(100.0)


def test_label_skew_separates_lesion_burden_more_than_iid():
    scores = {p: i / 40 for i, p in enumerate(PATIENTS)}

    def between_site_std(method: str) -> float:
        values = []
        for seed in range(10):
            sites = split_patients(PATIENTS, 4, method=method, alpha=0.1, seed=seed, scores=scores)
            values.append(np.std([np.mean([scores[p] for p in s]) for s in sites]))
        return float(np.mean(values))

    assert between_site_std("label-skew") > 2 * between_site_std("iid")


def test_label_skew_needs_scores():
    with pytest.raises(ConfigError, match="lesion burden"):
        split_patients(PATIENTS, 3, method="label-skew")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "random"}, "split 'random' is unknown"),
        ({"alpha": 0.0}, "alpha is 0.0: it must be > 0"),
    ],
    ids=["method", "alpha"],
)
def test_split_refuses_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        split_patients(PATIENTS, 3, **kwargs)


def test_split_refuses_more_sites_than_patients():
    with pytest.raises(ConfigError, match="3 patients cannot be split into 4 sites"):
        split_patients(PATIENTS[:3], 4)


def test_dirichlet_counts_sum_to_total_with_one_each():
    rng = np.random.default_rng(0)
    counts = dirichlet_counts(10, 4, alpha=0.05, rng=rng)
    assert sum(counts) == 10 and min(counts) >= 1
