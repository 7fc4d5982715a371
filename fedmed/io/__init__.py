"""Reading and writing scans: NIfTI with geometry, the MSD layout, the site data check."""
