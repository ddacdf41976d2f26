"""The CMake library (for C++ users) and dynasparse._C (setup.py) must never drift apart.

Both builds glob csrc/; this test builds the CMake one and checks that it registers the
same ops with kernels for the same dispatch keys as the installed dynasparse._C, and
that an op from it runs. Each library is loaded in a fresh interpreter with
torch.ops.load_library and without importing the dynasparse package: two libraries
registering the same ops in one process would clash, and the package adds Python-side
ops (the Triton variants) that are no part of either C++ build.
"""

import fcntl
import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Under the gitignored cmake-build/, kept between runs so that rebuilds are incremental.
BUILD_DIR = ROOT / "cmake-build" / "pytest"

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("ninja") is None,
    reason="cmake and ninja are needed to build the CMake library",
)

# Prints, as JSON, each dynasparse op with the dispatch keys it has a kernel for, and
# what pack_mask returns for one small mask.
PROBE = r"""
import json, sys, torch
torch.ops.load_library(sys.argv[1])

def parses(key):
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key("aten::add.Tensor", key)
        return True
    except RuntimeError:
        return False

keys = [key for key in torch._C.DispatchKey.__members__ if parses(key)]
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dynasparse::"))
kernels = {op: [k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(op, k)] for op in ops}
packed = torch.ops.dynasparse.pack_mask(torch.tensor([[True, False, True]]))
print(json.dumps({"kernels": kernels, "pack_mask": packed.tolist(), "dtype": str(packed.dtype)}))
"""


def _run(command, what, check=True):
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if check and result.returncode != 0:
        pytest.fail(f"{what} failed ({result.returncode}): {' '.join(map(str, command))}\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _cmake_cuda_setting():
    # The same switch that setup.py reads, so both builds make the same CUDA choice.
    return {"0": "OFF", "1": "ON"}.get(os.environ.get("DYNASPARSE_CUDA", "").strip(), "AUTO")


def _setup_py_library():
    # find_spec of the top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("dynasparse")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("dynasparse is not installed: pip install --no-build-isolation -e .")
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = Path(folder) / f"_C{suffix}"
            if candidate.exists():
                return candidate
    pytest.fail(f"no dynasparse._C in {list(spec.submodule_search_locations)}: "
                "build it with pip install --no-build-isolation -e .")


@pytest.fixture(scope="module")
def cmake_library():
    configure = ["cmake", "-S", ROOT, "-B", BUILD_DIR, "-G", "Ninja",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DDYNASPARSE_CUDA={_cmake_cuda_setting()}"]
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # Test runs sharing a checkout (pytest-xdist workers, two terminals) take turns.
    with open(BUILD_DIR.parent / "pytest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _run(configure, "cmake configure", check=False).returncode != 0:
            # A kept build dir can be unusable (a moved checkout, another CMake version):
            # start it afresh once, so that only a real configure error fails the test.
            shutil.rmtree(BUILD_DIR, ignore_errors=True)
            _run(configure, "cmake configure")
        _run(["cmake", "--build", BUILD_DIR], "cmake build")
    return BUILD_DIR / "libdynasparse.so"


def _probe(library):
    return json.loads(_run([sys.executable, "-c", PROBE, str(library)], f"loading {library}").stdout)


def test_cmake_library_registers_the_same_ops_as_setup_py_build(cmake_library):
    cmake = _probe(cmake_library)
    setup_py = _probe(_setup_py_library())

    assert cmake["pack_mask"] == [[5]] and cmake["dtype"] == "torch.int32", cmake
    assert cmake["kernels"], "the CMake library registered no dynasparse ops"
    assert cmake["kernels"] == setup_py["kernels"], (
        "the CMake and setup.py builds register different ops or dispatch keys. If csrc/ "
        "changed since dynasparse._C was built, rebuild it (python setup.py build_ext --inplace "
        "compiles only what changed); if only the CUDA keys differ, one build found nvcc and the "
        "other did not.\n"
        f"CMake:    {cmake['kernels']}\nsetup.py: {setup_py['kernels']}")


def test_cmake_library_needs_neither_python_nor_a_shared_cudart(cmake_library):
    dynamic = _run(["readelf", "--dynamic", cmake_library], "readelf").stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic
    unwanted = ("libpython", "libtorch_python")
    if torch.version.cuda is None:
        # cudart is linked statically so that the library loads where no CUDA is installed;
        # a CUDA build of torch brings its own shared cudart through the torch target.
        unwanted += ("libcudart",)
    found = [lib for lib in needed if lib.startswith(unwanted)]
    assert not found, f"{cmake_library} needs {found}"


def _shared_flags():
    """csrc/build_flags.txt, read here on its own rather than through either build."""
    flags = {}
    for line in (ROOT / "csrc" / "build_flags.txt").read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.lstrip().startswith("#"):
            flags[key.strip()] = shlex.split(value)
    return flags


def _cmake_compile_flags(language):
    """The flags of each object CMake compiles in `language` ("CXX" or "CUDA"), from build.ninja."""
    flags, rule = [], None
    for line in (BUILD_DIR / "build.ninja").read_text().splitlines():
        if line.startswith("build "):
            rule = line.split(":", 2)[1].split()[0] if ":" in line else None
        elif line.startswith("  FLAGS = ") and rule and rule.startswith(f"{language}_COMPILER"):
            flags.append(shlex.split(line.split("=", 1)[1]))
    return flags


def test_both_builds_compile_with_the_flags_of_the_shared_file(cmake_library):
    shared = _shared_flags()
    cxx = _cmake_compile_flags("CXX")
    assert cxx and all(set(shared["cxx_flags"]) <= set(words) for words in cxx), cxx
    cuda = _cmake_compile_flags("CUDA")
    if cuda:
        expected = set(shared["cuda_flags"]) | {f"-std=c++{shared['cuda_std'][0]}"}
        assert all(expected <= set(words) for words in cuda), cuda
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.version.cuda is None:
            # A CUDA build of torch chooses the architectures itself (see CMakeLists.txt).
            # "--generate-code=arch=compute_90,code=[compute_90,sm_90]": SASS, and PTX where asked.
            codes = {arch: set(targets.split(",")) for arch, targets in
                     re.findall(r"arch=compute_(\d+a?),code=\[([^\]]*)\]", " ".join(cuda[0]))}
            expected = {}
            for item in shared["cuda_arch_list"]:
                arch = item.removesuffix("+PTX").replace(".", "")
                expected[arch] = {f"sm_{arch}"} | ({f"compute_{arch}"} if item.endswith("+PTX") else set())
            assert codes == expected, cuda[0]

    # setup.py records what it compiled with in its build folder (see _record_configuration).
    record = ROOT / "build" / "temp" / "configuration.json"
    if not record.exists():
        pytest.skip(f"{record} is missing: dynasparse._C was not built by setup.py in this checkout")
    configuration = json.loads(record.read_text())
    assert set(shared["cxx_flags"]) <= set(configuration["compile_args"]), configuration["compile_args"]
    if configuration["cuda_flags"]:
        assert set(shared["cuda_flags"]) <= set(configuration["cuda_flags"]), configuration["cuda_flags"]
