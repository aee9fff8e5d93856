"""The files of one result as the viewer shows them: opened through the path checks, in parallel, with
the targets the crosshair can jump to (the map's peak, each finding, the centre)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from anomaly.store import Finding, ResultDetail
from dashboard.paths import UnsafePathError, display_path, result_file
from dashboard.volumes import LoadedVolume, VolumeLoadError, load_many


@dataclass
class ScanVolumes:
    """The files of one result as loaded volumes (any may be missing) and why some could not be shown."""

    input: LoadedVolume | None = None
    anomaly: LoadedVolume | None = None
    recon: LoadedVolume | None = None
    mask: LoadedVolume | None = None
    brain: LoadedVolume | None = None
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def reference(self) -> LoadedVolume | None:
        """The volume that fixes the grid: the map, else the input, else the reconstruction."""
        return self.anomaly or self.input or self.recon


def load_scan(detail: ResultDetail, with_mask: bool = False, with_brain: bool = False) -> ScanVolumes:
    """Open the result's recorded files through the path checks (in parallel; the stored mask and the
    brain mask only when their outlines are asked for); every refusal or failure is kept as a message."""
    out = ScanVolumes()
    wanted: list[tuple[str, Path]] = []
    kinds = ["anomaly", "input", "recon"] + (["mask"] if with_mask else []) + (["brain"] if with_brain else [])
    for kind in kinds:
        try:
            path = result_file(detail.result, detail.out_dir, kind)
        except UnsafePathError as exc:
            out.problems.append(str(exc))
            continue
        if path is not None and (kind != "brain" or path.is_file()):  # runs may predate brain masks
            wanted.append((kind, path))
    for (kind, path), loaded in zip(wanted, load_many([p for _, p in wanted]), strict=True):
        if isinstance(loaded, VolumeLoadError):
            out.problems.append(str(loaded))
            continue
        reference = out.reference
        if reference is not None and loaded.volume.shape != reference.volume.shape:
            out.problems.append(
                f"{kind} file {display_path(path, detail.out_dir)} has shape {loaded.volume.shape}, "
                f"unlike the map's {reference.volume.shape}; it is not shown"
            )
            continue
        setattr(out, kind, loaded)
        stat = path.stat()
        out.sources[kind] = f"{path}|{stat.st_mtime_ns}|{stat.st_size}"
    return out


def finding_label(f: Finding) -> str:
    """How a finding is named in the crosshair picker."""
    region = f.region_majority or f.region_centroid or "region unavailable"
    return f"finding {f.rank}: {f.volume_ml:.2f} mL, {region}, peak {f.peak:.3g}"


def jump_targets(detail: ResultDetail, vols: ScanVolumes) -> dict[str, tuple[tuple[int, int, int], str]]:
    """Crosshair targets by key: the map's peak, each finding's peak voxel, the centre."""
    reference = vols.reference
    if reference is None:
        return {}
    volume = reference.volume
    targets: dict[str, tuple[tuple[int, int, int], str]] = {}
    if vols.anomaly is not None:
        targets["peak"] = (vols.anomaly.volume.peak_voxel(), "peak of the anomaly map")
    for f in detail.findings:
        targets[f"finding-{f.id}"] = (volume.world_to_voxel((f.peak_x, f.peak_y, f.peak_z)), finding_label(f))
    targets["centre"] = (volume.center_voxel(), "centre of the volume")
    return targets
