"""Application layer: the ``anomaly`` command line, batch scoring, training and calibration."""
