"""Reading and writing scans: NIfTI with geometry, the MSD layout, the site data check."""

from fedmed.io.check import (
    DEFAULT_AFFINE_ATOL,
    Problem,
    check_case,
    check_image,
    check_site_folder,
    ensure_case_ok,
)
from fedmed.io.msd import (
    DATASET_JSON,
    DEFAULT_LABEL_NAMES,
    SiteDataset,
    case_id_from_path,
    load_site_dataset,
    patient_id,
    split_cases,
)
from fedmed.io.nifti import (
    NIFTI_SUFFIXES,
    NiftiVolume,
    is_nifti,
    read_nifti,
    read_nifti_header,
    write_nifti,
)

__all__ = [
    "DATASET_JSON",
    "DEFAULT_AFFINE_ATOL",
    "DEFAULT_LABEL_NAMES",
    "NIFTI_SUFFIXES",
    "NiftiVolume",
    "Problem",
    "SiteDataset",
    "case_id_from_path",
    "check_case",
    "check_image",
    "check_site_folder",
    "ensure_case_ok",
    "is_nifti",
    "load_site_dataset",
    "patient_id",
    "read_nifti",
    "read_nifti_header",
    "split_cases",
    "write_nifti",
]
