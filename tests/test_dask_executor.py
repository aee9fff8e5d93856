"""Batch scoring through a real local Dask cluster gives the same results as the local executor."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main
from tests.conftest import phantom, write_nifti

pytest.importorskip("distributed")


def test_dask_cluster_matches_local_executor(tmp_path: Path, tiny_vae_folder: Path) -> None:
    for i in range(4):
        write_nifti(tmp_path / "in" / f"s{i}.nii.gz", phantom(seed=i, lesion=i % 2 == 1))
    (tmp_path / "in" / "broken.nii.gz").write_text("not an image")
    common = [str(tmp_path / "in"), "--model", str(tiny_vae_folder), "--quiet"]
    assert main(["score", *common, "--out", str(tmp_path / "local"), "--db", str(tmp_path / "l.db")]) == 1
    assert main(["score", *common, "--out", str(tmp_path / "dask"), "--db", str(tmp_path / "d.db"),
                 "--executor", "dask", "--workers", "2"]) == 1
    for i in range(4):
        a = np.asarray(nib.load(tmp_path / "local" / f"s{i}_anomaly.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "dask" / f"s{i}_anomaly.nii.gz").dataobj)
        np.testing.assert_allclose(a, b, atol=1e-5)
    con = sqlite3.connect(tmp_path / "d.db")
    rows = con.execute("select status, count(*) from results group by status order by status").fetchall()
    executor = con.execute("select executor from runs").fetchone()[0]
    con.close()
    assert rows == [("failed", 1), ("ok", 4)] and executor == "dask"
