"""Tests of slice rendering: canonical orientation, plane extraction, window/level, overlays, crosshairs, PNG."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest

from anomaly import viz


def _affine(codes: str) -> np.ndarray:
    """A 1 mm affine with the given axis codes (e.g. 'LPS', 'RAS', 'ASL')."""
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    affine = np.zeros((4, 4))
    for i, (axis, flip) in enumerate(ornt):
        affine[int(axis), i] = flip
    affine[3, 3] = 1.0
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    return affine


@pytest.mark.parametrize("codes", ["RAS", "LAS", "LPS", "ASL", "PIR"])
def test_to_canonical_maps_every_voxel_to_the_same_world_point(codes: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    affine = _affine(codes)
    canon = viz.to_canonical(data, affine)
    assert "".join(nib.aff2axcodes(canon.affine)) == "RAS"
    assert not canon.data.flags.writeable
    for ijk in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
        world = (affine @ np.r_[ijk, 1.0])[:3]
        cijk = canon.world_to_voxel(world)
        assert canon.data[cijk] == data[ijk]
        assert np.allclose(canon.voxel_to_world(cijk), world)


def test_world_to_voxel_clips_points_outside_the_volume() -> None:
    canon = viz.to_canonical(np.zeros((4, 4, 4)), np.eye(4))
    assert canon.world_to_voxel((100.0, -100.0, 2.2)) == (3, 0, 2)


def test_planes_show_anterior_and_superior_at_the_top_and_left_on_the_left() -> None:
    data = np.zeros((10, 12, 14), dtype=np.float32)
    data[0, 11, 13] = 1.0  # left (x = 0), most anterior, most superior in RAS
    axial = viz.extract_slice(data, "axial", 13)
    coronal = viz.extract_slice(data, "coronal", 11)
    sagittal = viz.extract_slice(data, "sagittal", 0)
    assert axial.shape == viz.slice_shape(data.shape, "axial") == (12, 10)
    assert coronal.shape == (14, 10) and sagittal.shape == (14, 12)
    assert axial[0, 0] == 1.0  # top row = anterior, first column = left
    assert coronal[0, 0] == 1.0  # top row = superior
    assert sagittal[0, -1] == 1.0  # sagittal: anterior on the right
    for plane, picture in (("axial", axial), ("coronal", coronal), ("sagittal", sagittal)):
        assert picture[viz.voxel_to_pixel((0, 11, 13), data.shape, plane)] == 1.0


def test_extract_slice_refuses_bad_planes_and_indexes() -> None:
    data = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match="unknown plane"):
        viz.extract_slice(data, "oblique", 0)
    with pytest.raises(IndexError, match="outside 0..3"):
        viz.extract_slice(data, "axial", 4)


def test_window_level_round_trip_and_grey_mapping() -> None:
    low, high = viz.window_to_range(*viz.range_to_window(20.0, 220.0))
    assert (low, high) == pytest.approx((20.0, 220.0))
    grey = viz.apply_window(np.array([[0.0, 20.0, 120.0, 220.0, 500.0, np.nan]]), 20.0, 220.0)
    assert grey.dtype == np.uint8
    assert grey.tolist() == [[0, 0, 128, 255, 255, 0]]


def test_auto_window_ignores_zero_background() -> None:
    data = np.zeros((20, 20, 20), dtype=np.float32)
    data[5:15, 5:15, 5:15] = np.linspace(100, 200, 1000).reshape(10, 10, 10)
    low, high = viz.auto_window(data)
    assert 100 <= low < 105 and 195 < high <= 200


def test_overlay_colours_only_voxels_at_or_above_the_threshold() -> None:
    base = np.full((2, 3, 3), 50, dtype=np.uint8)
    values = np.array([[0.1, 0.5, 0.9], [0.49, 0.5, np.nan]], dtype=np.float32)
    out = viz.overlay(base, values, threshold=0.5, vmax=0.9, cmap="hot", opacity=1.0)
    shown = ~np.all(out == 50, axis=2)
    assert shown.tolist() == [[False, True, True], [False, True, False]]
    lut = viz.colormap_lut("hot")
    assert out[0, 2].tolist() == lut[255].tolist() and out[0, 1].tolist() == lut[0].tolist()
    half = viz.overlay(base, values, threshold=0.5, vmax=0.9, opacity=0.5)
    assert half[0, 2].tolist() == [int(0.5 * c + 25 + 0.5) for c in lut[255]]
    assert np.array_equal(viz.overlay(base, values, threshold=0.5, vmax=0.9, opacity=0.0), base)


def test_unknown_colour_map_is_named() -> None:
    with pytest.raises(ValueError, match="unknown colour map 'nope'"):
        viz.colormap_lut("nope")


def test_crosshair_leaves_a_gap_at_the_point() -> None:
    out = viz.draw_crosshair(np.zeros((21, 21, 3), np.uint8), 10, 10, color=(0, 255, 0), gap=2)
    green = out[..., 1] == 255
    assert green[10, 0] and green[10, 20] and green[0, 10] and green[20, 10]
    assert not green[10, 10] and not green[10, 12] and green[10, 13]


def test_outline_draws_the_border_only() -> None:
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    out = viz.outline(np.zeros((7, 7, 3), np.uint8), mask, color=(0, 0, 255))
    border = out[..., 2] == 255
    assert border.sum() == 8 and not border[3, 3]


def test_render_plane_respects_voxel_size_and_puts_the_crosshair_on_the_voxel() -> None:
    data = np.zeros((20, 10, 8), dtype=np.float32)
    data[5, 2, 4] = 100.0
    affine = np.diag([1.0, 2.0, 3.0, 1.0])  # anisotropic: 20 x 20 x 24 mm
    canon = viz.to_canonical(data, affine)
    values = viz.to_canonical(data / 100.0, affine)
    rgb = viz.render_plane(
        canon,
        "axial",
        4,
        window=(0.0, 100.0),
        overlay_map=values,
        style=viz.OverlayStyle(threshold=0.5, vmax=1.0),
        crosshair=(5, 2, 4),
        target=200,
    )
    assert rgb.shape == (200, 200, 3) and rgb.dtype == np.uint8  # 20 mm x 20 mm: square
    coronal = viz.render_plane(canon, "coronal", 2, window=(0.0, 100.0), target=240)
    assert coronal.shape == (240, 200, 3)  # 24 mm high, 20 mm wide
    row, col = viz.scale_point(*viz.voxel_to_pixel((5, 2, 4), canon.shape, "axial"), (10, 20), (200, 200))
    assert (
        rgb[row, col].tolist() == viz.colormap_lut("hot")[255].tolist()
    )  # the voxel itself, in the overlay colour
    assert rgb[row, 0].tolist() == [0, 255, 0] and rgb[0, col].tolist() == [0, 255, 0]


def test_render_plane_outlines_the_brain_mask_in_its_own_colour() -> None:
    data = np.zeros((20, 20, 5), dtype=np.float32)
    data[4:16, 4:16] = 50.0
    brain = np.zeros_like(data)
    brain[5:15, 5:15] = 1
    canon = viz.to_canonical(data, np.eye(4))
    rgb = viz.render_plane(canon, "axial", 2, window=(0.0, 100.0), brain=viz.to_canonical(brain, np.eye(4)),
                           target=20)
    orange = (rgb == np.array(viz.BRAIN_COLOR, np.uint8)).all(axis=-1)
    assert orange.sum() == 36  # the 10 x 10 square's border, and nothing else
    assert not orange[10, 10]
    plain = viz.render_plane(canon, "axial", 2, window=(0.0, 100.0), target=20)
    assert not (plain == np.array(viz.BRAIN_COLOR, np.uint8)).all(axis=-1).any()
    with pytest.raises(ValueError, match="brain mask shape"):
        viz.render_plane(canon, "axial", 2, window=(0.0, 1.0), brain=viz.to_canonical(np.zeros((4, 4, 4)), np.eye(4)))


def test_render_plane_refuses_a_map_on_another_grid() -> None:
    canon = viz.to_canonical(np.zeros((4, 4, 4)), np.eye(4))
    other = viz.to_canonical(np.zeros((4, 4, 5)), np.eye(4))
    with pytest.raises(ValueError, match="anomaly map shape"):
        viz.render_plane(
            canon, "axial", 0, window=(0, 1), overlay_map=other, style=viz.OverlayStyle(0.5, 1.0)
        )


def test_render_map_and_png_bytes() -> None:
    from PIL import Image

    values = viz.to_canonical(np.linspace(0, 1, 64).reshape(4, 4, 4), np.eye(4))
    rgb = viz.render_map(values, "sagittal", 1, vmin=0.0, vmax=1.0, threshold=0.5, target=64)
    png = viz.to_png(rgb)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), rgb)


def test_peak_voxel_skips_nan() -> None:
    data = np.zeros((3, 3, 3))
    data[1, 2, 0] = 5.0
    data[0, 0, 0] = np.nan
    assert viz.to_canonical(data, np.eye(4)).peak_voxel() == (1, 2, 0)


@pytest.mark.parametrize("layout", ["C", "F", "flipped"])
def test_peak_voxel_is_the_same_for_every_memory_layout(layout: str) -> None:
    rng = np.random.default_rng(5)
    data = rng.normal(size=(6, 7, 5)).astype(np.float32)
    data[4, 1, 3] = 9.0
    array = {"C": data, "F": np.asfortranarray(data), "flipped": data[::-1][::-1]}[layout]
    canon = viz.to_canonical(array, np.eye(4))
    assert canon.peak_voxel() == (4, 1, 3)
    with_nan = np.array(array)  # a NaN before the peak sends argmax to the slow path
    with_nan[0, 0, 0] = np.nan
    assert viz.to_canonical(np.asfortranarray(with_nan) if layout == "F" else with_nan, np.eye(4)).peak_voxel() == (4, 1, 3)
