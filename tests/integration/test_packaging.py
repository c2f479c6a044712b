"""Packaging: ``python -m build`` makes an sdist and a wheel that install and run in a fresh venv.

The build runs on a clean copy of the source tree (no venv, egg-info or
caches), sdist first and the wheel from the sdist, as ``python -m build``
does by default: so the sdist alone must be enough to build the wheel.  The
wheel is then installed with pip into a new venv (its dependencies from the
package index) and run from there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.testing import encode, rcpt
from tests.harness.servers import free_port

SOURCE = Path(__file__).resolve().parents[2]

#: Never copied into the build tree: local state, build output and caches.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", "bench-results.json",
)  # fmt: skip


def source_version() -> str:
    """The version, from its one place: ``policyd/__init__.py``."""
    text = (SOURCE / "policyd" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert found, "policyd/__init__.py has no __version__"
    return found.group(1)


def run(*command: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    """Run a command outside the test install (no PYTHONPATH, no cwd imports); fail on error."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


class Built:
    """An sdist and a wheel built from a clean copy, and a venv with the wheel installed."""

    def __init__(self, root: Path) -> None:
        if importlib.util.find_spec("build") is None:
            pytest.fail("the `build` package is missing: pip install -r requirements-test.txt", pytrace=False)
        self.root = root
        self.tree = root / "src"
        shutil.copytree(SOURCE, self.tree, ignore=NOT_SOURCE)
        dist = root / "dist"
        started = time.monotonic()
        run(sys.executable, "-m", "build", "--outdir", dist, self.tree, cwd=root)
        self.build_seconds = time.monotonic() - started
        version = source_version()
        self.sdist = dist / f"policyd-{version}.tar.gz"
        self.wheel = dist / f"policyd-{version}-py3-none-any.whl"
        assert sorted(p.name for p in dist.iterdir()) == sorted([self.sdist.name, self.wheel.name])
        self.venv = root / "venv"
        started = time.monotonic()
        run(sys.executable, "-m", "venv", self.venv, cwd=root)
        run(self.venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", self.wheel, cwd=root)
        self.install_seconds = time.monotonic() - started

    def sdist_names(self) -> set[str]:
        """Paths in the sdist, relative to its top directory."""
        with tarfile.open(self.sdist) as archive:
            return {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}

    def wheel_names(self) -> set[str]:
        """Paths in the wheel."""
        with zipfile.ZipFile(self.wheel) as archive:
            return set(archive.namelist())

    def bin(self, name: str) -> Path:
        """A program of the fresh venv."""
        return self.venv / "bin" / name


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """One build and one fresh install for the whole module (about 25 s)."""
    yield Built(tmp_path_factory.mktemp("packaging"))


def files_under(*patterns: str) -> set[str]:
    """Source files matching glob patterns, relative to the source root."""
    found = {str(p.relative_to(SOURCE)) for pattern in patterns for p in SOURCE.glob(pattern) if p.is_file()}
    return {f for f in found if "__pycache__" not in f and not f.endswith(".pyc")}


def test_sdist_carries_samples_snippets_units_and_tests(built: Built) -> None:
    """The sdist has etc/policyd.yaml, the Postfix snippets, the systemd units, README and the tests."""
    names = built.sdist_names()
    wanted = files_under("etc/**/*", "systemd/*", "tests/**/*.py", "policyd/**/*")
    assert {"etc/policyd.yaml", "etc/postfix/main.cf.snippet", "systemd/policyd.service"} <= wanted
    assert {"etc/postfix/master.cf.snippet", "systemd/policyd.socket"} <= wanted
    missing = wanted - names
    assert not missing, f"not in the sdist: {sorted(missing)}"
    assert {"README.md", "setup.cfg", "pyproject.toml", "MANIFEST.in", "Makefile", "requirements-test.txt"} <= names
    assert not [n for n in names if "__pycache__" in n or n.startswith((".venv", "var/"))]


def test_wheel_carries_the_package_and_its_templates(built: Built) -> None:
    """The wheel has every file of the package (modules, py.typed, templates, models), and nothing outside policyd/."""
    names = built.wheel_names()
    package = files_under("policyd/**/*")
    assert {"policyd/templates/en/blocked.txt", "policyd/templates/fr/blocked.txt"} <= package
    missing = package - names
    assert not missing, f"not in the wheel: {sorted(missing)}"
    assert {n.split("/", 1)[0] for n in names} == {"policyd", f"policyd-{source_version()}.dist-info"}
    with zipfile.ZipFile(built.wheel) as archive:
        entry_points = archive.read(f"policyd-{source_version()}.dist-info/entry_points.txt").decode()
    assert "policyd = policyd.cli:main" in entry_points


def test_installed_version_is_the_one_in_the_source(built: Built) -> None:
    """policyd --version in the fresh venv prints __version__, which is also the package metadata version."""
    version = source_version()
    setup = (SOURCE / "setup.cfg").read_text(encoding="utf-8")
    assert "version = attr: policyd.__version__" in setup
    assert run(built.bin("policyd"), "--version", cwd=built.root).strip() == f"policyd, version {version}"
    probe = (
        "import importlib.metadata, policyd; "
        "print(importlib.metadata.version('policyd')); print(policyd.__version__); print(policyd.__file__)"
    )
    metadata, attribute, location = run(built.bin("python"), "-c", probe, cwd=built.root).split()
    assert metadata == attribute == version
    assert location.startswith(str(built.venv)), location


def test_installed_wheel_serves_with_its_templates(built: Built) -> None:
    """The installed wheel accepts the sample config and serves, its refusal text read from the shipped template."""
    sample = built.root / "policyd-sample.yaml"
    with tarfile.open(built.sdist) as archive:
        member = archive.extractfile(f"policyd-{source_version()}/etc/policyd.yaml")
        assert member is not None
        sample.write_bytes(member.read())
    assert run(built.bin("policyd"), "config", "check", "-c", sample, cwd=built.root).strip().endswith(
        "configuration OK"
    )
    port = free_port()
    config = built.root / "serve.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\nstore:\n  url: "memory://"\n'
        "local_domains: [example.org]\nlanguage: fr\noutbound:\n  limit: 1\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = built.root / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [built.bin("policyd"), "serve", "-c", config], stdout=out, stderr=subprocess.STDOUT, cwd=built.root, env=env
        )
    try:
        replies = []
        wait_listening(port, server)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            for to in ("a@gmail.com", "b@gmail.com"):
                conn.sendall(encode(rcpt(sasl_username="zoe", recipient=to)))
                reply = b""
                while not reply.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    assert chunk, log.read_text()
                    reply += chunk
                replies.append(reply.decode())
    finally:
        server.terminate()
        status = server.wait(15)
    template = (SOURCE / "policyd" / "templates" / "fr" / "blocked.txt").read_text(encoding="utf-8")
    assert replies[0] == "action=DUNNO\n\n"
    assert replies[1].startswith("action=REJECT 5.7.1 "), replies[1]
    assert template.split("$account")[0].strip() in replies[1], (template, replies[1])
    assert status == 0, log.read_text()


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Return once something accepts on 127.0.0.1:port; fail if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"policyd exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
