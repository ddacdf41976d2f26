"""What a wheel holds: every package of the tree, found by setup.py rather than listed, so a
new subpackage cannot go missing. build_py is the step that copies the Python files into a
wheel (or an sdist's build); it compiles nothing, so the test takes seconds."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What setup.py and pyproject.toml read while configuring (the readme is part of the metadata).
CONFIGURATION = ("setup.py", "pyproject.toml", "README.md")
TREES = ("python", "kernels", "csrc")


def _python_files(root):
    """The .py files a wheel must hold, as their paths inside it."""
    files = {path.relative_to(root / "python") for path in (root / "python" / "dynasparse").rglob("*.py")}
    files |= {Path("dynasparse") / path.relative_to(root) for path in (root / "kernels").rglob("*.py")}
    return {path for path in files if "__pycache__" not in path.parts}


def _packaged_files(source, tmp_path):
    lib = tmp_path / "lib"
    result = subprocess.run([sys.executable, "setup.py", "--quiet", "build_py", "--build-lib", str(lib)],
                            cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return {path.relative_to(lib) for path in lib.rglob("*.py")}


def test_a_wheel_holds_every_python_file_of_the_tree_including_new_subpackages(tmp_path):
    # A copy of the tree, so that new subpackages can be added without touching the checkout.
    source = tmp_path / "source"
    for name in TREES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in CONFIGURATION:
        shutil.copy2(ROOT / name, source / name)
    added = [Path("python/dynasparse/newpackage/__init__.py"), Path("python/dynasparse/newpackage/deep/__init__.py"),
             Path("python/dynasparse/newpackage/deep/module.py"), Path("kernels/newfamily/__init__.py"),
             Path("kernels/newfamily/kernel.py")]
    for path in added:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text("VALUE = 1\n")

    packaged = _packaged_files(source, tmp_path)

    expected = _python_files(source)
    assert expected >= _python_files(ROOT) | {Path("dynasparse/kernels/newfamily/kernel.py"),
                                              Path("dynasparse/newpackage/deep/module.py")}
    missing = sorted(map(str, expected - packaged))
    assert not missing, (f"not in the wheel: {missing}. A folder of Python files needs an __init__.py "
                         "to be found as a package (setup.py's _packages)")
    assert packaged == expected, sorted(map(str, packaged - expected))
