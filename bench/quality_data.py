"""The quality benchmark's data: every site's train/validation split fixed across training seeds.

fedmed splits a site's patients into training and validation by a hash of the run's seed and
each patient id (:func:`fedmed.io.msd.split_cases`), so varying the seed alone would also move
patients between training and validation (with 16 patients a site got 1 to 9 validation
cases). The benchmark needs the data fixed and only the training seed varied, so for each
training seed :func:`pinned_sites` writes a copy of every site folder (hard links and a new
``dataset.json``) in which each patient gets a new id, ``<patient id><digits>``, chosen so that
fedmed's own split with that seed puts exactly the protocol's validation patients (a fixed
share of each site, drawn once with the data seed) in validation. Images, labels, case order
and patient grouping are unchanged; the split is checked with ``split_cases`` afterwards.

Example:
    >>> sites = pinned_sites(["data/site-A"], "data/pinned-seed3", seed=3, val_fraction=0.3,
    ...                      data_seed=0)
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from fedmed.simulation.sites import link_file

from fedmed.errors import DataError
from fedmed.io.msd import DATASET_JSON, load_site_dataset, patient_id, split_cases

__all__ = ["pinned_sites", "validation_patients"]

_MAX_TRIES = 100_000


def validation_patients(patients: Sequence[str], val_fraction: float, key: str) -> set[str]:
    """The protocol's validation patients of one site: ``round(val_fraction * n)`` of them (at
    least 1, and 1 fewer than all), drawn by a generator seeded with ``key``."""
    unique = sorted(set(patients))
    count = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    return set(random.Random(f"fedmed-quality:{key}").sample(unique, count)) if count > 0 else set()


def _pinned_id(pid: str, *, validation: bool, seed: int, val_fraction: float) -> str:
    """A new patient id that fedmed's split with ``seed`` puts on the wanted side."""
    for attempt in range(_MAX_TRIES):
        candidate = f"{pid}{attempt:05d}"
        if patient_id(candidate) != candidate:
            continue
        _, val = split_cases([{"case_id": candidate}], val_fraction=val_fraction, seed=seed)
        if bool(val) == validation:
            return candidate
    raise DataError(f"no id for patient {pid!r} lands on the wanted side of the split")


def pinned_sites(
    folders: Sequence[str | Path],
    root: str | Path,
    *,
    seed: int,
    val_fraction: float,
    data_seed: int,
) -> tuple[Path, ...]:
    """Copies of ``folders`` under ``root`` whose split with ``seed`` is the fixed one."""
    out = []
    for folder in folders:
        folder = Path(folder)
        cases = load_site_dataset(folder).cases
        pids = [patient_id(c["case_id"]) for c in cases]
        wanted = validation_patients(pids, val_fraction, f"{data_seed}:{folder.name}")
        new = {
            pid: _pinned_id(pid, validation=pid in wanted, seed=seed, val_fraction=val_fraction)
            for pid in dict.fromkeys(pids)
        }
        site = Path(root) / folder.name
        shutil.rmtree(site, ignore_errors=True)
        training = []
        for case, pid in zip(cases, pids, strict=True):
            entry = {"case_id": new[pid] + case["case_id"][len(pid) :]}
            for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                (site / sub).mkdir(parents=True, exist_ok=True)
                link_file(case[key], site / sub / Path(case[key]).name)
                entry[key] = f"./{sub}/{Path(case[key]).name}"
            training.append(entry)
        source = folder / DATASET_JSON
        meta = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
        # the test images stay in the original folder: the benchmark trains and validates only
        meta.update({"training": training, "numTraining": len(training), "test": []})
        (site / DATASET_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _, val = split_cases(load_site_dataset(site).cases, val_fraction=val_fraction, seed=seed)
        got = {c["case_id"] for c in val}
        expected = {e["case_id"] for e, pid in zip(training, pids, strict=True) if pid in wanted}
        if got != expected:
            raise DataError(f"{site}: the pinned split did not hold ({len(got)} validation cases)")
        out.append(site)
    return tuple(out)
