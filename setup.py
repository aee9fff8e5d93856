"""Build hook: a wheel carries the model-family configurations of ``configs/models``.

The families live in ``configs/`` beside the package (the project's layout); an installed wheel has
no checkout, so the build copies them to ``anomaly/assets/families``, where ``families_dir`` finds them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

FAMILIES = Path(__file__).resolve().parent / "configs" / "models"


class BuildWithFamilies(build_py):
    """``build_py`` plus a copy of ``configs/models/*.yaml`` into the built ``anomaly`` package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads configs/models in place
        files = sorted(FAMILIES.glob("*.yaml"))
        if not files:
            raise RuntimeError(f"no model families in {FAMILIES}; build from a full checkout or sdist")
        target = Path(self.build_lib) / "anomaly" / "assets" / "families"
        target.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": BuildWithFamilies})
