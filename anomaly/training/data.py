"""Healthy training slices from folders of volumes: the scoring grid, lesion slices left out.

Every volume goes through :func:`anomaly.preprocess.prepare_volume` and
:func:`anomaly.scoring.slices_to_batch`, so training sees exactly the grid, intensity scale and slice
orientation that scoring sees. Slices touching a dilated lesion mask are dropped; paths matching the
exclusion list (held-out evaluation cases) are refused.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from scipy import ndimage

from anomaly.config import PreprocessConfig
from anomaly.contrast import guess_contrast, network_contrast
from anomaly.preprocess import InputSpec, PreparedVolume, prepare_volume
from anomaly.scoring import slices_to_batch
from anomaly.volume import Volume, load_mask, load_volume

MNI152 = "nilearn:mni152"


class ExcludedDataError(ValueError):
    """A training path that matches the held-out evaluation list."""


@dataclass(frozen=True)
class VolumeSource:
    """One training volume: its file, an optional lesion mask beside it, an optional brain mask beside it
    (a head is stripped with it: labels > 0 are brain), and its contrast (t1, t2, flair, or "")."""

    path: Path
    lesion_mask: Path | None = None
    contrast: str = ""
    brain_mask: Path | None = None

    @property
    def case(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


@dataclass
class SliceSet:
    """Training slices ``[N, 1, H, W]`` in [0, 1] (float16 to save memory), their brain masks, the case
    each came from, and the contrast of its network (t1, t2, flair, or "" when unknown; t1c scans train T1)."""

    images: torch.Tensor
    masks: torch.Tensor
    cases: list[str]
    contrasts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.contrasts:
            self.contrasts = [network_contrast(guess_contrast(case)) or "" for case in self.cases]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, keep: Sequence[int]) -> SliceSet:
        """The slices at positions ``keep``, in that order."""
        index = torch.as_tensor(list(keep), dtype=torch.long)
        return SliceSet(self.images[index], self.masks[index], [self.cases[i] for i in keep],
                        [self.contrasts[i] for i in keep])

    def to_dict(self) -> dict[str, object]:
        return {"images": self.images, "masks": self.masks, "cases": self.cases, "contrasts": self.contrasts}

    @classmethod
    def from_dict(cls, data: dict) -> SliceSet:
        return cls(data["images"], data["masks"], list(data["cases"]), list(data.get("contrasts") or []))

    def save(self, path: str | os.PathLike[str]) -> None:
        torch.save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SliceSet:
        return cls.from_dict(torch.load(path, weights_only=True))


def mni152_path() -> Path:
    """nilearn's packaged MNI152 2009 T1 template (1 mm, skull-stripped)."""
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the MNI152 template is not in this nilearn install; reinstall nilearn")
    return path


def matches_exclusion(path: str | os.PathLike[str], patterns: Sequence[str]) -> str | None:
    """The first exclusion pattern found in the resolved path (as a whole path part prefix), else None."""
    text = Path(path).resolve().as_posix().lower()
    for pattern in patterns:
        pat = pattern.strip("/").lower()
        if pat and re.search(r"(^|/)" + re.escape(pat) + r"($|[/._-])", text):
            return pattern
        if pat and "/" not in pat and pat in Path(text).name:
            return pattern
    return None


def check_not_excluded(path: str | os.PathLike[str], patterns: Sequence[str]) -> None:
    """Refuse a held-out evaluation file before it reaches training."""
    hit = matches_exclusion(path, patterns)
    if hit is not None:
        raise ExcludedDataError(
            f"{path}: matches the held-out evaluation entry {hit!r} of the recipe's data.exclude list; "
            "evaluation cases must never be trained on: remove it from data.volumes")


def find_sources(patterns: Iterable[str], lesion_names: Sequence[str] = (), exclude: Sequence[str] = (),
                 base: str | os.PathLike[str] = ".", skip_excluded: bool = True,
                 brain_mask_names: Sequence[str] = ()) -> list[VolumeSource]:
    """Expand glob patterns (relative to ``base``; ``nilearn:mni152`` is the packaged template) into
    sources with the first lesion mask (and brain mask, for heads) found beside each file. Excluded
    files are skipped when ``skip_excluded`` (a glob over a folder that holds evaluation cases),
    refused otherwise."""
    sources: list[VolumeSource] = []
    for pattern in patterns:
        if pattern == MNI152:
            sources.append(VolumeSource(mni152_path(), None, "t1"))
            continue
        full = pattern if os.path.isabs(pattern) else os.path.join(os.fspath(base), pattern)
        hits = sorted(glob.glob(full, recursive=True))
        if not hits:
            raise FileNotFoundError(f"{pattern}: no file matches this data.volumes pattern (relative to {base})")
        for hit in hits:
            path = Path(hit)
            if matches_exclusion(path, exclude) is not None:
                if skip_excluded and any(ch in pattern for ch in "*?["):
                    continue
                check_not_excluded(path, exclude)
            lesion = next((path.parent / n for n in lesion_names if (path.parent / n).is_file()), None)
            brain = next((path.parent / n for n in brain_mask_names if (path.parent / n).is_file()), None)
            sources.append(VolumeSource(path, lesion, network_contrast(guess_contrast(path)) or "", brain))
    for source in sources:
        check_not_excluded(source.path, exclude)
    return sources


def lesion_on_grid(mask_path: Path, prepared: PreparedVolume) -> np.ndarray:
    """A native lesion mask resampled (nearest) onto a prepared volume's model grid."""
    mask = load_mask(mask_path).astype(np.float32)
    src = MetaTensor(torch.as_tensor(mask)[None], affine=torch.as_tensor(prepared.native_affine, dtype=torch.float64))
    out = cast(MetaTensor, SpatialResample(mode="nearest", padding_mode="zeros", dtype=np.float32)(
        src, dst_affine=torch.as_tensor(prepared.affine, dtype=torch.float64), spatial_size=prepared.image.shape))
    return np.asarray(out.as_tensor()[0].numpy()) > 0.5


def stripped(source: VolumeSource, skull_strip: str, preprocess: PreprocessConfig) -> Volume:
    """The source volume with everything outside its brain set to zero: by the brain mask beside it when it
    has one, else by the brain-extraction stage (``skull_strip`` auto/force), else as it is."""
    volume = load_volume(source.path)
    brain: np.ndarray | None = None
    if source.brain_mask is not None:
        brain = load_mask(source.brain_mask)
    elif skull_strip != "skip":
        from anomaly.brain_extraction import brain_mask_for

        result, _ = brain_mask_for(volume, skull_strip, head_ml=preprocess.skull_volume_ml,
                                   tolerance=preprocess.mask_tolerance, size=preprocess.skull_strip_size,
                                   contrast=source.contrast or None)
        brain = result.mask if result is not None else None
    if brain is None:
        return volume
    return Volume(np.where(brain, volume.data, 0).astype(np.float32), volume.affine, volume.path)


def healthy_slices(source: VolumeSource, spec: InputSpec, preprocess: PreprocessConfig | None = None,
                   dilate_mm: float = 5.0, skull_strip: str = "skip") -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring slices of one volume that do not touch its lesion mask dilated by ``dilate_mm``."""
    preprocess = preprocess or PreprocessConfig()
    prepared = prepare_volume(stripped(source, skull_strip, preprocess), preprocess, spec)
    index = prepared.slices
    if source.lesion_mask is not None:
        lesion = lesion_on_grid(source.lesion_mask, prepared)
        if lesion.any():
            radius = max(1, int(round(dilate_mm / min(prepared.spacing))))
            lesion = ndimage.binary_dilation(lesion, iterations=radius)
            touched = lesion.any(axis=(0, 1))
            index = np.array([z for z in index if not touched[z]], dtype=int)
    if len(index) == 0:
        empty = torch.zeros((0, 1, spec.slice_size, spec.slice_size))
        return empty.half(), empty.bool()
    images = slices_to_batch(prepared.image, index)
    masks = slices_to_batch(prepared.mask.astype(np.float32), index) > 0.5
    return images.half(), masks


def build_slice_set(sources: Sequence[VolumeSource], spec: InputSpec, preprocess: PreprocessConfig | None = None,
                    dilate_mm: float = 5.0, exclude: Sequence[str] = (), progress: bool = False,
                    skull_strip: str = "skip") -> SliceSet:
    """Healthy slices of every source, checked once more against the exclusion list."""
    images, masks, cases, contrasts = [], [], [], []
    iterator: Iterable[VolumeSource] = sources
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(sources, desc="slices", unit="volume")
    for source in iterator:
        check_not_excluded(source.path, exclude)
        img, msk = healthy_slices(source, spec, preprocess, dilate_mm, skull_strip)
        images.append(img)
        masks.append(msk)
        cases.extend([source.case] * len(img))
        contrasts.extend([source.contrast] * len(img))
    if not images or sum(len(i) for i in images) == 0:
        raise ValueError("no healthy training slices: check data.volumes and the lesion masks")
    return SliceSet(torch.cat(images), torch.cat(masks), cases, contrasts)
