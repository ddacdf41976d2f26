"""Whether scripts/install.sh may skip pip: everything it installs is there, for this checkout.

    python scripts/install_state.py check [REQUIREMENT ...]   # exit 0: skip pip; 1: run it
    python scripts/install_state.py record                    # after pip succeeded

The stamp, build/install-stamp (gitignored), is a digest of what decides what pip installs:
pyproject.toml, setup.py and the interpreter. A fresh clone has none, so CI and a new
machine always install everything; delete it to force a reinstall. `check` also confirms
that dynasparse is installed editable from this checkout and that every requirement of it
(the test extra included) and every REQUIREMENT given is installed in a matching version,
so a package removed or replaced by hand since is noticed too. Uses the standard library
and `packaging` only (pytest needs it, so it is there whenever the tests can run).
"""

import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / "build" / "install-stamp"


def digest() -> str:
    content = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py"):
        content.update((ROOT / name).read_bytes())
    content.update(f"{sys.executable}\n{sys.version}".encode())
    return content.hexdigest()


def problem(extra_requirements) -> str | None:
    """Why pip must run, or None."""
    if not STAMP.exists() or STAMP.read_text().strip() != digest():
        return "pyproject.toml, setup.py or the interpreter changed since the last install (or none ran here)"
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return "the packaging module is missing"
    try:
        distribution = importlib.metadata.distribution("dynasparse")
    except importlib.metadata.PackageNotFoundError:
        return "dynasparse is not installed"
    origin = json.loads(distribution.read_text("direct_url.json") or "{}")
    if origin.get("url") != ROOT.as_uri() or not origin.get("dir_info", {}).get("editable"):
        return f"dynasparse is not installed editable from {ROOT}"
    for text in list(distribution.requires or ()) + list(extra_requirements):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            return f"{requirement.name} is not installed"
        try:
            matches = requirement.specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            matches = False
        if not matches:
            return f"{requirement.name} {installed} does not satisfy {requirement}"
    return None


def main(argv) -> int:
    if argv[:1] == ["record"] and len(argv) == 1:
        STAMP.parent.mkdir(parents=True, exist_ok=True)
        STAMP.write_text(digest() + "\n")
        return 0
    if argv[:1] == ["check"]:
        reason = problem(argv[1:])
        if reason is None:
            return 0
        print(f"install: {reason}: running pip", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
