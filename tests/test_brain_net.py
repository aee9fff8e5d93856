"""deepbet's networks rebuilt in Python from safetensors: converted from the real archives without running
their code, identical to the archives' own TorchScript on a small real head, and refused when altered."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly.brain_net import KNOWN_WEIGHTS, WEIGHT_NAMES, WeightsError, cached_networks, load_network
from anomaly.volume import load_volume
from tests.conftest import SHARED_DATA

pytest.importorskip("deepbet")
pytest.importorskip("safetensors")

IXI_HEAD = SHARED_DATA / "ixi-t1" / "IXI012-HH-1211" / "t1_head.nii.gz"


@pytest.fixture(scope="module")
def archives() -> dict[str, Path]:
    from deepbet.utils import DATA_PATH

    found = {name: Path(DATA_PATH) / "models" / f"{name}.pt" for name in WEIGHT_NAMES}
    if not all(p.is_file() for p in found.values()):
        pytest.skip("deepbet's weight archives are not installed")
    return found


@pytest.fixture(scope="module")
def converted(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("deepbet-cache")
    cached_networks(archives, folder)
    return folder


@pytest.fixture(scope="module")
def small_head() -> torch.Tensor:
    """A real head (IXI T1 with skull, 2 mm) downsampled to 64^3 and scaled the way deepbet feeds its networks."""
    if not IXI_HEAD.exists():
        pytest.skip("shared IXI data not available")
    data = torch.from_numpy(np.ascontiguousarray(load_volume(IXI_HEAD).data, dtype=np.float32))
    x = F.interpolate(data[None, None], (64, 64, 64), mode="trilinear", align_corners=False)
    lo, hi = torch.quantile(x, 0.005), torch.quantile(x, 0.995)
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


@pytest.mark.filterwarnings("ignore:'torch.load' received a zip file")
def test_the_archives_are_torchscript_that_weights_only_refuses(archives: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="weights_only"):
        torch.load(archives["model"], weights_only=True)


def test_converted_weights_are_safetensors_that_record_their_source(converted: Path) -> None:
    from safetensors import safe_open

    for name in WEIGHT_NAMES:
        with safe_open(str(converted / f"{name}.safetensors"), framework="pt") as fh:
            meta = fh.metadata()
            assert meta["source_sha256"] == KNOWN_WEIGHTS[f"{name}.pt"]
            assert "init.0.weight" in set(fh.keys())


def test_python_networks_match_the_archives_on_a_small_real_head(archives: dict[str, Path], converted: Path,
                                                                 small_head: torch.Tensor) -> None:
    for name in WEIGHT_NAMES:
        net = load_network(converted / f"{name}.safetensors", KNOWN_WEIGHTS[f"{name}.pt"])
        with warnings.catch_warnings():  # the reference only: the project never loads TorchScript itself
            warnings.simplefilter("ignore")
            scripted = torch.jit.load(str(archives[name])).eval()
        with torch.inference_mode():
            ours, theirs = net(small_head), scripted(small_head)
        assert ours.shape == (1, 2, 64, 64, 64)
        assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
        brain = ours[0, 1] > 0.5
        assert 0.05 < float(brain.float().mean()) < 0.5  # the brain part of a head, not nothing or everything


def test_a_damaged_cache_is_converted_again_and_an_altered_archive_refused(
        archives: dict[str, Path], converted: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(converted, cache)
    (cache / "model.safetensors").write_bytes(b"not safetensors")
    nets = cached_networks(archives, cache)
    assert set(nets) == set(WEIGHT_NAMES)
    assert (cache / "model.safetensors").stat().st_size > 1_000_000

    altered = dict(archives)
    altered["model"] = tmp_path / "model.pt"
    raw = bytearray(archives["model"].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    altered["model"].write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="not those of deepbet"):
        cached_networks(altered, tmp_path / "empty")
