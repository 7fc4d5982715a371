"""Reading and writing scans: NIfTI with geometry (headers checked before any voxel is read),
the MSD layout inside a bounded site folder, the site data check."""

from fedmed.io.check import (
    DEFAULT_AFFINE_ATOL,
    Problem,
    check_case,
    check_image,
    check_site_folder,
    ensure_case_ok,
    header_problems,
    value_problems,
)
from fedmed.io.folder import MAX_DATASET_JSON_BYTES, MAX_JSON_DEPTH, SiteFolder
from fedmed.io.header import (
    DEFAULT_MAX_IMAGE_BYTES,
    NiftiHeader,
    affine_problem,
    check_memory,
    open_stream,
    parse_header,
    regular_file_size,
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
    "DEFAULT_MAX_IMAGE_BYTES",
    "MAX_DATASET_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "NIFTI_SUFFIXES",
    "NiftiHeader",
    "NiftiVolume",
    "Problem",
    "SiteDataset",
    "SiteFolder",
    "affine_problem",
    "case_id_from_path",
    "check_case",
    "check_image",
    "check_memory",
    "check_site_folder",
    "ensure_case_ok",
    "header_problems",
    "is_nifti",
    "load_site_dataset",
    "open_stream",
    "parse_header",
    "patient_id",
    "read_nifti",
    "read_nifti_header",
    "regular_file_size",
    "split_cases",
    "value_problems",
    "write_nifti",
]
