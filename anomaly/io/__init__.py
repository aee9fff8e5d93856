"""Readers of the field's formats beside loose NIfTI files (``anomaly.volume``): DICOM series
(:mod:`anomaly.io.dicom`) and BIDS datasets with their derivatives (:mod:`anomaly.io.bids`)."""

from __future__ import annotations
