"""Build dynasparse._C against the torch that is already installed.

Build with `pip install --no-build-isolation [-e] .`: build isolation would pull a
different (multi-GB CUDA) torch into a throwaway environment and build against it.

CPU kernels always build. CUDA kernels build whenever nvcc is found, also against a
CPU-only torch: `csrc/cuda/*.cu` is plain CUDA (no torch headers), compiled by nvcc
through a generated ninja file, and `csrc/cuda/*_bindings.cpp` reach the current stream
through c10's device-generic API. cudart is linked statically, so the library loads on
machines without a CUDA runtime. CUDAExtension is not used because it refuses to build
against a CPU-only torch.

Builds are incremental: every way of building (pip install, pip wheel, `python setup.py
build_ext --inplace`) compiles into build/temp/ of the checkout, so a rebuild compiles only
the files that changed (ninja, with the compiler's header dependencies), and one with
nothing changed neither compiles nor links. The compile flags and the default arch list
live in csrc/build_flags.txt, which CMakeLists.txt reads too.

Environment:
  DYNASPARSE_CUDA=0|1     force the CUDA kernels off or on (on without nvcc is an error)
  DYNASPARSE_DEBUG=0|1    1: debug symbols (-g) in the library; 0 (default): none
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0+PTX" (default from csrc/build_flags.txt); "+PTX"
                          adds PTX for that arch
  MAX_JOBS                parallel compile jobs (ninja's default otherwise)
  NVCC                    path of nvcc (default: the one on PATH, then $CUDA_HOME/bin)
"""

import fcntl
import filecmp
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_DIR = ROOT / "build"
FLAGS_FILE = CSRC / "build_flags.txt"


def _log(message):
    print(f"[dynasparse build] {message}", file=sys.stderr, flush=True)


def read_build_flags(path=FLAGS_FILE):
    """csrc/build_flags.txt as {key: [words]}."""
    flags = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.partition("=")
        if not equals:
            raise SystemExit(f"{path}:{number}: expected 'key = value', got {line!r}")
        flags[key.strip()] = shlex.split(value)
    return flags


FLAGS = read_build_flags()


def _switch(name, allowed):
    setting = os.environ.get(name, "").strip().lower()
    if setting not in allowed:
        raise SystemExit(f"{name} must be {' or '.join(a for a in allowed if a)}, got {setting!r}")
    return setting


def debug_wanted():
    return _switch("DYNASPARSE_DEBUG", ("0", "1", "")) == "1"


def debug_flags():
    # Python's own CFLAGS (sysconfig) put -g on every compile line: -g0 after it takes it
    # back, which makes a clean build faster and the library a fraction of the size.
    return ["-g"] if debug_wanted() else ["-g0"]


def find_nvcc():
    explicit = os.environ.get("NVCC")
    if explicit:
        if shutil.which(explicit) is None:
            raise SystemExit(f"NVCC={explicit} is not an executable")
        return explicit
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return None


def nvcc_paths(nvcc):
    """Include and library dirs as nvcc itself reports them.

    Asking nvcc (not guessing from its path) works for wrapper scripts, symlinked
    toolkits and pip-installed nvcc alike.
    """
    probe = BUILD_DIR / "nvcc_probe.cu"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("\n")
    out = subprocess.run([nvcc, "-dryrun", "-c", str(probe), "-o", os.devnull],
                         capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    includes, libdirs = [], []
    for line in text.splitlines():
        if "INCLUDES=" in line:
            includes += re.findall(r'-I"?([^"\s]+)', line)
        if "LIBRARIES=" in line:
            libdirs += [d for d in re.findall(r'-L"?([^"\s]+)', line) if not d.endswith("stubs")]
    return includes, libdirs


def parse_arch_list(spec):
    """'8.0;9.0+PTX' -> nvcc -gencode flags (SASS per arch, PTX where asked)."""
    flags = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        version = item.removesuffix("+PTX")
        if not re.fullmatch(r"\d+\.\d+a?", version):
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: cannot parse {item!r} (expected e.g. '8.0;9.0+PTX')")
        arch = version.replace(".", "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise SystemExit("TORCH_CUDA_ARCH_LIST is empty")
    return flags


def cuda_wanted():
    """(build CUDA?, nvcc path). DYNASPARSE_CUDA=1 without nvcc is an error, not a silent skip."""
    setting = _switch("DYNASPARSE_CUDA", ("0", "1", "auto", ""))
    if setting == "0":
        return False, None
    nvcc = find_nvcc()
    if nvcc is None and setting == "1":
        raise SystemExit("DYNASPARSE_CUDA=1 but nvcc was not found: put it on PATH, or set NVCC or CUDA_HOME")
    return nvcc is not None, nvcc


def find_cudart(libdirs):
    for d in libdirs:
        static = Path(d) / "libcudart_static.a"
        if static.exists():
            return [str(static), "-ldl", "-lrt", "-lpthread"], []
    for d in libdirs:
        if list(Path(d).glob("libcudart.so*")):
            return ["-lcudart"], [d]
    raise SystemExit(f"nvcc found, but no libcudart in {libdirs}")


def _write_if_changed(path, text):
    """Unchanged content keeps the file's mtime, so nothing that depends on it rebuilds."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


class BuildWithNvcc(BuildExtension):
    """BuildExtension that first compiles csrc/cuda/*.cu with nvcc via ninja, always in
    build/temp/, and skips the compile and link steps when nothing changed."""

    def finalize_options(self):
        forced = self.force  # set here only by an explicit --force
        super().finalize_options()
        # pip and setuptools' editable mode compile in a fresh temporary folder each time,
        # which makes every install a clean build; one folder makes them all incremental.
        self.build_temp = str(BUILD_DIR / "temp")
        # BuildExtension forces the compile and link of every build and leaves it to ninja to
        # skip unchanged objects; but the link and the copy into the source tree would then
        # run on every call. Extension.depends (build_extensions) lists everything that can
        # change the library, so setuptools' own up-to-date check is right to skip both.
        self.force = bool(forced)

    def run(self):
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        # Builds sharing a checkout (two terminals, a test run) take turns on build/temp.
        with open(BUILD_DIR / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            super().run()

    def build_extensions(self):
        ext = self.extensions[0]
        build_cuda, nvcc = cuda_wanted()
        cuda_flags = []
        if build_cuda:
            includes, libdirs = nvcc_paths(nvcc)
            gencode = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or " ".join(FLAGS["cuda_arch_list"]))
            cuda_flags = (FLAGS["cuda_flags"] + [f"-std=c++{FLAGS['cuda_std'][0]}", "-Xcompiler", "-fPIC",
                                                  f"-I{CSRC}"] + (["-g"] if debug_wanted() else []) + gencode)
            objects = self._compile_cuda(nvcc, cuda_flags)
            link, rpath_dirs = find_cudart(libdirs)
            ext.sources += sorted(p.relative_to(ROOT).as_posix() for p in (CSRC / "cuda").glob("*.cpp"))
            ext.extra_objects += objects
            ext.depends += objects
            ext.include_dirs += includes
            ext.library_dirs += rpath_dirs
            ext.extra_link_args += link + [f"-Wl,-rpath,{d}" for d in rpath_dirs]
            cuda_note = f"built for {' '.join(g.rsplit('code=', 1)[1] for g in gencode)} by {nvcc}"
        elif os.environ.get("DYNASPARSE_CUDA", "").strip() == "0":
            cuda_note = "not built: DYNASPARSE_CUDA=0 at build time"
        else:
            cuda_note = "not built: nvcc was not found at build time (rebuild with nvcc on PATH, or set NVCC)"
        self._write_build_info(ext, cuda_note)
        self._record_configuration(ext, nvcc, cuda_flags)
        _log("backends built: cpu" + (", cuda" if build_cuda else "")
             + "; triton kernels are Python, compiled at first use")
        _log(f"CUDA kernels {cuda_note}; debug symbols {'on' if debug_wanted() else 'off (DYNASPARSE_DEBUG=1 adds them)'}")
        super().build_extensions()

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        before = target.stat().st_mtime_ns if target.exists() else None
        super().build_extension(ext)
        if target.exists() and target.stat().st_mtime_ns == before:
            _log(f"{ext.name} is up to date: nothing compiled or linked")

    def _write_build_info(self, ext, cuda_note):
        """What the build did, compiled into _C (`dynasparse._C.cuda_build`), so that
        dynasparse.backends() can say why CUDA is missing rather than guess."""
        generated = Path(self.build_temp) / "generated"
        generated.mkdir(parents=True, exist_ok=True)
        header = generated / "dynasparse_build_info.h"
        _write_if_changed(header, f"#pragma once\n#define DYNASPARSE_CUDA_BUILD {json.dumps(cuda_note)}\n")
        ext.include_dirs.append(str(generated))
        ext.depends.append(str(header))

    def _record_configuration(self, ext, nvcc, cuda_flags):
        """Everything besides the files that decides what the library is, in one file that
        changes (and so triggers a rebuild) exactly when one of them does: the sources (a
        deleted file too), flags, compilers, torch and the interpreter."""
        record = Path(self.build_temp) / "configuration.json"
        configuration = {
            "sources": ext.sources, "include_dirs": ext.include_dirs + self.include_dirs,
            "macros": ext.define_macros, "compile_args": ext.extra_compile_args,
            "link_args": ext.extra_link_args, "nvcc": nvcc, "cuda_flags": cuda_flags,
            "compilers": {name: os.environ.get(name) for name in ("CC", "CXX", "LDSHARED", "CFLAGS", "LDFLAGS")},
            "torch": [torch.__version__, torch.__file__],
            "python": [sys.version, sys.executable, sys.prefix, platform.platform()],
        }
        _write_if_changed(record, json.dumps(configuration, indent=1) + "\n")
        # Every file of csrc/ (headers, .cu, the flags file; the .cpp files are sources), and
        # the objects: newer ones than the library were compiled by another build (an
        # editable install and build_ext --inplace link in different places).
        objects = self.compiler.object_filenames(ext.sources, output_dir=os.path.abspath(self.build_temp))
        ext.depends += [str(path) for path in sorted(CSRC.rglob("*")) if path.is_file()] + [str(record)] + objects

    def _compile_cuda(self, nvcc, flags):
        sources = sorted((CSRC / "cuda").glob("*.cu"))
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {shlex.quote(nvcc)}",
            f"flags = {' '.join(shlex.quote(f) for f in flags)}",
            "rule nvcc",
            "  command = $nvcc $flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
        ]
        objects = []
        for src in sources:
            obj = out_dir / (src.stem + ".o")
            lines.append(f"build {obj}: nvcc {src}")
            objects.append(str(obj))
        _write_if_changed(out_dir / "build.ninja", "\n".join(lines) + "\n")
        command = ["ninja", "-C", str(out_dir)]
        if os.environ.get("MAX_JOBS"):
            command += ["-j", os.environ["MAX_JOBS"]]
        _log(f"compiling {len(sources)} CUDA file(s) (only the changed ones)")
        subprocess.run(command, check=True)
        return objects

    def copy_extensions_to_source(self):
        # In place (editable installs, build_ext --inplace): an unchanged library is left
        # alone, a changed one replaces the old file by a rename. Copying into the old file
        # would rewrite pages that running processes (a test run) have mapped, and crash them.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if os.path.exists(inplace_file) and filecmp.cmp(regular_file, inplace_file, shallow=False):
                continue
            staging = f"{inplace_file}.partial"
            shutil.copy2(regular_file, staging)
            os.replace(staging, inplace_file)
            _log(f"installed {os.path.relpath(inplace_file, ROOT)}")


def _packages():
    """Every package of the tree: python/dynasparse/** as dynasparse.**, kernels/** as
    dynasparse.kernels.** (the package-dir mapping in pyproject.toml), found rather than
    listed, so that a new subpackage cannot go missing from a wheel."""
    kernels = ["dynasparse.kernels"] + [f"dynasparse.kernels.{name}" for name in find_packages(str(ROOT / "kernels"))]
    return find_packages(str(ROOT / "python"), include=["dynasparse", "dynasparse.*"]) + kernels


# setuptools wants source paths relative to the project root.
cpu_sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(p.relative_to(ROOT).as_posix() for p in (CSRC / "cpu").glob("*.cpp"))

setup(
    packages=_packages(),
    ext_modules=[
        CppExtension(
            name="dynasparse._C",
            sources=cpu_sources,
            include_dirs=[str(CSRC)],
            extra_compile_args=FLAGS["cxx_flags"] + ["-fopenmp"] + debug_flags(),
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildWithNvcc.with_options(use_ninja=True)},
)
