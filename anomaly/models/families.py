"""Model families: named diffusers ``AutoencoderKL`` configurations in ``configs/models/*.yaml``.

A family fixes a VAE's architecture, the slices it expects and where its weights come from. The
registry serves each family by name, and weights found for a family are checked against its
architecture, so a wrong download is a clear error rather than a silently different model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from anomaly.configparse import ConfigError, build, load_yaml
from anomaly.preprocess import InputSpec

FAMILIES_ENV = "ANOMALY_FAMILIES_DIR"
# Keys that decide the shapes of the weights; the rest (sample_size, scaling_factor ...) may differ.
ARCHITECTURE_KEYS: tuple[str, ...] = ("in_channels", "out_channels", "down_block_types", "up_block_types",
                                      "block_out_channels", "layers_per_block", "latent_channels")


CHECKOUT_FAMILIES = Path(__file__).resolve().parents[2] / "configs" / "models"
"""``configs/models`` of the project checkout the package runs from (source and editable installs)."""
PACKAGED_FAMILIES = Path(__file__).resolve().parents[1] / "assets" / "families"
"""The copy of ``configs/models`` that a built wheel carries (written by ``setup.py`` at build time)."""


def families_dir() -> Path:
    """``ANOMALY_FAMILIES_DIR``; else ``configs/models`` of the checkout; else the copy inside a wheel."""
    env = os.environ.get(FAMILIES_ENV)
    if env:
        return Path(env)
    return CHECKOUT_FAMILIES if CHECKOUT_FAMILIES.is_dir() else PACKAGED_FAMILIES


@dataclass(frozen=True)
class ModelFamily:
    """One family: its name, what it is, its ``AutoencoderKL`` configuration, input slices and weight source."""

    name: str
    autoencoder: dict[str, Any]
    input_spec: InputSpec
    description: str = ""
    hub_repo: str | None = None
    force_fp32: bool = False
    how_to_get: str = ""
    source: Path | None = field(default=None, compare=False, metadata={"parse": False})

    def mismatches(self, vae_config: dict[str, Any]) -> list[str]:
        """Architecture keys where ``vae_config`` differs from this family (empty when it is one of them)."""
        out = []
        for key in ARCHITECTURE_KEYS:
            want, got = self.autoencoder.get(key), vae_config.get(key)
            if want is not None and _plain(want) != _plain(got):
                out.append(f"{key} is {_plain(got)}, the family has {_plain(want)}")
        return out

    def build(self) -> Any:
        """An untrained ``AutoencoderKL`` of this family (diffusers builds it from the configuration)."""
        from diffusers import AutoencoderKL

        return AutoencoderKL(**self.autoencoder)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def parse_family(data: dict[str, Any], source: Path | None = None) -> ModelFamily:
    """A family from a parsed YAML mapping, through the strict builder; errors name the file and the key."""
    where = f"{source}: " if source else ""
    family = build(ModelFamily, data, source=source)
    missing = [k for k in ARCHITECTURE_KEYS if k not in family.autoencoder]
    if missing:
        raise ConfigError(f"{where}autoencoder lacks {', '.join(missing)}: write out the whole architecture")
    spec = data["input_spec"]
    if not {"slice_size", "spacing"} <= set(spec):
        raise ConfigError(f"{where}input_spec needs slice_size and spacing: [x, y, z] in mm")
    return replace(family, how_to_get=" ".join(family.how_to_get.split()), source=source)


def load_families(folder: str | os.PathLike[str] | None = None) -> dict[str, ModelFamily]:
    """Every ``*.yaml`` family in ``folder`` (default :func:`families_dir`); empty when the folder is absent."""
    folder = Path(folder) if folder is not None else families_dir()
    if not folder.is_dir():
        return {}
    families: dict[str, ModelFamily] = {}
    for path in sorted(folder.glob("*.yaml")):
        family = parse_family(load_yaml(path), path)
        if family.name in families:
            raise ConfigError(f"{path}: family {family.name!r} is also defined in {families[family.name].source}")
        families[family.name] = family
    return families
