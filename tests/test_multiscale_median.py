"""The multi-scale median of a map: the mean of its in-plane medians at several window sizes, wide windows
on a coarser grid; its settings in scoring files, model folders and the command lines of the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from anomaly.config import ConfigError, PostprocessConfig, load_scoring_settings
from anomaly.median import (
    coarse_median_in_plane,
    median_in_plane,
    median_sizes,
    multiscale_median,
    parse_median_sizes,
)
from anomaly.scoring import postprocess
from pipelines.train import median_size, nearest_odd


def blob_map(seed: int = 0, shape: tuple[int, int, int] = (48, 40, 6)) -> tuple[np.ndarray, np.ndarray]:
    """A non-negative map (half zeros, as a signed rule leaves it) with one small and one large bright blob."""
    rng = np.random.default_rng(seed)
    values = np.clip(rng.normal(0, 1, shape), 0, None).astype(np.float32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    values[(yy - 10) ** 2 + (xx - 10) ** 2 <= 2, :] += 6.0    # small: 5 pixels
    values[(yy - 30) ** 2 + (xx - 25) ** 2 <= 64, :] += 3.0   # large: radius 8
    where = np.zeros(shape, bool)
    where[2:-2, 2:-2] = True
    return values, where


def test_one_size_is_that_median_and_size_one_is_the_map_itself() -> None:
    values, where = blob_map()
    assert np.array_equal(multiscale_median(values, 5, where)[where], median_in_plane(values, 5, where)[where])
    assert np.array_equal(multiscale_median(values, (1,), where), values)


def test_several_sizes_average_their_medians() -> None:
    values, where = blob_map(1)
    expected = (values + ndimage.median_filter(values, size=(3, 3, 1)) + ndimage.median_filter(values, size=(7, 7, 1))) / 3
    np.testing.assert_allclose(multiscale_median(values, (1, 3, 7), where)[where], expected[where], rtol=1e-6)


def test_the_mean_keeps_a_small_lesion_that_a_wide_median_erases() -> None:
    values, where = blob_map(2)
    wide = multiscale_median(values, 7, where)
    mixed = multiscale_median(values, (1, 7), where)
    background = float(np.median(values[where]))
    assert wide[10, 10, 3] <= background + 1.0      # the 5-pixel blob is gone at 7 px
    assert mixed[10, 10, 3] >= background + 2.5     # the fine scale keeps half its height
    assert mixed[30, 25, 3] >= 2.5 and wide[30, 25, 3] >= 2.5  # the large one stays in both


@pytest.mark.parametrize("shape", [(48, 40, 3), (47, 41, 3)])
def test_a_wide_window_is_taken_on_every_second_pixel_and_interpolated_back(shape: tuple[int, int, int]) -> None:
    values, where = blob_map(3, shape)
    out = coarse_median_in_plane(values, 13, where)
    assert out.shape == values.shape and out.dtype == values.dtype
    coarse = ndimage.median_filter(values[::2, ::2], size=(7, 7, 1))  # half the window, made odd
    np.testing.assert_allclose(out[::2, ::2][where[::2, ::2]], coarse[where[::2, ::2]], rtol=1e-6)
    # everywhere (no ``where``): coarse pixels on even positions, the mean of two neighbours between them
    full = coarse_median_in_plane(values, 13)
    np.testing.assert_allclose(full[::2, ::2], coarse, rtol=1e-6)
    odd = full[1::2, ::2]
    below = coarse[np.minimum(np.arange(odd.shape[0]) + 1, coarse.shape[0] - 1)]
    np.testing.assert_allclose(odd, (coarse[: odd.shape[0]] + below) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full[::2, 1::2], (coarse[:, : full.shape[1] // 2]
                                                  + coarse[:, np.minimum(np.arange(full.shape[1] // 2) + 1,
                                                                         coarse.shape[1] - 1)]) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full[where], out[where], rtol=1e-6)  # ``where`` changes nothing that is read
    # and close to the exact wide median where it is read
    exact = ndimage.median_filter(values, size=(13, 13, 1))
    assert np.corrcoef(out[where], exact[where])[0, 1] > 0.9
    assert multiscale_median(values, 13, where)[where] == pytest.approx(out[where])


def test_postprocess_takes_sizes_from_the_settings_or_the_model() -> None:
    values, mask = blob_map(4)
    settings = PostprocessConfig(median_size=(1, 5), erode_mm=0)
    out, scored = postprocess(values, mask, settings, (1.0, 1.0, 1.0))
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    expected = np.zeros_like(values)
    expected[box] = multiscale_median(values[box], (1, 5), mask[box])
    np.testing.assert_allclose(out[scored], expected[scored], rtol=1e-6)
    from_model, _ = postprocess(values, mask, PostprocessConfig(erode_mm=0), (1.0, 1.0, 1.0), model_median=(1, 5))
    np.testing.assert_array_equal(from_model, out)


def test_settings_files_take_a_list_and_refuse_even_sizes(tmp_path: Path) -> None:
    config = tmp_path / "score.yaml"
    config.write_text("postprocess:\n  median_size: [1, 7, 13]\n")
    assert load_scoring_settings(config).postprocess.median_size == (1, 7, 13)
    config.write_text("postprocess:\n  median_size: 3\n")
    assert load_scoring_settings(config).postprocess.median_size == 3
    for bad in ("[1, 6]", "[]", "0"):
        config.write_text(f"postprocess:\n  median_size: {bad}\n")
        with pytest.raises(ConfigError, match=r"median_size must be an odd number of pixels or a list"):
            load_scoring_settings(config)


def test_parse_and_validate_sizes() -> None:
    assert parse_median_sizes("5") == 5 and parse_median_sizes("1,7,13") == (1, 7, 13)
    assert median_sizes(3) == (3,) and median_sizes([1, 9]) == (1, 9)
    for bad in ("4", "1,,7", "a", "-3"):
        with pytest.raises(ValueError, match="median size"):
            parse_median_sizes(bad)


def test_trained_models_get_the_same_millimetres_on_every_grid() -> None:
    from anomaly.preprocess import InputSpec

    assert median_size(InputSpec(slice_size=128, spacing=(1.5, 1.5, 1.5))) == (1, 7, 13)
    assert median_size(InputSpec(slice_size=192, spacing=(1.0, 1.0, 1.0))) == (1, 11, 19)
    assert [nearest_odd(p) for p in (0.0, 1.9, 2.1, 7.0, 10.5)] == [1, 1, 3, 7, 11]


def test_a_model_folder_with_a_bad_median_list_names_the_file(tmp_path: Path) -> None:
    from anomaly.models.folder import ModelLoadError, load_model_folder

    shipped = Path(__file__).resolve().parents[1] / "anomaly" / "assets" / "models" / "default"
    meta = json.loads((shipped / "anomaly_model.json").read_text())
    assert isinstance(meta["postprocess"]["median_size"], list)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "anomaly_model.json").write_text(json.dumps({"name": "m", "postprocess": {"median_size": [1, 4]}}))
    with pytest.raises(ModelLoadError, match=r"anomaly_model\.json: postprocess\.median_size must be an odd"):
        load_model_folder(folder)


def test_smoothing_across_slices_lowers_slice_noise_and_keeps_a_lesion() -> None:
    rng = np.random.default_rng(5)
    shape = (24, 24, 30)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    noise = np.clip(rng.normal(0, 1, shape), 0, None).astype(np.float32)  # independent from slice to slice
    lesion = np.zeros(shape, bool)
    lesion[8:14, 8:14, 10:18] = True                                          # spans 8 slices
    amap = (noise + 4.0 * lesion).astype(np.float32)
    off, scored = postprocess(amap, mask, PostprocessConfig(median_size=1, erode_mm=0, through_plane_mm=0),
                              (1.0, 1.0, 1.0))
    on, _ = postprocess(amap, mask, PostprocessConfig(median_size=1, erode_mm=0, through_plane_mm=1.5),
                        (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(off[scored], amap[scored])
    healthy = scored & ~lesion
    assert on[healthy].std() < 0.75 * off[healthy].std()                      # slice noise averaged down
    assert on[10:12, 10:12, 12:16].mean() > 0.9 * off[10:12, 10:12, 12:16].mean()  # the lesion's core stays
    expected = ndimage.gaussian_filter1d(np.where(scored, amap, 0), 1.5, axis=2, mode="constant")
    np.testing.assert_allclose(on[scored], expected[scored], rtol=1e-5, atol=1e-6)
    # the sigma is in mm: on 3 mm slices the same 1.5 mm is half a slice
    coarse, _ = postprocess(amap, mask, PostprocessConfig(median_size=1, erode_mm=0, through_plane_mm=1.5),
                            (1.0, 1.0, 3.0))
    half = ndimage.gaussian_filter1d(np.where(scored, amap, 0), 0.5, axis=2, mode="constant")
    np.testing.assert_allclose(coarse[scored], half[scored], rtol=1e-5, atol=1e-6)
    # the model's own sigma applies unless the settings name one; the input is never changed in place
    before = amap.copy()
    own, _ = postprocess(amap, mask, PostprocessConfig(median_size=1, erode_mm=0), (1.0, 1.0, 1.0),
                         model_through_plane_mm=1.5)
    np.testing.assert_array_equal(own, on)
    np.testing.assert_array_equal(amap, before)


def test_through_plane_setting_is_checked_in_settings_and_model_folders(tmp_path: Path) -> None:
    from anomaly.models.folder import ModelLoadError, load_model_folder

    config = tmp_path / "score.yaml"
    config.write_text("postprocess:\n  through_plane_mm: 0\n")
    assert load_scoring_settings(config).postprocess.through_plane_mm == 0.0
    config.write_text("postprocess:\n  through_plane_mm: -1\n")
    with pytest.raises(ConfigError, match=r"through_plane_mm must lie in \[0, 20\]"):
        load_scoring_settings(config)
    folder = tmp_path / "model"
    folder.mkdir()
    for section, message in (({"through_plane_mm": "wide"}, r"through_plane_mm must be a number of mm"),
                             ({"median_sise": 5}, r"unknown postprocess setting\(s\) median_sise")):
        (folder / "anomaly_model.json").write_text(json.dumps({"name": "m", "postprocess": section}))
        with pytest.raises(ModelLoadError, match=message):
            load_model_folder(folder)


def test_the_new_setting_leaves_earlier_settings_hashes_alone() -> None:
    import hashlib

    from anomaly.config import ScoringSettings

    settings = ScoringSettings()
    before = settings.result_dict()
    before["postprocess"].pop("through_plane_mm")  # the settings as they were before the field existed
    old_hash = hashlib.sha256(json.dumps(before, sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert settings.hash() == old_hash
    assert ScoringSettings(postprocess=PostprocessConfig(through_plane_mm=0.0)).hash() != old_hash
