"""The salt under which patient names and IDs from DICOM headers are hashed before anything is stored.

``$ANOMALY_PATIENT_SALT`` when set (give every machine that shares a database the same value, so one
patient keeps one hash); otherwise a random secret kept in ``$XDG_CONFIG_HOME/anomaly/patient-salt``
(``~/.config/anomaly/patient-salt``), created on first use and readable by its owner only. The salt
never goes into the database, so the stored hashes cannot be matched against a list of IDs there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ENV_VAR = "ANOMALY_PATIENT_SALT"


def salt_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "anomaly" / "patient-salt"


def patient_salt() -> bytes:
    """The salt of this user (see the module docstring); created when missing."""
    value = os.environ.get(ENV_VAR, "")
    if value:
        return value.encode("utf-8")
    path = salt_file()
    try:
        data = path.read_bytes().strip()
        if data:
            return data
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32).encode("ascii")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(token)
    return token
