"""Findings on synthetic volumes with an anisotropic, rotated affine: volumes, centroids, peaks, ranks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from anomaly.atlas import available_atlases, load_atlas
from anomaly.findings import NO_ATLAS_NOTE, NOT_MNI_NOTE, extract_findings

SHAPE = (40, 40, 40)


def _ball(centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _affine() -> np.ndarray:
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-31.0, 12.5, -40.0]
    return affine


def _scene() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    parts = {
        "big": _ball((12, 12, 12), 5),
        "hot": _ball((28, 28, 10), 3),
        "corners": np.zeros(SHAPE, bool),
        "line21": np.zeros(SHAPE, bool),
        "line20": np.zeros(SHAPE, bool),
    }
    parts["corners"][30:33, 5:8, 30:33] = True
    parts["corners"][33:36, 8:11, 33:36] = True  # touches the first cube at one corner only
    parts["line21"][2, 2:23, 38] = True
    parts["line20"][38, 2:22, 2] = True
    mask = np.zeros(SHAPE, bool)
    for part in parts.values():
        mask |= part
    score = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
    score[parts["big"]] += 5.0
    score[12, 13, 12] = 9.0
    score[parts["hot"]] += 7.0
    score[28, 27, 11] = 12.0
    score[parts["corners"]] += 2.0
    return score, mask, parts


def test_findings_measured_in_world_units() -> None:
    score, mask, parts = _scene()
    affine = _affine()
    voxel_ml = 0.8 * 1.2 * 2.5 / 1000
    findings = extract_findings(score, mask, affine, min_volume_ml=0.05)
    assert [f.n_voxels for f in findings] == [int(parts[k].sum()) for k in ("hot", "big", "corners", "line21")]
    assert [f.rank for f in findings] == [1, 2, 3, 4]
    assert [f.peak for f in findings][:2] == [12.0, 9.0]  # ranked by peak, highest first
    for finding, key in zip(findings, ("hot", "big", "corners", "line21"), strict=True):
        voxels = np.argwhere(parts[key])
        assert finding.volume_ml == pytest.approx(voxels.shape[0] * voxel_ml, rel=1e-12)
        expected_centroid = affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3]
        np.testing.assert_allclose(finding.centroid, expected_centroid, atol=1e-9)
        assert finding.mean == pytest.approx(float(score[parts[key]].astype(np.float64).mean()))
        peak_voxel = voxels[np.argmax(score[tuple(voxels.T)])]
        np.testing.assert_allclose(finding.peak_position, affine[:3, :3] @ peak_voxel + affine[:3, 3], atol=1e-9)
        assert finding.region_centroid is None and finding.region_majority is None and finding.atlas is None
        assert finding.note == NOT_MNI_NOTE
    np.testing.assert_allclose(findings[0].peak_position, affine[:3, :3] @ [28, 27, 11] + affine[:3, 3])


def test_minimum_volume_and_max_findings() -> None:
    score, mask, parts = _scene()
    affine = _affine()
    sizes = {f.n_voxels for f in extract_findings(score, mask, affine, min_volume_ml=0.05)}
    assert 21 in sizes and 20 not in sizes  # 21 * 0.0024 mL reaches 0.05 mL, 20 voxels do not
    everything = extract_findings(score, mask, affine, min_volume_ml=0.0)
    assert len(everything) == 5
    top = extract_findings(score, mask, affine, max_findings=1)
    assert len(top) == 1 and top[0].rank == 1 and top[0].peak == 12.0
    assert extract_findings(score, np.zeros(SHAPE, bool), affine) == []
    assert extract_findings(score, mask, affine, min_volume_ml=10.0) == []
    assert extract_findings(score, mask, affine, in_mni=True)[0].note == NO_ATLAS_NOTE


def test_to_dict_keys_and_errors() -> None:
    score, mask, _ = _scene()
    row = extract_findings(score, mask, _affine())[0].to_dict()
    assert list(row) == ["rank", "n_voxels", "volume_ml", "centroid_x", "centroid_y", "centroid_z", "peak_x",
                         "peak_y", "peak_z", "peak", "mean", "region_centroid", "region_majority", "atlas"]
    with pytest.raises(ValueError, match="same shape"):
        extract_findings(score, mask[:-1], _affine())
    bad = score.copy()
    bad[12, 12, 12] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        extract_findings(bad, mask, _affine())


@pytest.mark.skipif("aal" not in available_atlases(), reason="mricron-data (atlases) not installed")
def test_regions_named_only_in_mni_space() -> None:
    target = np.array([-39.0, -6.0, 51.0])  # left precentral gyrus in MNI space
    affine = np.eye(4)
    affine[:3, 3] = target - 20.0  # voxel (20, 20, 20) sits on the target
    mask = _ball((20, 20, 20), 3)  # 123 voxels of 1 mm^3
    score = mask.astype(np.float32)
    atlas = load_atlas("aal")
    [finding] = extract_findings(score, mask, affine, atlas=atlas, in_mni=True)
    assert finding.region_centroid == "Precentral_L" and finding.atlas == "aal" and finding.note is None
    # majority, recomputed from the atlas file directly
    image = nib.load(str(atlas.path))
    data = np.asarray(image.dataobj)
    world = nib.affines.apply_affine(affine, np.argwhere(mask))
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(image.affine), world)).astype(int)
    values = data[tuple(ijk.T)]
    assert finding.region_majority == atlas.labels.get(int(np.bincount(values).argmax()), "outside atlas")
    [native] = extract_findings(score, mask, affine, atlas=atlas, in_mni=False)
    assert native.region_centroid is None and native.note == NOT_MNI_NOTE
