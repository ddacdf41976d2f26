"""Build dynasparse._C against the torch that is already installed.

Build with `pip install --no-build-isolation [-e] .`: build isolation would pull a
different (multi-GB CUDA) torch into a throwaway environment and build against it.

CPU kernels always build. CUDA kernels build whenever nvcc is found, also against a
CPU-only torch: `csrc/cuda/*.cu` is plain CUDA (no torch headers), compiled by nvcc
through a generated ninja file, and `csrc/cuda/*_bindings.cpp` reach the current stream
through c10's device-generic API. cudart is linked statically, so the library loads on
machines without a CUDA runtime. CUDAExtension is not used because it refuses to build
against a CPU-only torch.

Environment:
  DYNASPARSE_CUDA=0|1     force the CUDA kernels off or on (on without nvcc is an error)
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0+PTX" (default); "+PTX" adds PTX for that arch
  MAX_JOBS                parallel compile jobs (ninja's default otherwise)
  NVCC                    path of nvcc (default: the one on PATH, then $CUDA_HOME/bin)
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(message):
    print(f"[dynasparse build] {message}", file=sys.stderr, flush=True)


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
    probe = ROOT / "build" / "nvcc_probe.cu"
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
    setting = os.environ.get("DYNASPARSE_CUDA", "auto").strip().lower()
    if setting not in ("0", "1", "auto", ""):
        raise SystemExit(f"DYNASPARSE_CUDA must be 0 or 1, got {setting!r}")
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


class BuildWithNvcc(BuildExtension):
    """BuildExtension that first compiles csrc/cuda/*.cu with nvcc via ninja."""

    def build_extensions(self):
        ext = self.extensions[0]
        build_cuda, nvcc = cuda_wanted()
        if build_cuda:
            includes, libdirs = nvcc_paths(nvcc)
            gencode = parse_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST)
            objects = self._compile_cuda(nvcc, gencode)
            link, rpath_dirs = find_cudart(libdirs)
            ext.sources += sorted(p.relative_to(ROOT).as_posix() for p in (CSRC / "cuda").glob("*.cpp"))
            ext.extra_objects += objects
            ext.include_dirs += includes
            ext.library_dirs += rpath_dirs
            ext.extra_link_args += link + [f"-Wl,-rpath,{d}" for d in rpath_dirs]
            ext.define_macros.append(("DYNASPARSE_WITH_CUDA", "1"))
            cuda_note = f"built for {' '.join(g.rsplit('code=', 1)[1] for g in gencode)} by {nvcc}"
        elif os.environ.get("DYNASPARSE_CUDA", "").strip() == "0":
            cuda_note = "not built: DYNASPARSE_CUDA=0 at build time"
        else:
            cuda_note = "not built: nvcc was not found at build time (rebuild with nvcc on PATH, or set NVCC)"
        self._write_build_info(ext, cuda_note)
        _log("backends built: cpu" + (", cuda" if build_cuda else "")
             + "; triton kernels are Python, compiled at first use")
        _log(f"CUDA kernels {cuda_note}")
        super().build_extensions()

    def _write_build_info(self, ext, cuda_note):
        """What the build did, compiled into _C (`dynasparse._C.cuda_build`), so that
        dynasparse.backends() can say why CUDA is missing rather than guess."""
        generated = Path(self.build_temp).resolve() / "generated"
        generated.mkdir(parents=True, exist_ok=True)
        header = generated / "dynasparse_build_info.h"
        text = f"#pragma once\n#define DYNASPARSE_CUDA_BUILD {json.dumps(cuda_note)}\n"
        if not header.exists() or header.read_text() != text:  # unchanged: no rebuild
            header.write_text(text)
        ext.include_dirs.append(str(generated))

    def _compile_cuda(self, nvcc, gencode):
        sources = sorted((CSRC / "cuda").glob("*.cu"))
        out_dir = Path(self.build_temp).resolve() / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                 "-lineinfo", f"-I{CSRC}"] + gencode
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
        (out_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        command = ["ninja", "-C", str(out_dir)]
        if os.environ.get("MAX_JOBS"):
            command += ["-j", os.environ["MAX_JOBS"]]
        _log(f"compiling {len(sources)} CUDA file(s)")
        subprocess.run(command, check=True)
        return objects


# setuptools wants source paths relative to the project root.
cpu_sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(p.relative_to(ROOT).as_posix() for p in (CSRC / "cpu").glob("*.cpp"))

setup(
    ext_modules=[
        CppExtension(
            name="dynasparse._C",
            sources=cpu_sources,
            include_dirs=[str(CSRC)],
            # -fno-math-errno: sqrt setting errno is a branch that keeps AdamW's loop scalar.
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildWithNvcc.with_options(use_ninja=True)},
)
