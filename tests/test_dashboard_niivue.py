"""The NiiVue view: the vendored bundle and its notice, no network address in the page, and the compact
NIfTI layers it is fed."""

from __future__ import annotations

import base64
import gzip
import re

import nibabel as nib
import numpy as np

from anomaly.viz import to_canonical
from dashboard.niivue_view import MAX_VOXELS, NIIVUE_DIR, encode_nifti


def test_bundle_notice_and_page_are_offline() -> None:
    bundle = NIIVUE_DIR / "niivue.umd.js"
    assert 1_000_000 < bundle.stat().st_size < 5_000_000
    assert bundle.read_bytes()[:200].count(b"niivue") >= 1
    notice = (NIIVUE_DIR / "NOTICE").read_text()
    assert "0.69.0" in notice and "BSD 2-Clause" in notice
    page = (NIIVUE_DIR / "index.html").read_text()
    assert '<script src="./niivue.umd.js"></script>' in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), (
        "the page must load nothing from the network"
    )
    assert "streamlit:componentReady" in page and "streamlit:render" in page


def _decode(text: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(text)))


def test_encoded_layer_keeps_values_within_one_quantisation_step() -> None:
    rng = np.random.default_rng(0)
    data = rng.uniform(0.0, 2.0, (10, 12, 14)).astype(np.float32)
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    volume = to_canonical(data, affine)
    image = _decode(encode_nifti(volume, 0.0, 2.0))
    assert image.get_data_dtype() == np.uint8
    assert np.allclose(image.affine, volume.affine)
    assert np.abs(image.get_fdata() - volume.data).max() <= 2.0 / 255 / 2 + 1e-6


def test_large_volumes_are_sent_at_half_resolution() -> None:
    n = int(np.ceil((MAX_VOXELS + 1) ** (1 / 3)))
    volume = to_canonical(np.zeros((n, n, n), np.float32), np.eye(4))
    image = _decode(encode_nifti(volume, 0.0, 1.0))
    assert image.shape == ((n + 1) // 2,) * 3
    assert np.allclose(np.diag(image.affine)[:3], 2.0)
