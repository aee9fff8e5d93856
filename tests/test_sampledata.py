"""Tests for sample data: real template brains, lesion copies with matching labels, healthy variants."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from anomaly.fileio import FILE_MODE
from anomaly.sampledata import (
    COLIN_NAME,
    MNI_NAME,
    colin27_path,
    healthy_variants,
    load_mni152_brain,
    make_sample_data,
)
from anomaly.volume import Volume, load_mask, load_volume


def test_make_sample_data_writes_brains_lesions_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "sample"
    has_colin = colin27_path() is not None
    manifest = make_sample_data(out, include_colin=True, n_lesion_copies=1, seed=0)

    names = [MNI_NAME, COLIN_NAME] if has_colin else [MNI_NAME]
    assert [p.name for p in manifest.healthy] == [f"{n}.nii.gz" for n in names]
    assert [p.name for p in manifest.lesions] == [f"{n}_lesion1.nii.gz" for n in names]
    assert [p.name for p in manifest.labels] == [p.name for p in manifest.lesions]
    assert all(p.parent.name == "labels" for p in manifest.labels)
    if has_colin:
        assert {p.name for p in manifest.evaluation_only} == {"colin27_t1.nii.gz", "colin27_t1_lesion1.nii.gz"}
        assert "EVALUATION ONLY" in manifest.readme.read_text()
    else:
        assert any("Colin27 skipped" in note for note in manifest.notes)

    readme = manifest.readme.read_text()
    assert "nilearn" in readme and "labels/<name>_lesion<k>.nii.gz" in readme
    for healthy_path, lesion_path, label_path in zip(manifest.healthy, manifest.lesions, manifest.labels,
                                                     strict=True):
        healthy = load_volume(healthy_path)
        assert healthy.spacing == (1.0, 1.0, 1.0)
        brain = healthy.data > 0
        assert 0.1 < brain.mean() < 0.4, "a skull-stripped brain in a zero background"
        assert healthy.data[0, 0, 0] == 0 and healthy.data[-1, -1, -1] == 0
        assert (healthy_path.stat().st_mode & 0o777) == FILE_MODE

        lesioned = load_volume(lesion_path)
        np.testing.assert_allclose(lesioned.affine, healthy.affine)
        assert nib.load(str(label_path)).get_data_dtype() == np.uint8
        truth = load_mask(label_path, like=lesioned)
        labelled, count = ndimage.label(truth)
        assert count >= 3, "three lesions per copy"
        assert not (truth & ~brain).any(), "lesions lie inside the brain"
        changed = lesioned.data != healthy.data
        # the soft edge spans 0.35 x the radius (up to 4.2 mm); the label marks its inner half
        assert not (changed & ~ndimage.binary_dilation(truth, iterations=5)).any()
        assert np.abs(lesioned.data - healthy.data)[truth].mean() > 5
        # T1 sample lesions are darker than the brain's normal tissue (what a T1 map looks for)
        assert np.median(lesioned.data[truth]) < np.percentile(healthy.data[brain], 5)

    np.testing.assert_array_equal(load_volume(manifest.healthy[0]).data, load_mni152_brain()[0].data)

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = make_sample_data(out, include_colin=True, n_lesion_copies=1, seed=0)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps, "nothing rewritten"
    assert not list(out.rglob(".*")), "no temporary files left behind"


@pytest.fixture(scope="module")
def small_brain() -> Volume:
    volume = load_mni152_brain()[0]
    affine = volume.affine.copy()
    affine[:3, :3] *= 3
    return Volume(data=np.ascontiguousarray(volume.data[::3, ::3, ::3]), affine=affine)


def test_healthy_variants_are_distinct_plausible_and_deterministic(small_brain: Volume) -> None:
    variants = healthy_variants(small_brain, 3, seed=5)
    assert len(variants) == 3
    template = small_brain.data
    brain = template > 0
    for variant in variants:
        assert variant.shape == template.shape and variant.dtype == np.float32
        assert variant.min() >= 0
        assert not np.array_equal(variant, template)
        inside = brain & (variant > 0)
        # the same anatomy (a brain flipped front to back correlates about 0.3 with itself)
        assert np.corrcoef(variant[inside], template[inside])[0, 1] > 0.7
        assert abs(int((variant > 0).sum()) - int(brain.sum())) < 0.2 * brain.sum()
    assert not np.array_equal(variants[0], variants[1])
    for first, second in zip(variants, healthy_variants(small_brain, 3, seed=5), strict=True):
        np.testing.assert_array_equal(first, second)
    with pytest.raises(ValueError, match="empty"):
        healthy_variants(Volume(data=np.zeros((10, 10, 10), np.float32), affine=np.eye(4)), 1)
