"""Hostile and odd inputs: headers that promise more than the file holds, gzip bombs, special files,
broken links, folders named like scans, .hdr/.img pairs and disagreeing orientations."""

from __future__ import annotations

import csv
import gzip
import json
import os
import sqlite3
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.fileio import NotRegularFileError
from anomaly.volume import VolumeError, file_sha256, load_volume
from pipelines.batch import find_inputs
from pipelines.cli import main
from tests.conftest import REPO, child_env, phantom, write_nifti

GOOD_AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def _header_only(path: Path, shape: tuple[int, ...], dtype: type = np.float32) -> Path:
    """A .nii.gz holding only a header (and 4 padding bytes) that declares ``shape`` voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4, compresslevel=9))
    return path


def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(VolumeError) as info:
        load_volume(path, **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    return info.value.reason


def test_header_declaring_1400_cubed_is_refused_before_allocating(tmp_path: Path) -> None:
    bomb = _header_only(tmp_path / "bomb.nii.gz", (1400, 1400, 1400))
    assert bomb.stat().st_size < 100
    tracemalloc.start()
    try:
        reason = _reason(bomb, max_bytes=1 << 40)  # even with no memory budget at all
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "more than a" in reason and "can hold" in reason
    assert peak < 16 << 20


def test_memory_budget_refuses_a_volume_before_reading(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "big.nii.gz", phantom((64, 64, 64)))
    assert "budget" in _reason(path, max_bytes=512 << 10)
    assert load_volume(path, max_bytes=4 << 20).shape == (64, 64, 64)


def test_gzip_stream_longer_than_the_header_says_is_refused_after_a_bounded_read(tmp_path: Path) -> None:
    header = nib.Nifti1Image(phantom((16, 16, 16)), np.eye(4)).to_bytes()
    path = tmp_path / "long.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header)
        block = bytes(1 << 22)
        for _ in range(8):  # 32 MB of zeros after the voxels
            handle.write(block)
    assert "after the voxel data" in _reason(path)


def test_vox_offset_inside_the_header_is_refused(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "v.nii", phantom((16, 16, 16)))
    raw = bytearray(path.read_bytes())
    raw[108:112] = np.float32(100).tobytes()
    path.write_bytes(bytes(raw))
    assert "vox_offset" in _reason(path)


@pytest.mark.timeout(60)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "p.nii.gz"
    os.mkfifo(fifo)
    assert "FIFO" in _reason(fifo)
    with pytest.raises(NotRegularFileError):
        file_sha256(fifo)


def test_qform_that_disagrees_on_left_right_warns(tmp_path: Path) -> None:
    image = nib.Nifti1Image(phantom((40, 48, 36)), GOOD_AFFINE)
    las = GOOD_AFFINE.copy()
    las[0, 0] = -3.0
    image.set_sform(GOOD_AFFINE, code=1)
    image.set_qform(las, code=1)
    nib.save(image, str(tmp_path / "q.nii.gz"))
    volume = load_volume(tmp_path / "q.nii.gz")
    np.testing.assert_allclose(volume.affine, GOOD_AFFINE)
    assert any("left-right" in w and "qform" in w for w in volume.warnings)
    same = nib.Nifti1Image(phantom((40, 48, 36)), GOOD_AFFINE)
    nib.save(same, str(tmp_path / "s.nii.gz"))
    assert not load_volume(tmp_path / "s.nii.gz").warnings


def _score_with_intensity(folder: Path, tmp_path: Path) -> tuple[int, dict[str, dict[str, str]]]:
    """``anomaly score FOLDER`` with the intensity model: the exit code and the CSV rows by file name."""
    table = tmp_path / "s.csv"
    code = main(["score", str(folder), "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db"), "--model",
                 "intensity", "--csv", str(table), "--quiet"])
    with open(table, newline="") as handle:
        return code, {Path(r["path"]).name: r for r in csv.DictReader(handle)}


def _odd_folder(root: Path) -> Path:
    write_nifti(root / "good.nii.gz", phantom((40, 48, 36)), GOOD_AFFINE)
    os.mkfifo(root / "p.nii.gz")
    (root / "gone.nii.gz").symlink_to(root / "missing.nii.gz")
    (root / "loop.nii.gz").symlink_to(root / "loop.nii.gz")
    (root / "folder.nii.gz").mkdir()
    write_nifti(root / "folder.nii.gz" / "inner.nii.gz", phantom((40, 48, 36), seed=5), GOOD_AFFINE)
    pair = nib.Nifti1Pair(phantom((40, 48, 36)), GOOD_AFFINE)
    nib.save(pair, str(root / "pair.hdr"))
    (root / "back").symlink_to(root)  # a link to a folder already being searched
    return root


@pytest.mark.timeout(120)
def test_every_skipped_entry_is_reported_and_the_good_scans_scored(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = _odd_folder(tmp_path / "in")
    found = find_inputs([folder])
    assert sorted(p.name for p in found.paths) == ["good.nii.gz", "inner.nii.gz"]
    reasons = {p.name: r for p, r in found.problems}
    assert "FIFO" in reasons["p.nii.gz"]
    assert "dangling" in reasons["gone.nii.gz"] and "loops" in reasons["loop.nii.gz"]
    assert ".hdr/.img pair" in reasons["pair.hdr"]
    notes = " ".join(found.notes)
    assert "folder.nii.gz" in notes and "already searched" in notes

    code, rows = _score_with_intensity(folder, tmp_path)
    assert code == 1
    assert rows["good.nii.gz"]["status"] == "ok" and rows["inner.nii.gz"]["status"] == "ok"
    for name in ("p.nii.gz", "gone.nii.gz", "loop.nii.gz", "pair.hdr"):
        assert rows[name]["status"] == "failed" and name in rows[name]["error"]
    err = capsys.readouterr().err
    assert "FIFO" in err and "folder.nii.gz" in err and "Traceback" not in err


def test_a_dangling_link_given_directly_does_not_stop_the_others(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", phantom((40, 48, 36)), GOOD_AFFINE)
    gone = tmp_path / "gone.nii.gz"
    gone.symlink_to(tmp_path / "nowhere.nii.gz")
    table = tmp_path / "s.csv"
    code = main(["score", str(gone), str(good), "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db"),
                 "--model", "intensity", "--csv", str(table), "--quiet"])
    assert code == 1
    rows = {Path(r["path"]).name: r["status"] for r in csv.DictReader(table.read_text().splitlines())}
    assert rows == {"gone.nii.gz": "failed", "good.nii.gz": "ok"}


@pytest.mark.timeout(300)
def test_bomb_beside_a_good_scan_costs_under_1_gb_and_the_good_scan_is_scored(tmp_path: Path) -> None:
    """The acceptance case, in a fresh process whose peak memory is measured by the kernel."""
    folder = tmp_path / "in"
    folder.mkdir()
    _header_only(folder / "bomb.nii.gz", (1400, 1400, 1400))
    write_nifti(folder / "good.nii.gz", phantom((40, 48, 36)), GOOD_AFFINE)
    os.mkfifo(folder / "p.nii.gz")
    script = (
        "import json, sys\n"
        "from pipelines.cli import main\n"
        "code = main(sys.argv[1:])\n"
        # VmHWM: this process's own peak; ru_maxrss would also count the forking test process's size
        "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(json.dumps({'code': code, 'peak_kb': hwm}))\n"
    )
    table = tmp_path / "s.csv"
    proc = subprocess.run([sys.executable, "-c", script, "score", str(folder), "--out", str(tmp_path / "out"),
                           "--db", str(tmp_path / "r.db"), "--model", "intensity", "--csv", str(table), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=280)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 1, proc.stderr
    assert result["peak_kb"] < 1024 * 1024, result
    assert "Traceback" not in proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(table.read_text().splitlines())}
    assert rows["good.nii.gz"]["status"] == "ok"
    assert rows["bomb.nii.gz"]["status"] == "failed" and "can hold" in rows["bomb.nii.gz"]["error"]
    assert rows["p.nii.gz"]["status"] == "failed" and "FIFO" in rows["p.nii.gz"]["error"]


def _annexed_dataset(root: Path) -> Path:
    """A folder laid out as datalad and git-annex keep one: each scan a relative link to a content key under
    .git/annex/objects, one of them not fetched (its link dangles)."""
    key = "MD5E-s1234--0123456789abcdef.nii.gz"
    store = root / ".git" / "annex" / "objects" / "Xx" / "Yy" / key
    store.mkdir(parents=True)
    write_nifti(store / key, phantom((40, 48, 36)), GOOD_AFFINE)
    (root / "sub-07_FLAIR.nii.gz").symlink_to(Path(".git/annex/objects/Xx/Yy") / key / key)
    missing = "MD5E-s99--fedcba9876543210.nii.gz"
    (root / "sub-08_FLAIR.nii.gz").symlink_to(Path(".git/annex/objects/Zz/Ww") / missing / missing)
    return root


def test_an_annexed_dataset_is_scored_under_the_links_names(tmp_path: Path) -> None:
    root = _annexed_dataset(tmp_path / "ds")
    found = find_inputs([root])
    assert [p.name for p in found.paths] == ["sub-07_FLAIR.nii.gz"]  # the link, not the content key
    assert found.paths[0].is_symlink() and found.paths[0].is_absolute()
    reasons = {p.name: r for p, r in found.problems}
    assert "git-annex" in reasons["sub-08_FLAIR.nii.gz"] and "datalad get" in reasons["sub-08_FLAIR.nii.gz"]
    assert any(".git" in note and "hidden folder" in note for note in found.notes)
    # the link and its target given together are one scan, named as first given
    target = found.paths[0].resolve()
    assert [p.name for p in find_inputs([found.paths[0], target]).paths] == ["sub-07_FLAIR.nii.gz"]

    code, rows = _score_with_intensity(root, tmp_path)
    assert code == 1  # the unfetched file failed, with its reason
    assert rows["sub-07_FLAIR.nii.gz"]["status"] == "ok"
    with sqlite3.connect(tmp_path / "r.db") as db:  # named and typed by the link's name, not the content key
        (name, details), = db.execute("SELECT scan_name, details FROM results WHERE status = 'ok'")
    assert name == "sub-07_FLAIR" and json.loads(details)["contrast"] == "flair"
    assert rows["sub-08_FLAIR.nii.gz"]["status"] == "failed" and "datalad get" in rows["sub-08_FLAIR.nii.gz"]["error"]
    assert (tmp_path / "out" / "sub-07_FLAIR_anomaly.nii.gz").is_file()
    with pytest.raises(VolumeError, match="git annex get"):
        load_volume(root / "sub-08_FLAIR.nii.gz")


def test_masks_and_label_maps_in_a_scan_folder_fail_with_where_they_belong(tmp_path: Path) -> None:
    folder = tmp_path / "case"
    scan = phantom((40, 48, 36), lesion=True)
    write_nifti(folder / "flair.nii.gz", scan, GOOD_AFFINE)
    write_nifti(folder / "t1_8bit.nii.gz", np.clip(scan, 0, 255).round(), GOOD_AFFINE, dtype=np.uint8)  # a scan
    write_nifti(folder / "lesion_mask.nii.gz", (scan > 150).astype(np.uint8), GOOD_AFFINE, dtype=np.uint8)
    tumour = np.select([scan > 150, scan > 90, scan > 50], [4, 2, 1], 0).astype(np.float32)  # BraTS labels 0/1/2/4
    write_nifti(folder / "seg.nii.gz", tumour, GOOD_AFFINE)
    code, rows = _score_with_intensity(folder, tmp_path)
    assert code == 1
    assert rows["flair.nii.gz"]["status"] == "ok" and rows["t1_8bit.nii.gz"]["status"] == "ok"
    assert "2 whole-number values: 0, 1" in rows["lesion_mask.nii.gz"]["error"]
    assert "4 whole-number values: 0, 1, 2, 4" in rows["seg.nii.gz"]["error"]
    for name in ("lesion_mask.nii.gz", "seg.nii.gz"):
        assert rows[name]["status"] == "failed" and "--labels" in rows[name]["error"]
