"""Seeded fuzzing of real NIfTI files: mutated header fields, bytes, truncations and gzip members.

Contract for every case, scored in one batch beside good scans: a map on the input's own grid and
affine, or a ``failed`` row whose reason is one line naming the file; memory bounded; the good scans
of the batch intact. ``ANOMALY_FUZZ_CASES`` sets the number of cases (default 40), ``ANOMALY_FUZZ_SEED``
the seed (default 12).
"""

from __future__ import annotations

import csv
import gzip
import os
import struct
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.config import load_scoring_settings
from anomaly.models import load_model
from anomaly.store import open_store
from anomaly.volume import VolumeError, load_volume
from pipelines.batch import score_batch
from tests.conftest import phantom

N_CASES = int(os.environ.get("ANOMALY_FUZZ_CASES", "40"))
SEED = int(os.environ.get("ANOMALY_FUZZ_SEED", "12"))
BUDGET = 256 << 20

# NIfTI-1 header fields: (byte offset, struct format, count)
FIELDS: dict[str, tuple[int, str, int]] = {
    "dim": (40, "h", 8), "datatype": (70, "h", 1), "bitpix": (72, "h", 1), "pixdim": (76, "f", 8),
    "vox_offset": (108, "f", 1), "scl_slope": (112, "f", 1), "scl_inter": (116, "f", 1),
    "xyzt_units": (123, "B", 1), "qform_code": (252, "h", 1), "sform_code": (254, "h", 1),
    "quatern": (256, "f", 6), "srow": (280, "f", 12), "magic": (344, "4s", 1),
}
INT_VALUES = (0, 1, -1, 2, 3, 4, 7, 8, 16, 64, 255, 256, 512, 1400, 2048, 4096, 32767, -32768)
FLOAT_VALUES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-6, 1e-30, 3.0, 9.99, 10.5, 1e6, 1e30, float("nan"), float("inf"),
                float("-inf"), 352.0, 351.0, 353.5, 1e9)
DATATYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999, -4)


def _base_images() -> dict[str, bytes]:
    """Uncompressed NIfTI-1 bytes of three good scans: float32 RAS, int16 LAS with a slope, uint8 oblique."""
    brain = phantom((40, 48, 36), seed=7)
    ras = np.diag([3.0, 3.0, 3.0, 1.0])
    las = np.diag([-3.0, 3.0, 3.0, 1.0])
    las[:3, 3] = (60.0, -70.0, -50.0)
    angle = np.deg2rad(12)
    oblique = ras.copy()
    oblique[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) * 3
    images = {}
    float_img = nib.Nifti1Image(brain, ras)
    images["f32"] = float_img.to_bytes()
    int_img = nib.Nifti1Image(np.round(brain[::-1] / 2.5).astype(np.int16), las)
    int_img.header.set_slope_inter(2.5, 1.0)
    images["i16"] = int_img.to_bytes()
    images["u8"] = nib.Nifti1Image(np.clip(brain, 0, 255).astype(np.uint8), oblique).to_bytes()
    return images


def _set_field(raw: bytearray, name: str, rng: np.random.Generator) -> str:
    offset, fmt, count = FIELDS[name]
    index = int(rng.integers(count))
    if fmt == "4s":
        value: object = bytes(rng.choice([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"n+1 "]))
    elif name == "datatype":
        value = int(rng.choice(DATATYPES))
    elif fmt in ("h", "B"):
        value = int(rng.choice(INT_VALUES))
        if fmt == "B":
            value %= 256
    else:
        value = float(rng.choice(FLOAT_VALUES))
    size = struct.calcsize(fmt)
    at = offset + index * size
    raw[at:at + size] = struct.pack("<" + fmt, value)
    return f"{name}[{index}]={value!r}"


def _mutate(base: bytes, rng: np.random.Generator) -> tuple[bytes, bool, str]:
    """One mutated file: (bytes, gzip it?, description)."""
    raw = bytearray(base)
    gz = bool(rng.integers(2))
    kind = str(rng.choice(["field", "field", "field", "fields", "flip", "truncate", "gzip"]))
    if kind == "field":
        return bytes(raw), gz, _set_field(raw, str(rng.choice(list(FIELDS))), rng)
    if kind == "fields":
        names = rng.choice(list(FIELDS), size=3, replace=False)
        return bytes(raw), gz, ",".join(_set_field(raw, str(n), rng) for n in names)
    if kind == "flip":
        spots = rng.integers(0, len(raw), size=int(rng.integers(1, 40)))
        for spot in spots:
            raw[int(spot)] = int(rng.integers(256))
        return bytes(raw), gz, f"flip {len(spots)} bytes"
    if kind == "truncate":
        cut = int(rng.integers(0, len(raw)))
        return bytes(raw[:cut]), gz, f"truncate at {cut}"
    packed = gzip.compress(bytes(raw), compresslevel=1)
    choice = int(rng.integers(5))
    if choice == 0:  # a second, valid member with extra data
        return packed + gzip.compress(b"\0" * int(rng.integers(1, 1 << 16))), False, "extra gzip member"
    if choice == 1:  # the stream split into two members at a random point
        cut = int(rng.integers(1, len(raw)))
        return gzip.compress(bytes(raw[:cut])) + gzip.compress(bytes(raw[cut:])), False, f"two members at {cut}"
    if choice == 2:
        cut = int(rng.integers(10, len(packed)))
        return packed[:cut], False, f"gzip cut at {cut}"
    if choice == 3:
        damaged = bytearray(packed)
        for spot in rng.integers(10, len(damaged), size=5):
            damaged[int(spot)] ^= 0xFF
        return bytes(damaged), False, "gzip bytes flipped"
    return packed + bytes(rng.integers(0, 256, size=64, dtype=np.uint8)), False, "garbage after gzip"


def _cases(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(SEED)
    bases = _base_images()
    described: dict[str, str] = {}
    for i in range(N_CASES):
        base_name = str(rng.choice(list(bases)))
        data, gz, what = _mutate(bases[base_name], rng)
        while data == bases[base_name]:  # a field set to the value it had: not a mutation
            data, gz, what = _mutate(bases[base_name], rng)
        compressed = gz or data[:2] == b"\x1f\x8b"
        name = f"case{i:03d}_{base_name}.nii" + (".gz" if compressed else "")
        (folder / name).write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
        described[name] = f"{base_name}: {what}"
    return described


@pytest.mark.timeout(600)
def test_mutated_nifti_files_get_a_map_on_their_grid_or_a_one_line_reason(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    described = _cases(folder)
    good: dict[str, tuple[int, ...]] = {}
    for name, raw in _base_images().items():
        path = folder / f"good_{name}.nii.gz"
        path.write_bytes(gzip.compress(raw, compresslevel=1))
        good[path.name] = nib.load(path).shape
    store = open_store(tmp_path / "r.db")
    table = tmp_path / "rows.csv"
    cpu = time.process_time()
    tracemalloc.start()
    try:
        settings = load_scoring_settings(preprocess={"spacing": [2.0, 2.0, 2.0], "slice_size": 128},
                                         save_reconstruction=False)  # a coarse model grid keeps it quick
        summary = score_batch([folder], tmp_path / "out", load_model("intensity"), store, settings,
                              csv_path=table, progress=False, max_bytes=BUDGET)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        store.close()
    assert peak < 4 * BUDGET, f"peak traced memory {peak >> 20} MB"
    with open(table, newline="") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert set(rows) == set(described) | set(good)
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    for name, row in rows.items():
        what = described.get(name, "good scan")
        counts[row["status"]] += 1
        if row["status"] == "failed":
            assert row["error"].startswith(str(folder / name)), (what, row["error"])
            assert "\n" not in row["error"] and "Traceback" not in row["error"], (what, row["error"])
            assert row["map_path"] == "", what
        elif row["status"] == "skipped":
            assert "same content" in row["error"], (what, row)
        else:
            assert row["status"] == "ok", (what, row)
            try:
                volume = load_volume(folder / name, max_bytes=BUDGET)
            except VolumeError as exc:  # pragma: no cover - would be a contract break
                raise AssertionError(f"{what}: scored ok but does not load: {exc}") from None
            amap = nib.load(row["map_path"])
            assert amap.shape == volume.shape, what
            np.testing.assert_allclose(amap.affine, volume.affine, atol=1e-3, err_msg=what)
            assert np.isfinite(np.asarray(amap.dataobj)).all(), what
    for name, shape in good.items():
        assert rows[name]["status"] == "ok", rows[name]
        assert nib.load(rows[name]["map_path"]).shape == shape
    assert counts["failed"] > 0 and counts["ok"] > len(good)  # the mutations reach both outcomes
    assert summary.count("ok") == counts["ok"]
    print(f"fuzz: {N_CASES} cases, seed {SEED}: {counts}; peak traced memory {peak >> 20} MB; "
          f"{time.process_time() - cpu:.1f} s CPU")
