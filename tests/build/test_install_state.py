"""scripts/install_state.py: scripts/install.sh skips pip only when everything pip would
install is there for this checkout, and runs it whenever anything is missing or changed.

Each test works on a copy of the script in a scratch checkout, with a fake installed
dynasparse (a dist-info folder first on PYTHONPATH) whose requirements the test chooses."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_state.py"


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "scripts" / SCRIPT.name)
    (root / "pyproject.toml").write_text("[project]\nname = 'dynasparse'\n")
    (root / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    return root


def install(site, checkout, requirements, editable=True):
    """A fake dynasparse distribution in `site`, as pip would leave an (editable) install."""
    info = site / "dynasparse-0.1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dynasparse\nVersion: 0.1.0\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requirements))
    origin = {"url": checkout.as_uri(), "dir_info": {"editable": True} if editable else {}}
    (info / "direct_url.json").write_text(json.dumps(origin))


def state(checkout, site, *args):
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, str(checkout / "scripts" / SCRIPT.name), *args],
                            capture_output=True, text=True, env=env, timeout=60)
    return result.returncode, result.stderr


# Installed wherever these tests run (pytest needs packaging).
PRESENT = ["pytest", "packaging>=1", 'pytest>=1; extra == "test"', 'surely-not-a-package-4711; extra == "docs"']


def test_pip_is_skipped_only_after_an_install_recorded_for_the_same_files(checkout, tmp_path):
    site = tmp_path / "site"
    install(site, checkout, PRESENT)
    code, message = state(checkout, site, "check")
    assert code == 1 and "since the last install" in message  # a fresh clone: no stamp

    assert state(checkout, site, "record")[0] == 0
    assert state(checkout, site, "check", "pytest") == (0, "")

    for name in ("pyproject.toml", "setup.py"):
        original = (checkout / name).read_text()
        (checkout / name).write_text(original + "# changed\n")
        code, message = state(checkout, site, "check")
        assert code == 1 and "since the last install" in message, name
        (checkout / name).write_text(original)
    assert state(checkout, site, "check")[0] == 0


@pytest.mark.parametrize("requirements, extra, reason", [
    (PRESENT + ['surely-not-a-package-4711; extra == "test"'], [], "surely-not-a-package-4711 is not installed"),
    (PRESENT + ["pytest>=999"], [], "does not satisfy pytest>=999"),
    (PRESENT, ["surely-not-a-package-4711"], "surely-not-a-package-4711 is not installed"),
    (PRESENT, ["packaging<1"], "does not satisfy packaging<1"),
], ids=["missing-test-extra", "too-old", "missing-build-requirement", "build-requirement-version"])
def test_a_missing_or_mismatched_requirement_runs_pip(checkout, tmp_path, requirements, extra, reason):
    site = tmp_path / "site"
    install(site, checkout, requirements)
    state(checkout, site, "record")
    code, message = state(checkout, site, "check", *extra)
    assert code == 1 and reason in message, message


def test_an_install_from_another_checkout_or_not_editable_runs_pip(checkout, tmp_path):
    state(checkout, tmp_path, "record")
    install(tmp_path / "other", tmp_path / "elsewhere", PRESENT)
    install(tmp_path / "copy", checkout, PRESENT, editable=False)
    for site in (tmp_path / "other", tmp_path / "copy"):
        code, message = state(checkout, site, "check")
        assert code == 1 and "not installed editable from" in message, message


def test_unknown_command_is_a_usage_error(checkout, tmp_path):
    code, message = state(checkout, tmp_path, "install")
    assert code == 2 and "install_state.py check" in message
