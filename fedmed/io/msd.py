"""A site's data folder: the Medical Segmentation Decathlon layout or plain image/label pairs.

Two layouts are accepted:

* MSD: ``dataset.json`` with ``"training": [{"image": "./imagesTr/x.nii.gz", "label":
  "./labelsTr/x.nii.gz"}, ...]``, ``"labels": {"0": "background", "1": "lesion"}`` (nnU-Net v2's
  inverted ``{"background": 0, ...}`` is read too) and an optional ``"test"`` list.
* pairs: a folder of ``<case>_img.nii.gz`` / ``<case>_seg.nii.gz`` files (``.nii`` works too);
  the classes are then assumed to be ``{0: background, 1: lesion}``.

Cases are MONAI-style data dicts ``{"image": path, "label": path, "case_id": id}`` so they feed
the transforms directly. :func:`split_cases` splits them into train/validation by patient,
deterministically and stably (see its docstring).

``dataset.json`` is read within :class:`~fedmed.io.folder.SiteFolder`'s limits (a regular
file, bounded size and nesting) and each key fedmed reads has its type checked. Every path it
lists, and every file of the pairs layout, must lie inside the site folder; symbolic links out
of it are refused unless ``allow_external_links`` is set (the site config's
``allow-external-links``).

Example:
    >>> site = load_site_dataset("demo/data/site-A")
    >>> site.name, len(site.cases), site.label_names
    ('site-A', 6, {0: 'background', 1: 'lesion'})
    >>> train, val = split_cases(site.cases, val_fraction=0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError, DataError
from fedmed.io.folder import SiteFolder
from fedmed.io.header import NIFTI_SUFFIXES, is_nifti
from fedmed.text import printable

__all__ = [
    "DATASET_JSON",
    "DEFAULT_LABEL_NAMES",
    "SiteDataset",
    "case_id_from_path",
    "load_site_dataset",
    "patient_id",
    "split_cases",
]

DATASET_JSON = "dataset.json"
DEFAULT_LABEL_NAMES: Mapping[int, str] = {0: "background", 1: "lesion"}
_MAX_LABEL_VALUE = 255  # labels load as uint8
_IMG_SUFFIX = "_img"
_SEG_SUFFIX = "_seg"
# "patient_012", "pat-3", "Patient07" followed by a scan/time-point suffix or nothing.
_PATIENT_RE = re.compile(
    r"^((?:.*?[_-])?(?:patient[_-]?[0-9A-Za-z]+?|pat[_-]?\d+))(?:[_-].*)?$", re.IGNORECASE
)


@dataclass(frozen=True)
class SiteDataset:
    """The cases of one site's data folder.

    ``cases`` are data dicts with absolute ``image``/``label`` paths (str) and a ``case_id``;
    ``test_images`` are absolute paths of unlabelled images (MSD ``"test"``); ``layout`` is
    ``"msd"`` or ``"pairs"``; ``name`` is the folder's name (the site name);
    ``labels_declared`` is False when the classes are the default ``{0, 1}`` (pairs layout, or
    no ``"labels"`` in ``dataset.json``).

    Example:
        >>> site = load_site_dataset("hospital/ct")
        >>> site.cases[0]
        {'image': '/data/ct/imagesTr/p01.nii.gz', 'label': '...', 'case_id': 'p01'}
    """

    root: Path
    name: str
    cases: list[dict[str, str]]
    label_names: dict[int, str]
    layout: str
    test_images: list[str] = field(default_factory=list)
    labels_declared: bool = True

    @property
    def label_classes(self) -> frozenset[int]:
        """The declared label values (``label_names``' keys)."""
        return frozenset(self.label_names)


def case_id_from_path(path: str | Path) -> str:
    """The case id of an image or label file: its name without ``.nii(.gz)``, ``_img``/``_seg``
    and nnU-Net's ``_0000`` channel suffix."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for suffix in (_IMG_SUFFIX, _SEG_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return re.sub(r"_\d{4}$", "", name)


def patient_id(case_id: str) -> str:
    """The patient a case belongs to: ``patient_012_scan2`` -> ``patient_012``.

    Ids that do not look like ``patient_<id>`` (or ``pat<id>``) are their own patient.
    """
    match = _PATIENT_RE.match(case_id)
    return match.group(1) if match else case_id


def load_site_dataset(
    root: str | Path, *, require_files: bool = True, allow_external_links: bool = False
) -> SiteDataset:
    """Read a site folder in the MSD or pairs layout.

    With ``require_files`` (the default) every listed image and label must exist; the data check
    passes ``False`` to collect missing files as problems instead. ``allow_external_links``
    lets symbolic links inside the folder point outside it. Raises :class:`DataError` naming
    the folder or ``dataset.json`` for an empty folder, an unknown layout, invalid or
    oversized JSON, malformed entries or a path leaving the folder, and naming the file for a
    missing image or label.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError(f"{printable(root)}: site data folder not found (or not a folder)")
    folder = SiteFolder(root, allow_external_links=allow_external_links)
    json_path = root / DATASET_JSON
    dataset = _load_msd(folder) if os.path.lexists(json_path) else _load_pairs(folder)
    if require_files:
        for case in dataset.cases:
            for key in ("image", "label"):
                if not Path(case[key]).is_file():
                    raise DataError(
                        f"{printable(case[key])}: {key} of case {printable(case['case_id'])} not "
                        f"found; fix the path in {printable(_describe_source(dataset))} or "
                        "restore the file"
                    )
    return dataset


def split_cases(
    cases: Sequence[Mapping[str, str]],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split cases into ``(train, val)`` by patient, deterministically.

    Each patient (:func:`patient_id` of the case id) draws a number in [0, 1) from a hash of
    ``seed`` and its id, and goes to validation when it is below ``val_fraction``. A patient's
    side therefore depends only on its own id: adding or removing cases never moves another
    patient across (validation patients never leak into training as a site grows), and all
    scans of one patient stay on one side. On small sites the hash can leave a side empty; then,
    with two or more patients, the patient with the lowest draw goes to validation (or the
    highest to training). Order within each side follows the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    draws: dict[str, float] = {}
    for case in cases:
        pid = patient_id(case["case_id"])
        if pid not in draws:
            digest = hashlib.sha256(f"fedmed-split:{seed}:{pid}".encode()).digest()
            draws[pid] = int.from_bytes(digest[:8], "big") / 2**64
    val_patients = {pid for pid, u in draws.items() if u < val_fraction}
    if val_fraction > 0 and len(draws) >= 2:
        if not val_patients:
            val_patients = {min(draws, key=draws.__getitem__)}
        elif len(val_patients) == len(draws):
            val_patients.discard(max(draws, key=draws.__getitem__))
    train = [dict(c) for c in cases if patient_id(c["case_id"]) not in val_patients]
    val = [dict(c) for c in cases if patient_id(c["case_id"]) in val_patients]
    return train, val


def _load_msd(folder: SiteFolder) -> SiteDataset:
    root = folder.root
    src = printable(root / DATASET_JSON)
    meta = folder.read_json(DATASET_JSON)
    training = meta.get("training")
    if not isinstance(training, list):
        raise DataError(f'{src}: missing "training" list of {{"image": ..., "label": ...}} entries')
    if not training:
        raise DataError(f'{src}: "training" is empty; list the labelled cases')
    cases = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry.get(k) for k in ("image", "label")
        ):
            raise DataError(
                f'{src}: "training" entry {index} must be {{"image": "./imagesTr/x.nii.gz",'
                f' "label": "./labelsTr/x.nii.gz"}}, got {_shown(entry)}'
            )
        where = f'{src}: "training" entry {index}'
        image = folder.contained(entry["image"], where=f"{where} image")
        label = folder.contained(entry["label"], where=f"{where} label")
        case_id = entry.get("case_id") or case_id_from_path(image)
        if not isinstance(case_id, str):
            raise DataError(f'{where}: "case_id" must be a string, got {_shown(case_id)}')
        cases.append({"image": str(image), "label": str(label), "case_id": case_id})
    _reject_duplicate_ids(cases, src)
    test = meta.get("test")
    test = [] if test is None else test
    if not isinstance(test, list):
        raise DataError(
            f'{src}: "test" must be a list of image paths, got {_shown(test)}; '
            'write "test": ["./imagesTs/x.nii.gz", ...] or leave it out'
        )
    test_images = [
        str(folder.contained(_test_path(src, t), where=f'{src}: "test" entry {i}'))
        for i, t in enumerate(test)
    ]
    labels = meta.get("labels")
    return SiteDataset(
        root=root,
        name=root.name,
        cases=cases,
        label_names=_parse_label_names(labels, src),
        layout="msd",
        test_images=test_images,
        labels_declared=labels is not None,
    )


def _load_pairs(folder: SiteFolder) -> SiteDataset:
    root = folder.root
    shown = printable(root)
    if not any(root.iterdir()):
        raise DataError(
            f"{shown}: empty folder; expected {DATASET_JSON} with imagesTr/ and labelsTr/, "
            "or *_img.nii.gz/*_seg.nii.gz pairs"
        )
    if (root / "imagesTr").is_dir():
        raise DataError(
            f"{shown}/{DATASET_JSON}: not found, but imagesTr/ is there; add the Medical "
            'Segmentation Decathlon dataset.json listing the "training" image/label pairs'
        )
    files = sorted(p for p in root.iterdir() if is_nifti(p) and p.is_file())
    for path in files:
        folder.check_link(path)
    images = {case_id_from_path(p): p for p in files if _stem(p).endswith(_IMG_SUFFIX)}
    labels = {case_id_from_path(p): p for p in files if _stem(p).endswith(_SEG_SUFFIX)}
    if not images and not labels:
        raise DataError(
            f"{shown}: unknown layout: no {DATASET_JSON} and no *_img.nii.gz/*_seg.nii.gz pairs; "
            "add a dataset.json (Medical Segmentation Decathlon layout) or rename the files"
        )
    cases = []
    for case_id in sorted(images.keys() | labels.keys()):
        image = images.get(case_id, root / f"{case_id}{_IMG_SUFFIX}.nii.gz")
        label = labels.get(case_id, root / f"{case_id}{_SEG_SUFFIX}.nii.gz")
        cases.append({"image": str(image), "label": str(label), "case_id": case_id})
    return SiteDataset(
        root=root,
        name=root.name,
        cases=cases,
        label_names=dict(DEFAULT_LABEL_NAMES),
        layout="pairs",
        labels_declared=False,
    )


def _parse_label_names(labels: Any, src: str) -> dict[int, str]:
    if labels is None:
        return dict(DEFAULT_LABEL_NAMES)
    example = '{"0": "background", "1": "lesion"}'
    if not isinstance(labels, dict) or not labels:
        raise DataError(f'{src}: "labels" must be an object such as {example}')
    inverted = all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values())
    pairs = [(v, k) for k, v in labels.items()] if inverted else list(labels.items())
    names: dict[int, str] = {}
    for value, name in pairs:
        number = value if isinstance(value, int) else _int_or_none(value)
        if number is None or not isinstance(name, str):
            raise DataError(
                f'{src}: "labels" keys must be integer label values mapped to names, '
                f"such as {example}; got {_shown(value)}: {_shown(name)}"
            )
        if not 0 <= number <= _MAX_LABEL_VALUE:
            raise DataError(
                f'{src}: "labels" value {number} is outside 0..{_MAX_LABEL_VALUE}; label '
                "files hold class numbers 0-255"
            )
        names[number] = name
    return names


def _int_or_none(text: str) -> int | None:
    try:
        return int(text, 10)
    except ValueError:
        return None


def _shown(value: Any) -> str:
    return printable(json.dumps(value)[:120])


def _test_path(src: str, entry: Any) -> str:
    if isinstance(entry, str) and entry:
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("image"), str):
        return entry["image"]
    raise DataError(f'{src}: "test" entries must be paths, got {_shown(entry)}')


def _reject_duplicate_ids(cases: list[dict[str, str]], src: str) -> None:
    seen: dict[str, str] = {}
    for case in cases:
        if case["case_id"] in seen:
            raise DataError(
                f"{src}: case id {printable(repr(case['case_id']))} appears twice "
                f"({printable(seen[case['case_id']])} and {printable(case['image'])}); give "
                "each training image a unique file name"
            )
        seen[case["case_id"]] = case["image"]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _describe_source(dataset: SiteDataset) -> str:
    return str(dataset.root / DATASET_JSON) if dataset.layout == "msd" else str(dataset.root)
