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

Example:
    >>> site = load_site_dataset("demo/data/site-A")
    >>> site.name, len(site.cases), site.label_names
    ('site-A', 6, {0: 'background', 1: 'lesion'})
    >>> train, val = split_cases(site.cases, val_fraction=0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.errors import ConfigError, DataError
from fedmed.io.nifti import NIFTI_SUFFIXES, is_nifti

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
    ``"msd"`` or ``"pairs"``; ``name`` is the folder's name (the site name).

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


def load_site_dataset(root: str | Path, *, require_files: bool = True) -> SiteDataset:
    """Read a site folder in the MSD or pairs layout.

    With ``require_files`` (the default) every listed image and label must exist; the data check
    passes ``False`` to collect missing files as problems instead. Raises :class:`DataError`
    naming the folder or ``dataset.json`` for an empty folder, an unknown layout, invalid JSON or
    malformed entries, and naming the file for a missing image or label.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataError(f"{root}: site data folder not found (or not a folder)")
    dataset = _load_msd(root) if (root / DATASET_JSON).exists() else _load_pairs(root)
    if require_files:
        for case in dataset.cases:
            for key in ("image", "label"):
                if not Path(case[key]).is_file():
                    raise DataError(
                        f"{case[key]}: {key} of case {case['case_id']} not found; fix the path "
                        f"in {_describe_source(dataset)} or restore the file"
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


def _load_msd(root: Path) -> SiteDataset:
    json_path = root / DATASET_JSON
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{json_path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{json_path}: cannot read the file ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(f"{json_path}: expected a JSON object at the top level")
    training = meta.get("training")
    if not isinstance(training, list):
        raise DataError(
            f'{json_path}: missing "training" list of {{"image": ..., "label": ...}} entries'
        )
    if not training:
        raise DataError(f'{json_path}: "training" is empty; list the labelled cases')
    cases = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry.get(k) for k in ("image", "label")
        ):
            raise DataError(
                f'{json_path}: "training" entry {index} must be {{"image": "./imagesTr/x.nii.gz",'
                f' "label": "./labelsTr/x.nii.gz"}}, got {json.dumps(entry)[:120]}'
            )
        image, label = _resolve(root, entry["image"]), _resolve(root, entry["label"])
        case_id = str(entry.get("case_id") or case_id_from_path(image))
        cases.append({"image": str(image), "label": str(label), "case_id": case_id})
    _reject_duplicate_ids(cases, json_path)
    test_images = [str(_resolve(root, _test_path(json_path, t))) for t in meta.get("test") or []]
    return SiteDataset(
        root=root,
        name=root.name,
        cases=cases,
        label_names=_parse_label_names(meta.get("labels"), json_path),
        layout="msd",
        test_images=test_images,
    )


def _load_pairs(root: Path) -> SiteDataset:
    if not any(root.iterdir()):
        raise DataError(
            f"{root}: empty folder; expected {DATASET_JSON} with imagesTr/ and labelsTr/, "
            "or *_img.nii.gz/*_seg.nii.gz pairs"
        )
    if (root / "imagesTr").is_dir():
        raise DataError(
            f"{root / DATASET_JSON}: not found, but imagesTr/ is there; add the Medical "
            'Segmentation Decathlon dataset.json listing the "training" image/label pairs'
        )
    files = sorted(p for p in root.iterdir() if p.is_file() and is_nifti(p))
    images = {case_id_from_path(p): p for p in files if _stem(p).endswith(_IMG_SUFFIX)}
    labels = {case_id_from_path(p): p for p in files if _stem(p).endswith(_SEG_SUFFIX)}
    if not images and not labels:
        raise DataError(
            f"{root}: unknown layout: no {DATASET_JSON} and no *_img.nii.gz/*_seg.nii.gz pairs; "
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
    )


def _parse_label_names(labels: Any, json_path: Path) -> dict[int, str]:
    if labels is None:
        return dict(DEFAULT_LABEL_NAMES)
    if not isinstance(labels, dict) or not labels:
        raise DataError(
            f'{json_path}: "labels" must be an object such as {{"0": "background", "1": "lesion"}}'
        )
    try:
        if all(isinstance(v, int) for v in labels.values()):  # nnU-Net v2: {"background": 0}
            return {int(v): str(k) for k, v in labels.items()}
        return {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError) as err:
        raise DataError(
            f'{json_path}: "labels" keys must be integer label values, got {list(labels)}'
        ) from err


def _test_path(json_path: Path, entry: Any) -> str:
    if isinstance(entry, str) and entry:
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("image"), str):
        return entry["image"]
    raise DataError(f'{json_path}: "test" entries must be paths, got {json.dumps(entry)[:120]}')


def _resolve(root: Path, relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else (root / path).resolve(strict=False)


def _reject_duplicate_ids(cases: list[dict[str, str]], json_path: Path) -> None:
    seen: dict[str, str] = {}
    for case in cases:
        if case["case_id"] in seen:
            raise DataError(
                f"{json_path}: case id {case['case_id']!r} appears twice ({seen[case['case_id']]}"
                f" and {case['image']}); give each training image a unique file name"
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
