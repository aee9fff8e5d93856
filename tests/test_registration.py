"""Registration to MNI152 with ANTsPy: a template moved by a known transform is found again, and every
map and coordinate comes back on the scan's own grid through the inverse."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_to_output

from anomaly.atlas import AtlasError, load_atlas
from anomaly.config import PreprocessConfig
from anomaly.findings import extract_findings
from anomaly.preprocess import InputSpec, prepare_scan, to_native
from anomaly.registration import Registration, mni152_template, mni152_template_path, register_to_mni
from anomaly.volume import Volume

pytest.importorskip("ants")

SPEC = InputSpec(slice_size=192, spacing=(1.0, 1.0, 1.0))


def _known_motion() -> np.ndarray:
    """A rigid motion (12 degrees about x, 8 about z, a few mm) that turns MNI into a 'native' space."""
    a, b = np.radians(12.0), np.radians(-8.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    motion = np.eye(4)
    motion[:3, :3] = rx @ rz
    motion[:3, 3] = [6.0, -9.0, 12.0]
    return motion


@pytest.fixture(scope="module")
def native_scan() -> tuple[Volume, np.ndarray]:
    """The nilearn MNI152 brain at 2 mm in LAS, moved by a known motion: a small real 'native' scan."""
    img = resample_to_output(nib.load(str(mni152_template_path())), voxel_sizes=(2.0, 2.0, 2.0), order=1)
    data = np.asarray(img.dataobj, dtype=np.float32)[::-1]
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    motion = _known_motion()
    affine = motion @ img.affine @ flip
    return Volume(data=np.ascontiguousarray(data), affine=affine), motion


@pytest.fixture(scope="module")
def affine_registration(native_scan: tuple[Volume, np.ndarray]) -> Registration:
    volume, _ = native_scan
    return register_to_mni(volume, volume.data > 0, transform="affine", grid_mm=2.0)


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return nib.affines.apply_affine(affine, ijk)


def test_affine_registration_finds_the_known_motion(native_scan: tuple[Volume, np.ndarray],
                                                    affine_registration: Registration) -> None:
    _, motion = native_scan
    mni = np.array([[0.0, 0.0, 0.0], [40.0, -20.0, 30.0], [-50.0, 30.0, -10.0], [0.0, -80.0, 20.0]])
    native = nib.affines.apply_affine(motion, mni)
    found = affine_registration.native_to_template_points(native)
    assert np.linalg.norm(found - mni, axis=1).max() < 2.0  # landmark error, mm
    assert affine_registration.overlap is not None and affine_registration.overlap > 0.95


def test_points_round_trip_to_1e4_mm(affine_registration: Registration) -> None:
    pts = np.array([[1.0, 2.0, 3.0], [-60.0, 40.0, 20.0], [33.3, -70.1, -25.2]])
    back = affine_registration.template_to_native_points(affine_registration.native_to_template_points(pts))
    np.testing.assert_allclose(back, pts, atol=1e-4)


def test_maps_come_back_on_the_native_grid_through_the_inverse(native_scan: tuple[Volume, np.ndarray],
                                                               affine_registration: Registration) -> None:
    """An image of MNI coordinates (linear, so linear resampling reproduces it exactly) taken back to the
    native grid holds, at each native voxel, the MNI position the point mapping gives: the inverse used for
    maps and the one used for finding coordinates agree to 1e-4 mm."""
    volume, _ = native_scan
    reg = affine_registration
    template_world = _world(reg.affine, reg.shape).reshape(*reg.shape, 3)
    back = np.stack([reg.to_native(template_world[..., k]) for k in range(3)], axis=-1)
    assert back.shape[:3] == volume.shape
    inside = volume.data > 0
    inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False
    ijk = np.argwhere(inside)[::50]
    expected = reg.native_to_template_points(nib.affines.apply_affine(volume.affine, ijk))
    np.testing.assert_allclose(back[tuple(ijk.T)], expected, atol=1e-4)


def test_prepared_scan_maps_return_to_the_input_grid(native_scan: tuple[Volume, np.ndarray]) -> None:
    volume, motion = native_scan
    prepared = prepare_scan(volume, PreprocessConfig(register="mni", skull_strip="skip"), SPEC)
    assert prepared.registration is not None and prepared.stages["register"] == "mni-affine"
    assert prepared.native_shape == volume.shape
    np.testing.assert_array_equal(prepared.native_affine, volume.affine)
    back = to_native(prepared.mask.astype(np.float32), prepared, mode="nearest") > 0.5
    assert back.shape == volume.shape
    brain = volume.data > 0
    assert 2 * (back & brain).sum() / (back.sum() + brain.sum()) > 0.9
    # the model grid is cut from the MNI grid: its world coordinates are MNI millimetres
    centre = nib.affines.apply_affine(prepared.affine, np.array(prepared.image.shape) / 2)
    assert np.linalg.norm(centre - nib.affines.apply_affine(mni152_template().affine,
                                                            np.array(mni152_template().data.shape) / 2)) < 40


def test_deformable_registration_inverts_within_half_a_millimetre(native_scan: tuple[Volume, np.ndarray]) -> None:
    volume, motion = native_scan
    reg = register_to_mni(volume, volume.data > 0, transform="deformable", grid_mm=2.0)
    assert reg.kind == "deformable" and len(reg.inv) == 2
    pts = nib.affines.apply_affine(motion, np.array([[0.0, 0.0, 0.0], [30.0, -40.0, 20.0], [-30.0, 20.0, 10.0]]))
    back = reg.template_to_native_points(reg.native_to_template_points(pts))
    assert np.linalg.norm(back - pts, axis=1).max() < 0.5
    assert reg.overlap is not None and reg.overlap > 0.95


def test_findings_of_a_native_scan_get_atlas_regions(native_scan: tuple[Volume, np.ndarray],
                                                     affine_registration: Registration) -> None:
    try:
        atlas = load_atlas("aal")
    except AtlasError:
        pytest.skip("atlases not installed (mricron-data)")
    volume, motion = native_scan
    target_mni = np.array([-38.0, -20.0, 50.0])  # left precentral gyrus in MNI space
    centre = nib.affines.apply_affine(np.linalg.inv(volume.affine), nib.affines.apply_affine(motion, target_mni))
    ijk = np.argwhere(np.ones(volume.shape, bool))
    blob = (np.linalg.norm(ijk - centre, axis=1) <= 2.5).reshape(volume.shape)
    score = blob.astype(np.float32)
    plain = extract_findings(score, blob, volume.affine, atlas=atlas, in_mni=False)
    assert plain[0].region_centroid is None
    found = extract_findings(score, blob, volume.affine, atlas=atlas, in_mni=True,
                             to_atlas=affine_registration.native_to_template_points)
    assert found[0].region_centroid == atlas.label_at(target_mni)
    assert found[0].region_centroid not in (None, "outside atlas")
    # the reported coordinates stay the scan's own
    np.testing.assert_allclose(found[0].centroid, plain[0].centroid)
