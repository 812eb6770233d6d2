"""The project's own bookkeeping: one version, the lock covers what is installed, pins agree."""

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

import toylib as tl

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def lock() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(*extras: str) -> list[Requirement]:
    optional = PROJECT["optional-dependencies"]
    listed = PROJECT["dependencies"] + [r for e in extras for r in optional[e]]
    return [Requirement(r) for r in listed]


def test_version_is_written_once_and_read_from_the_metadata():
    assert tl.__version__ == PROJECT["version"] == importlib.metadata.version("toylib"), (
        "the installed metadata is stale: reinstall (make test does, as pyproject.toml changed)"
    )
    assert "__version__" in dir(tl)
    assert f"## [{PROJECT['version']}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_lock_pins_every_requirement_and_agrees_with_exact_pins():
    pins = lock()
    for req in requirements(*PROJECT["optional-dependencies"]):  # every extra: the make targets
        name = normalise(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name]), (
            f"constraints.txt pins {req.name}=={pins[name]}, pyproject.toml asks {req}: "
            "run `make lock` (or fix the pin)"
        )
    assert "pip" in pins  # make test installs pip itself from the lock too


def test_dependency_floors_are_the_locked_versions():
    # The floors are the versions tested (see the comment in pyproject.toml):
    # after `make lock` moves a package, its floor moves with it.
    pins = lock()
    for req in requirements():
        floors = [s.version for s in req.specifier if s.operator == ">="]
        assert floors == [pins[normalise(req.name)]], (
            f"{req}: the floor should be the tested version {pins[normalise(req.name)]}"
        )


def test_pre_commit_runs_the_pinned_ruff():
    (ruff,) = [r for r in requirements("test") if r.name == "ruff"]
    (pin,) = [s.version for s in ruff.specifier if s.operator == "=="]
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    assert re.search(rf"ruff-pre-commit\n\s+rev: v{re.escape(pin)}\n", config), (
        f"the pre-commit ruff hook should be at v{pin}, the ruff pin in pyproject.toml"
    )


def test_license_is_an_spdx_string_with_its_file():
    assert PROJECT["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
