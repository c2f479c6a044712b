"""Debian packages a harness needs, installed when missing (as root), as ``make test-deps`` would."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path


def apt_install(packages: Sequence[str], missing: Callable[[], list[str]], error: type[Exception]) -> None:
    """Install ``packages`` with apt-get (an ``apt-get update`` and a second try when the first fails).

    :param missing: what is still missing (empty once installed).
    :raises error: naming the packages, what is still missing and apt-get's last words.
    """
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if missing():
        raise error(
            f"could not install {' '.join(packages)} (still missing {', '.join(missing())}): "
            f"{result.stderr.strip()[-2000:]}"
        )


def stop_services(*units: str) -> None:
    """Disable and stop the system services a package started (under systemd): not the tests' to keep running."""
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", *units], capture_output=True, timeout=60)
